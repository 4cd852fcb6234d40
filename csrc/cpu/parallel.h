// A dynamically scheduled parallel loop for the bandwidth-bound CPU kernels.
//
// elastic_for(n, max_workers, fn) runs fn(chunk, worker) for every chunk in [0, n); the workers
// claim chunks from one atomic counter, so a worker that starts late or runs slowly simply takes
// fewer chunks. Chunks must be independent and results must not depend on which worker ran a
// chunk (the kernels write each chunk's partial result to its own slot), so the output is
// bitwise the same for any thread count or schedule. Two schedules, chosen per call by the
// environment variable RGPT4D_CPU_SCHEDULE:
//
// - "omp" (the default): the workers are torch's OpenMP team (one at::parallel_for region).
//   Between torch's own ops that team's threads spin-wait on the cores for a while, so they pick
//   the work up at once: on an otherwise idle machine it is 15-30% faster than "elastic" for the
//   TPE and P4D kernels (benchmarks/bench_tpe.py, benchmarks/bench_p4d_loss.py, each schedule).
// - "elastic": the caller (worker 0) and up to max_workers - 1 helpers started through at::launch
//   (torch's inter-op pool). The caller waits only for chunks a helper has actually claimed, never
//   for a helper that has not started: on a machine shared with other busy processes it runs every
//   chunk itself when the other core is taken, where an OpenMP region would wait at its closing
//   barrier for a descheduled thread: with one busy process beside it, the TPE table gradient
//   takes about 0.6x the time of "omp" (the same benchmarks). On an idle machine its helpers
//   compete with OpenMP's spinning threads for the cores. Side effect: once an op has run with more than one thread,
//   torch's inter-op pool exists, so torch.set_num_interop_threads() must be called before.
//
// In "elastic", the helpers never touch `fn` (which lives on the caller's stack) except between a
// successful claim and the matching `done` increment, and the caller returns only once every
// claimed chunk is done; the shared counters live on the heap (shared_ptr), so a late helper that
// finds nothing left to claim only touches those.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
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

// Workers elastic_for may use (torch.get_num_threads()).
inline int elastic_max_workers() { return std::max(1, at::get_num_threads()); }

// RGPT4D_CPU_SCHEDULE: unset, empty or "omp" -> false; "elastic" -> true; anything else raises.
inline bool elastic_helpers() {
  const char* s = std::getenv("RGPT4D_CPU_SCHEDULE");
  if (s == nullptr || *s == '\0' || std::strcmp(s, "omp") == 0) return false;
  TORCH_CHECK(std::strcmp(s, "elastic") == 0, "RGPT4D_CPU_SCHEDULE must be 'omp' or 'elastic', got '", s, "'");
  return true;
}

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
  if (!elastic_helpers()) {
    // One worker index per team thread (grain 1 over [0, workers)), each claiming chunks.
    at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
      for (int64_t w = begin; w < end; ++w) detail::elastic_work(*state, static_cast<int>(w));
    });
    if (state->error) std::rethrow_exception(state->error);
    return;
  }
  for (int w = 1; w < workers; ++w) {
    at::launch([state, w]() { detail::elastic_work(*state, w); });
  }
  detail::elastic_work(*state, 0);
  // Chunks a helper claimed and is still running: wait for them (and only them).
  while (state->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
  if (state->error) std::rethrow_exception(state->error);
}

}  // namespace rgpt4d
