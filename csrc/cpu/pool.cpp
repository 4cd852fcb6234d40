// The CPU output cache behind rgpt4d::empty_output (see cpu/alloc.h).
#include "cpu/alloc.h"

#include <c10/core/Allocator.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <c10/core/CPUAllocator.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <map>
#include <mutex>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace rgpt4d {
namespace {

constexpr size_t kHuge = size_t(2) << 20;
constexpr size_t kMinCached = size_t(1) << 20;
// Blocks are rounded to 64 KiB. From kHugeFrom on they are aligned to a huge page and the whole
// huge pages inside the block are advised for them; the tail (< 2 MiB) keeps small pages, so an
// 11 MiB gradient touches 11 MiB, not 12 (a huge page over the tail would fault in all of it).
constexpr size_t kHugeFrom = size_t(8) << 20;
constexpr size_t kUnit = size_t(64) << 10;

size_t cap_from_env() {
  const char* s = std::getenv("RGPT4D_CPU_POOL_MB");
  if (s == nullptr || *s == '\0') return size_t(1024) << 20;
  char* end = nullptr;
  const long long mb = std::strtoll(s, &end, 10);
  TORCH_CHECK(end != s && *end == '\0' && mb >= 0,
              "RGPT4D_CPU_POOL_MB must be a non-negative integer (MiB), got '", s, "'");
  return size_t(mb) << 20;
}

struct Block {
  void* ptr;
  size_t size;
};

class OutputPool final : public c10::Allocator {
 public:
  OutputPool() : cap_(cap_from_env()) {}

  c10::DataPtr allocate(size_t n) override {
    if (n < kMinCached || cap_ == 0) {  // small or disabled: torch's own CPU allocator
      return c10::GetDefaultCPUAllocator()->allocate(n);
    }
    const bool huge = n >= kHugeFrom;
    const size_t size = (n + kUnit - 1) / kUnit * kUnit;
    void* ptr = nullptr;
    {
      std::lock_guard<std::mutex> g(mu_);
      auto it = free_.find(size);
      if (it != free_.end()) {
        ptr = it->second;
        free_.erase(it);
        cached_ -= size;
      }
    }
    if (ptr == nullptr) {
      // posix_memalign: unlike aligned_alloc, no need for size to be a multiple of the alignment
      if (posix_memalign(&ptr, huge ? kHuge : size_t(4096), size) != 0) ptr = nullptr;
      TORCH_CHECK(ptr != nullptr, "rgpt4d: out of memory allocating ", size, " bytes for a CPU output");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
      if (huge) (void)madvise(ptr, size / kHuge * kHuge, MADV_HUGEPAGE);
#endif
    }
    // Reported like torch's own CPU allocations, so the profiler's memory events (profile_memory=True,
    // what benchmarks/harness.py counts as peak memory) see the block while a tensor holds it; a
    // block resting in the cache is not counted (as with torch.cuda.memory_allocated).
    c10::profiledCPUMemoryReporter().New(ptr, size);
    return {ptr, new Block{ptr, size}, &OutputPool::release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  int64_t cached_bytes() {
    std::lock_guard<std::mutex> g(mu_);
    return int64_t(cached_);
  }
  int64_t cached_blocks() {
    std::lock_guard<std::mutex> g(mu_);
    return int64_t(free_.size());
  }
  int64_t empty() {
    std::multimap<size_t, void*> drop;
    size_t bytes;
    {
      std::lock_guard<std::mutex> g(mu_);
      drop.swap(free_);
      bytes = cached_;
      cached_ = 0;
    }
    for (auto& kv : drop) std::free(kv.second);
    return int64_t(bytes);
  }

  static OutputPool& get() {
    static OutputPool* pool = new OutputPool();  // never destroyed: tensors may outlive static destructors
    return *pool;
  }

 private:
  static void release(void* ctx) {
    Block* b = static_cast<Block*>(ctx);
    c10::profiledCPUMemoryReporter().Delete(b->ptr);
    OutputPool& p = get();
    bool keep = false;
    {
      std::lock_guard<std::mutex> g(p.mu_);
      if (p.cached_ + b->size <= p.cap_) {
        p.free_.emplace(b->size, b->ptr);
        p.cached_ += b->size;
        keep = true;
      }
    }
    if (!keep) std::free(b->ptr);
    delete b;
  }

  std::mutex mu_;
  std::multimap<size_t, void*> free_;
  size_t cached_ = 0;
  const size_t cap_;
};

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  TORCH_INTERNAL_ASSERT(options.device().is_cpu());
  return at::Tensor(at::detail::empty_generic(sizes, &OutputPool::get(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), std::nullopt));
}

int64_t cpu_pool_cached_bytes() { return OutputPool::get().cached_bytes(); }
int64_t cpu_pool_cached_blocks() { return OutputPool::get().cached_blocks(); }
int64_t cpu_pool_empty() { return OutputPool::get().empty(); }

}  // namespace rgpt4d

namespace rgpt4d {
// How many threads an at::parallel_for compiled into this library runs on (a diagnostic for the
// build: without -fopenmp, ATen's OpenMP pragma is dropped and the answer is 1 whatever
// torch.get_num_threads() says).
int64_t parallel_for_threads() {
  std::atomic<int> widest{0};
  at::parallel_for(0, 4 * at::get_num_threads(), 1, [&](int64_t, int64_t) {
    const int t = at::get_thread_num() + 1;
    int seen = widest.load();
    while (t > seen && !widest.compare_exchange_weak(seen, t)) {
    }
  });
  return widest.load();
}
}  // namespace rgpt4d

TORCH_LIBRARY_FRAGMENT(rgpt4d, m) {
  m.def("parallel_for_threads() -> int", &rgpt4d::parallel_for_threads);
  m.def("cpu_pool_empty() -> int", &rgpt4d::cpu_pool_empty);
  m.def("cpu_pool_stats() -> int[]", []() -> std::vector<int64_t> {
    return {rgpt4d::cpu_pool_cached_bytes(), rgpt4d::cpu_pool_cached_blocks()};
  });
}
