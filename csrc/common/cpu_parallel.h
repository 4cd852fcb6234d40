// An "elastic" parallel loop for the bandwidth-bound CPU kernels.
//
// at::parallel_for (OpenMP) splits a range into one fixed part per thread and ends with a
// barrier: on a shared machine (the 2-core VM, with other processes running), a thread that the
// OS has descheduled holds the whole call until it gets a core back and finishes its half. We
// measured a tpe_add forward at 2 threads slower than at 1 thread for that reason, and the TPE
// table gradient 2-4x slower (it had three parallel regions per call).
//
// elastic_for(n, max_workers, fn) runs fn(chunk, worker) for every chunk in [0, n): the caller
// (worker 0) and up to max_workers - 1 helpers (max_workers: torch.get_num_threads()), started
// through at::launch (torch's inter-op pool), claim chunks from one atomic counter. The caller waits only for chunks a helper
// has actually claimed, never for a helper that has not started: when the other core is busy,
// the caller simply runs every chunk itself (the 1-thread speed), and when it is free the helper
// takes half or more. Chunks must be independent; results must not depend on which worker ran a
// chunk (the kernels write each chunk's partial result to its own slot), so the output is
// bitwise the same for any thread count or schedule.
//
// The helpers never touch `fn` (which lives on the caller's stack) except between a successful
// claim and the matching `done` increment, and the caller returns only once every claimed chunk
// is done; the shared counters live on the heap (shared_ptr), so a late helper that finds nothing
// left to claim only touches those.
//
// Side effect of at::launch: once an op has run with more than one thread, torch's inter-op pool
// exists, so torch.set_num_interop_threads() must be called before (as torch requires anyway
// after any inter-op work).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>

namespace rgpt4d {

namespace detail {

struct ElasticState {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t n = 0;
  const std::function<void(int64_t, int)>* fn = nullptr;
  std::mutex mu;
  std::exception_ptr error;
};

inline void elastic_work(ElasticState& s, int worker) {
  for (;;) {
    const int64_t c = s.next.fetch_add(1, std::memory_order_relaxed);
    if (c >= s.n) return;
    try {
      (*s.fn)(c, worker);
    } catch (...) {
      std::lock_guard<std::mutex> g(s.mu);
      if (!s.error) s.error = std::current_exception();
    }
    s.done.fetch_add(1, std::memory_order_acq_rel);
  }
}

}  // namespace detail

// Workers elastic_for may use: the caller plus the helpers (torch.get_num_threads() in all).
inline int elastic_max_workers() { return std::max(1, at::get_num_threads()); }

// fn(chunk, worker): worker in [0, max_workers) — an index for per-worker scratch (each worker
// only ever touches its own slot); max_workers is usually elastic_max_workers(), read once by the
// caller to size its scratch. Serial when n < 2, at 1 thread, or inside a parallel region.
inline void elastic_for(int64_t n, int max_workers, const std::function<void(int64_t, int)>& fn) {
  if (n <= 0) return;
  const int workers = static_cast<int>(std::min<int64_t>(std::max(1, max_workers), n));
  if (workers <= 1 || at::in_parallel_region()) {
    for (int64_t c = 0; c < n; ++c) fn(c, 0);
    return;
  }
  auto state = std::make_shared<detail::ElasticState>();
  state->n = n;
  state->fn = &fn;
  for (int w = 1; w < workers; ++w) {
    at::launch([state, w]() { detail::elastic_work(*state, w); });
  }
  detail::elastic_work(*state, 0);
  // Chunks a helper claimed and is still running: wait for them (and only them).
  while (state->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
  if (state->error) std::rethrow_exception(state->error);
}

}  // namespace rgpt4d
