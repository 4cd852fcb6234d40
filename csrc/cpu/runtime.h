// The runtime shared by the CPU kernels of every op family. Include this header, not its parts.
//
//   cpu/alloc.h     empty_output(sizes, options): large outputs from a cache of freed blocks in
//                   warm (huge-page-advised) pages; cpu_pool_empty() and the cache statistics.
//                   The cache lives in cpu/pool.cpp.
//   cpu/parallel.h  elastic_for(n, max_workers, fn(chunk, worker)): a dynamically scheduled loop
//                   over independent chunks (OpenMP team by default, RGPT4D_CPU_SCHEDULE=elastic
//                   for torch's inter-op pool); results do not depend on the schedule.
//   cpu/stream.h    non-temporal stores for outputs far beyond the last-level cache:
//                   kStreamFootprint, stream_copy, stream_fence.
//   cpu/vec.h       RGPT4D_CPU_CLONES (an AVX2+FMA clone and a baseline clone chosen at load
//                   time), RGPT4D_CPU_INLINE, cpu_has_avx2(), bf16 <-> float row conversions.
//   cpu/exp.h       cephes_exp_parts: a vectorisable exp (~1 ulp on [-87, 0]) for a float or a GCC
//                   vector of floats.
//
// at::vec (ATen/cpu/vec) where it is as fast as a hand-written loop: the bf16 <-> float row
// conversions. Elsewhere hand-written loops: this extension is compiled for baseline x86-64 (no
// per-capability dispatch as inside ATen), so at::vec::Vectorized<float> is its generic array
// implementation, and at::vec::map2 for y = x + e or acc += a x ran 2-3.5x slower than the loops
// with an AVX2 clone (RGPT4D_CPU_CLONES). benchmarks/cpu_vec_bench.cc measures both (its top comment has the command).
#pragma once

#include "cpu/alloc.h"
#include "cpu/exp.h"
#include "cpu/parallel.h"
#include "cpu/stream.h"
#include "cpu/vec.h"
