// Output allocation for the CPU kernels.
//
// A fresh 100+ MB output on Linux is an mmap whose first touch page-faults every 4 KiB page;
// on the machines we measured, those faults cost more than the kernel's own memory traffic
// (Tensor.clone() runs ~3x slower than Tensor.copy_ into an existing tensor). With transparent
// huge pages in "madvise" mode, advising the buffer before the first touch cuts the faults 512x.
// The advice is only a hint: it never changes results, and it is skipped for small outputs.
#pragma once

#include <ATen/ATen.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace rgpt4d {

inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const size_t n = t.nbytes();
  if (!t.device().is_cpu() || n < 4 * kHuge) return;
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t begin = (p + kHuge - 1) & ~(kHuge - 1), end = (p + n) & ~(kHuge - 1);
  if (end > begin) (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  advise_huge_pages(t);
  return t;
}

}  // namespace rgpt4d
