// at::vec against the hand-written loops of csrc/cpu and the families, compiled as the extension
// is (baseline x86-64, -O3; RGPT4D_CPU_CLONES gives the hand-written loops an AVX2 clone, while
// at::vec::Vectorized<float> outside ATen's per-capability builds is its generic implementation).
// Rows of 4096 floats in L1, best of 7 runs. Not part of the extension:
//   T=$(python -c 'import torch, os; print(os.path.dirname(torch.__file__))')
//   g++ -O3 -fno-math-errno -fopenmp -std=c++20 -Wno-psabi -Icsrc -I$T/include benchmarks/cpu_vec_bench.cc \
//       -o /tmp/vec_bench -L$T/lib -lc10 -Wl,-rpath,$T/lib && /tmp/vec_bench
// Printed: ns per row for each, and at::vec / hand (above 1: at::vec is slower).
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>

#include <chrono>
#include <cstdio>
#include <vector>

#include "cpu/vec.h"

// The hand-written bf16 conversions (cpu/vec.h itself uses at::vec::convert for these).
RGPT4D_CPU_CLONES static void load_bf16_hand(const uint16_t* x, float* v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) v[i] = rgpt4d::bf16_bits_to_float(x[i]);
}
RGPT4D_CPU_CLONES static void store_bf16_hand(const float* v, uint16_t* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = rgpt4d::float_to_bf16_bits(v[i]);
}

using Vec = at::vec::Vectorized<float>;

RGPT4D_CPU_CLONES static void add_row(const float* x, const float* e, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] + e[i];
}
RGPT4D_CPU_CLONES static void axpy(float a, const float* x, float* acc, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += a * x[i];
}
// at::vec inside an AVX2 clone as well (RGPT4D_CPU_CLONES), so the generic vectors may be compiled
// for AVX2.
RGPT4D_CPU_CLONES static void add_row_vec(const float* x, const float* e, float* y, int64_t n) {
  at::vec::map2<float>([](Vec a, Vec b) { return a + b; }, y, x, e, n);
}
RGPT4D_CPU_CLONES static void axpy_vec(float a, const float* x, float* acc, int64_t n) {
  at::vec::map2<float>([a](Vec u, Vec v) { return v + Vec(a) * u; }, acc, x, acc, n);
}
RGPT4D_CPU_CLONES static void load_bf16_vec(const uint16_t* x, float* v, int64_t n) {
  at::vec::convert(reinterpret_cast<const c10::BFloat16*>(x), v, n);
}
RGPT4D_CPU_CLONES static void store_bf16_vec(const float* v, uint16_t* y, int64_t n) {
  at::vec::convert(v, reinterpret_cast<c10::BFloat16*>(y), n);
}

template <typename F>
double best_ns(F f, int reps) {
  double best = 1e30;
  for (int r = 0; r < 7; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < reps; ++i) f();
    auto t1 = std::chrono::steady_clock::now();
    best = std::min(best, std::chrono::duration<double, std::nano>(t1 - t0).count() / reps);
  }
  return best;
}

int main() {
  const int64_t n = 4096;
  std::vector<float> x(n), e(n), y(n), acc(n);
  std::vector<uint16_t> b(n);
  for (int64_t i = 0; i < n; ++i) { x[i] = 0.001f * i; e[i] = 1.0f - 0.0003f * i; b[i] = rgpt4d::float_to_bf16_bits(x[i]); }
  const int reps = 20000;
  struct Row { const char* name; double hand, vec; };
  Row rows[] = {
      {"y = x + e", best_ns([&] { add_row(x.data(), e.data(), y.data(), n); }, reps),
       best_ns([&] { add_row_vec(x.data(), e.data(), y.data(), n); }, reps)},
      {"acc += a x", best_ns([&] { axpy(0.5f, x.data(), acc.data(), n); }, reps),
       best_ns([&] { axpy_vec(0.5f, x.data(), acc.data(), n); }, reps)},
      {"bf16 -> float", best_ns([&] { load_bf16_hand(b.data(), y.data(), n); }, reps),
       best_ns([&] { load_bf16_vec(b.data(), y.data(), n); }, reps)},
      {"float -> bf16", best_ns([&] { store_bf16_hand(x.data(), b.data(), n); }, reps),
       best_ns([&] { store_bf16_vec(x.data(), b.data(), n); }, reps)},
  };
  std::printf("%-14s %12s %12s %8s\n", "loop (4096)", "hand ns", "at::vec ns", "vec/hand");
  for (const Row& r : rows) std::printf("%-14s %12.0f %12.0f %8.2f\n", r.name, r.hand, r.vec, r.vec / r.hand);
  return 0;
}
