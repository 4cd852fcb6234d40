// The accumulation-dtype rule of every kernel, CPU and CUDA: float64 inputs accumulate in
// float64, every other floating dtype (float32, bfloat16, float16) in float32.
#pragma once

#include <type_traits>

#if !defined(__CUDACC__)
#include <c10/core/ScalarType.h>
#endif

namespace rgpt4d {

// The accumulation type of element type T (any float type, including CUDA's bf16 / half).
template <typename T>
using acc_t = std::conditional_t<std::is_same<T, double>::value, double, float>;

#if !defined(__CUDACC__)
// The same rule on torch dtypes.
inline c10::ScalarType acc_type(c10::ScalarType t) { return t == c10::kDouble ? c10::kDouble : c10::kFloat; }
#endif

}  // namespace rgpt4d
