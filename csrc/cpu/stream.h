// Non-temporal ("streaming") stores for the CPU kernels whose output is far larger than the
// last-level cache.
//
// An ordinary store to a line that is not in cache first reads the line (read for ownership),
// so writing an output of n bytes moves 2n bytes; a non-temporal store writes the line without
// reading it. For an op that reads x and writes out (tpe_add), that is 3n -> 2n bytes, about a
// third less time on 51 MB of floats (benchmarks/bench_tpe.py). The catch: the written lines
// leave the cache, so a consumer that reads the output right away would miss. Kernels therefore
// stream only when the bytes a call moves are well beyond a last-level cache (kStreamFootprint),
// where the output would have been evicted before its consumer reads it anyway.
//
// Streaming stores are weakly ordered: each worker calls stream_fence() after its last one and
// before it reports its chunk done, so the data is visible to whoever reads the output next.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>
#define RGPT4D_HAVE_STREAM_STORES 1
#endif

namespace rgpt4d {
namespace cpu {

// Bytes read plus written by one call above which its output is written with streaming stores.
constexpr int64_t kStreamFootprint = int64_t(32) << 20;

// dst[0, bytes) = src[0, bytes). dst's 16-byte-aligned middle goes out with non-temporal stores
// (SSE2: every x86-64 CPU has them), the unaligned head and tail with memcpy. src is meant to be
// a small buffer in L1 (a row the kernel has just computed).
inline void stream_copy(void* dst, const void* src, int64_t bytes) {
#if defined(RGPT4D_HAVE_STREAM_STORES)
  char* d = static_cast<char*>(dst);
  const char* s = static_cast<const char*>(src);
  const int64_t head = std::min<int64_t>(bytes, (16 - (reinterpret_cast<uintptr_t>(d) & 15)) & 15);
  if (head) std::memcpy(d, s, head);
  int64_t i = head;
  for (; i + 64 <= bytes; i += 64) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i + 16));
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i + 32));
    const __m128i e = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i + 48));
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + i), a);
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + i + 16), b);
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + i + 32), c);
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + i + 48), e);
  }
  for (; i + 16 <= bytes; i += 16)
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + i), _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
  if (i < bytes) std::memcpy(d + i, s + i, bytes - i);
#else
  std::memcpy(dst, src, bytes);
#endif
}

// Orders this thread's streaming stores before its later stores (the "chunk done" counter).
inline void stream_fence() {
#if defined(RGPT4D_HAVE_STREAM_STORES)
  _mm_sfence();
#endif
}

}  // namespace cpu
}  // namespace rgpt4d
