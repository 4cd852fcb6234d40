// Pixel-shuffle gather / scatter of the dense heads' output stage. Plain CUDA over raw pointers.
#include "common/cuda_utils.cuh"
#include "heads/heads_cuda.h"

namespace rgpt4d {
namespace cuda {
namespace {

constexpr int kThreads = 256;

struct Strides4 {
  int64_t s[4];
};

template <typename T>
__global__ void __launch_bounds__(kThreads) shuffle_kernel(T* big, T* small, Strides4 st, int64_t N, int64_t C,
                                                            int64_t H, int64_t W, int64_t r, bool forward) {
  const int64_t OH = H * r, OW = W * r, total = N * C * OH * OW;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t ow = e % OW, q = e / OW, oh = q % OH, nc = q / OH, c = nc % C, n = nc / C;
    const int64_t h = oh / r, i = oh % r, w = ow / r, j = ow % r;
    const int64_t src = n * st.s[0] + (c * r * r + i * r + j) * st.s[1] + h * st.s[2] + w * st.s[3];
    if (forward) big[e] = small[src];
    else small[src] = big[e];
  }
}

}  // namespace

cudaError_t pixel_shuffle_launch(DType dt, void* big, void* small, const int64_t* s, int64_t N, int64_t C, int64_t H,
                                 int64_t W, int64_t r, bool forward, cudaStream_t stream) {
  const int64_t total = N * C * H * r * W * r;
  if (total == 0) return cudaSuccess;
  const int64_t b = ceil_div(total, kThreads);
  const unsigned blocks = static_cast<unsigned>(b < 65535 ? b : 65535);
  Strides4 st{{s[0], s[1], s[2], s[3]}};
  RGPT4D_DISPATCH_DTYPE(dt, {
    shuffle_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(static_cast<scalar_t*>(big), static_cast<scalar_t*>(small),
                                                              st, N, C, H, W, r, forward);
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace rgpt4d
