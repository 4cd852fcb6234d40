// CUDA bindings of the P4D loss ops: tensors -> raw pointers -> the launchers in
// p4d_cuda_kernels.cu. Checks and the fused-linear chunk driver are shared with the CPU binding
// (p4d_common.h). No host syncs: valid counts stay on the device.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <map>
#include <utility>
#include <vector>

#include "common/cuda_bind.h"
#include "p4d/p4d_common.h"
#include "p4d/p4d_cuda.h"

namespace rgpt4d {
namespace {

// The kernels pair float64 only with float64: a float64 prediction gets a float64 target, a
// lower-precision prediction a non-float64 one (its accumulation is float32 anyway).
at::Tensor paired_target(const at::Tensor& pred, const at::Tensor& target) {
  const bool pd = pred.scalar_type() == at::kDouble, td = target.scalar_type() == at::kDouble;
  if (pd && !td) return target.to(at::kDouble);
  if (!pd && td) return target.to(at::kFloat);
  return target;
}

// Small per-call tables: filled in pinned host memory and copied asynchronously (no host sync;
// the caching host allocator keeps the buffer alive until the copy has run).
at::Tensor pinned(at::IntArrayRef sizes, at::ScalarType t) {
  return at::empty(sizes, at::TensorOptions().dtype(t).pinned_memory(true));
}

at::Tensor to_device(const at::Tensor& host, const at::Device& dev) { return host.to(dev, /*non_blocking=*/true); }

at::Tensor count_true_cuda(const at::Tensor& mask) { return at::count_nonzero(mask); }
at::Tensor sum_f64_cuda(const at::Tensor& v) { return v.sum(); }  // deterministic: no atomics in ATen's reduce
void linear_rows_cuda(at::Tensor y, const at::Tensor& target, const at::Tensor& mask, const at::Tensor& row_scale,
                      const at::Tensor& scale, int kind, double beta, bool write_grad, at::Tensor row_loss);
at::Tensor empty_cuda(at::IntArrayRef sizes, const at::TensorOptions& options) { return at::empty(sizes, options); }
const P4DHostOps kCudaOps{&count_true_cuda, &sum_f64_cuda, &empty_cuda, &linear_rows_cuda};

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> p4d_loss_cuda(
    at::TensorList preds, at::TensorList targets, at::TensorList masks, at::IntArrayRef mask_inner,
    at::IntArrayRef kinds, at::ArrayRef<double> betas, at::IntArrayRef flags, at::ArrayRef<double> weights,
    bool mean, double log_eps) {
  std::vector<P4DTerm> terms = p4d_check_terms(preds, targets, masks, mask_inner, kinds, betas, flags, weights);
  const at::Device dev = terms[0].pred.device();
  c10::cuda::CUDAGuard guard(dev);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int n = static_cast<int>(terms.size());
  const at::ScalarType out_acc = p4d_out_acc_type(terms);
  for (P4DTerm& T : terms) T.target = paired_target(T.pred, T.target).contiguous();
  const at::Tensor counts = p4d_counts(terms, kCudaOps);

  std::vector<at::Tensor> grads(n);
  std::vector<int64_t> nblk(n);
  for (int i = 0; i < n; ++i) {
    const P4DTerm& T = terms[i];
    grads[i] = T.need_grad() ? at::empty(T.pred.sizes(), T.pred.options()) : at::empty({0}, T.pred.options());
    nblk[i] = (T.numel + cuda::kP4DTile - 1) / cuda::kP4DTile;
  }
  // Group the terms by (pred dtype, target dtype); blocks numbered consecutively group by group.
  std::map<std::pair<int, int>, std::vector<int>> groups;
  for (int i = 0; i < n; ++i)
    groups[{static_cast<int>(terms[i].pred.scalar_type()), static_cast<int>(terms[i].target.scalar_type())}]
        .push_back(i);
  at::Tensor ranges_h = pinned({n, 2}, at::kLong);
  int64_t* rh = ranges_h.data_ptr<int64_t>();
  int64_t next = 0;
  std::vector<std::pair<cuda::P4DTermTable, std::pair<int64_t, int64_t>>> launches;  // table, (block0, nblocks)
  std::vector<std::pair<DType, DType>> launch_types;
  for (const auto& kv : groups) {
    const std::vector<int>& members = kv.second;
    for (size_t j0 = 0; j0 < members.size(); j0 += cuda::kP4DMaxTermsPerLaunch) {
      cuda::P4DTermTable table{};
      const int64_t block0 = next;
      for (size_t j = j0; j < std::min(members.size(), j0 + cuda::kP4DMaxTermsPerLaunch); ++j) {
        const int i = members[j];
        const P4DTerm& T = terms[i];
        cuda::P4DTermDesc& d = table.t[table.n++];
        d.pred = T.pred.data_ptr();
        d.target = T.target.data_ptr();
        d.mask = T.has_mask() ? reinterpret_cast<const uint8_t*>(T.mask.data_ptr<bool>()) : nullptr;
        d.grad = T.need_grad() ? grads[i].data_ptr() : nullptr;
        d.numel = T.numel;
        d.inner = T.inner;
        d.period = T.period;
        d.first_block = next;
        d.beta = T.beta;
        d.grad_factor = T.grad_factor;
        d.kind = T.kind;
        d.flags = T.flags;
        d.index = i;
        rh[2 * i] = next;
        rh[2 * i + 1] = next + nblk[i];
        next += nblk[i];
      }
      launches.push_back({table, {block0, next - block0}});
      launch_types.push_back({to_dtype(terms[members[0]].pred.scalar_type()),
                              to_dtype(terms[members[0]].target.scalar_type())});
    }
  }
  at::Tensor partial = at::empty({std::max<int64_t>(1, next)}, terms[0].pred.options().dtype(at::kDouble));
  for (size_t k = 0; k < launches.size(); ++k)
    check_cuda(cuda::p4d_terms_launch(launch_types[k].first, launch_types[k].second, launches[k].first,
                                      launches[k].second.first, launches[k].second.second,
                                      counts.data_ptr<int64_t>(), mean, log_eps, partial.data_ptr<double>(), stream),
               "p4d_loss");
  at::Tensor weights_h = pinned({n}, at::kDouble);
  for (int i = 0; i < n; ++i) weights_h.data_ptr<double>()[i] = terms[i].weight;
  const at::Tensor ranges = to_device(ranges_h, dev), weights_d = to_device(weights_h, dev);
  at::Tensor losses = at::empty({n}, terms[0].pred.options().dtype(out_acc));
  at::Tensor total = at::empty({}, terms[0].pred.options().dtype(out_acc));
  check_cuda(cuda::p4d_finalize_launch(partial.data_ptr<double>(), ranges.data_ptr<int64_t>(),
                                       counts.data_ptr<int64_t>(), weights_d.data_ptr<double>(), n, mean,
                                       out_acc == at::kDouble, losses.data_ptr(), total.data_ptr(), stream),
             "p4d_loss finalize");
  return {total, losses, grads};
}

void linear_rows_cuda(at::Tensor y, const at::Tensor& target, const at::Tensor& mask, const at::Tensor& row_scale,
                      const at::Tensor& scale, int kind, double beta, bool write_grad, at::Tensor row_loss) {
  const int64_t R = y.size(0), D = y.size(1);
  if (R == 0) return;
  TORCH_CHECK(y.is_contiguous() && row_loss.is_contiguous(), "p4d_linear_loss: internal: chunk must be contiguous");
  const at::Tensor t = paired_target(y, target).contiguous();
  const at::ScalarType acc = acc_type(y.scalar_type());
  const at::Tensor rs = row_scale.defined() ? row_scale.to(acc).contiguous() : at::Tensor();
  const at::Tensor sc = scale.to(acc).contiguous();
  check_cuda(cuda::p4d_rows_launch(to_dtype(y.scalar_type()), to_dtype(t.scalar_type()), y.data_ptr(), t.data_ptr(),
                                   mask.defined() ? reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>()) : nullptr,
                                   rs.defined() ? rs.data_ptr() : nullptr, sc.data_ptr(), R, D, kind, beta,
                                   write_grad, row_loss.data_ptr<double>(), c10::cuda::getCurrentCUDAStream()),
             "fused_linear_latent_loss");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> p4d_linear_loss_cuda(
    const at::Tensor& h, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, const at::Tensor& target,
    const c10::optional<at::Tensor>& mask, int64_t kind, double beta, int64_t reduction, int64_t chunk_size,
    bool need_h_grad, bool need_w_grad, bool need_b_grad) {
  c10::cuda::CUDAGuard guard(h.device());
  const P4DLinearArgs a = p4d_linear_args(h, weight, bias, target, mask, kind, beta, chunk_size);
  return p4d_linear_forward_driver(a, reduction, need_h_grad, need_w_grad, need_b_grad, kCudaOps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> p4d_linear_loss_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& h, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& target, const c10::optional<at::Tensor>& mask, int64_t kind, double beta, int64_t chunk_size,
    bool need_h_grad, bool need_w_grad, bool need_b_grad) {
  c10::cuda::CUDAGuard guard(h.device());
  const P4DLinearArgs a = p4d_linear_args(h, weight, bias, target, mask, kind, beta, chunk_size);
  return p4d_linear_backward_driver(a, grad_loss, need_h_grad, need_w_grad, need_b_grad, kCudaOps);
}

}  // namespace

TORCH_LIBRARY_IMPL(rgpt4d, CUDA, m) {
  m.impl("p4d_loss", &p4d_loss_cuda);
  m.impl("p4d_linear_loss", &p4d_linear_loss_cuda);
  m.impl("p4d_linear_loss_backward", &p4d_linear_loss_backward_cuda);
}

}  // namespace rgpt4d
