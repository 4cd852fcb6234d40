// Output allocation for the CPU kernels.
//
// A fresh 100+ MB output on Linux is an mmap whose first touch page-faults every page, and the
// kernel zeroes each page before handing it over: that costs more than the op's own memory
// traffic (Tensor.clone() of 100 MB runs 3-5x slower than Tensor.copy_ into an existing tensor).
// Two remedies, both used by empty_output():
//  - a small cache of freed large outputs (cpu/pool.cpp), reused for the next output of the same
//    rounded size — the CPU analogue of the CUDA caching allocator: a training step allocates the
//    same shapes every iteration, so steady-state outputs land in warm pages. Only blocks of at
//    least 1 MiB are cached, at most RGPT4D_CPU_POOL_MB in all (default 1024; 0 turns it off);
//    torch.ops.rgpt4d.cpu_pool_empty() gives the cached memory back (rgpt4d.ops.empty_cpu_cache()).
//  - huge-page advice (transparent huge pages in "madvise" mode) on the whole huge pages of fresh
//    blocks of 8 MiB or more, which cuts their number of faults 512x. The advice is only a hint:
//    it never changes results. Blocks are rounded to 64 KiB, not to huge pages, so an output
//    occupies its own size (an 11 MiB gradient is not padded to 12 MiB).
// Blocks in use are reported to torch's CPU memory reporter, so the profiler's memory events
// (profile_memory=True) count them like any CPU tensor; cached (free) blocks are not counted.
#pragma once

#include <ATen/ATen.h>

namespace rgpt4d {

// A CPU tensor of `sizes` (uninitialised), from the output cache when it is large.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

// Bytes currently held by the cache (not in use), and blocks in it.
int64_t cpu_pool_cached_bytes();
int64_t cpu_pool_cached_blocks();
// Free every cached block; returns the bytes given back.
int64_t cpu_pool_empty();

}  // namespace rgpt4d
