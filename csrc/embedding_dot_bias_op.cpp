// The CUDA kernels of the EmbeddingDotBias ops: embedding_dot_bias_forward, embedding_dot_bias_backward
// and embedding_dot_bias below autograd (its autograd kernel is csrc/embedding_dot_bias_autograd.cpp).
//
// Indices are never checked on the host (that would synchronise with the device): the kernels
// of csrc/embedding_dot_bias.cu bound-check every index, give a sample with a bad index a NaN
// output and no gradient contribution, and record what they saw in ``index_errors`` (the layout
// is documented in fastcore5.h and owned by fastcore5/index_errors.py).
#include "checks.h"
#include "embedding_dot_bias_checks.h"
#include "fastcore5.h"
#include "ops.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>

namespace fastcore5 {
namespace {

enum PerSampleMode { kCoef = 0, kAtomic = 1, kSparse = 2 };

}  // namespace

Tensor embedding_dot_bias_forward(const Tensor& users, const Tensor& items, const Tensor& u_weight,
                                  const Tensor& i_weight, const Tensor& u_bias, const Tensor& i_bias,
                                  std::optional<double> y_lo, std::optional<double> y_hi,
                                  const OptionalTensor& index_errors) {
  constexpr const char* op = "fastcore5_native::embedding_dot_bias_forward";
  const YRange range = check_forward_arguments(op, c10::DeviceType::CUDA, users, items, u_weight, i_weight, u_bias,
                                               i_bias, y_lo, y_hi, index_errors);
  const c10::cuda::CUDAGuard guard(u_weight.device());
  Tensor out = new_output({users.size(0)}, u_weight.options());
  embedding_dot_bias_forward_cuda(users, items, u_weight, i_weight, u_bias, i_bias, range.given, range.lo, range.hi,
                                  out, or_undefined(index_errors));
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> embedding_dot_bias_backward(
    const Tensor& grad_out, const Tensor& users, const Tensor& items, const OptionalTensor& u_weight,
    const OptionalTensor& i_weight, const OptionalTensor& u_bias, const OptionalTensor& i_bias, int64_t num_users,
    int64_t num_items, std::optional<double> y_lo, std::optional<double> y_hi, bool need_u_weight,
    bool need_i_weight, bool need_u_bias, bool need_i_bias, bool deterministic, bool sparse) {
  constexpr const char* op = "fastcore5_native::embedding_dot_bias_backward";
  const BackwardShape shape = check_backward_arguments(op, c10::DeviceType::CUDA, grad_out, users, items, u_weight,
                                                       i_weight, u_bias, i_bias, num_users, num_items, y_lo, y_hi,
                                                       need_u_weight, need_i_weight);
  const YRange range = shape.range;
  const int64_t B = shape.batch, D = shape.factors;
  const Tensor U = or_undefined(u_weight), V = or_undefined(i_weight), ub = or_undefined(u_bias),
               ib = or_undefined(i_bias);
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const auto options = grad_out.options();
  const auto acc_options = options.dtype(grad_out.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  const auto unused = [&] { return at::empty({0}, options); };
  const bool any = need_u_weight || need_i_weight || need_u_bias || need_i_bias;
  const IndexBounds bounds{num_users, num_items};

  if (sparse) {
    // One value row per sample; a sample with a bad index gets zeros (written by the kernel).
    Tensor uw = need_u_weight ? new_output({B, D}, options) : unused();
    Tensor iw = need_i_weight ? new_output({B, D}, options) : unused();
    Tensor ubv = need_u_bias ? new_output({B}, options) : unused();
    Tensor ibv = need_i_bias ? new_output({B}, options) : unused();
    if (any) {
      embedding_dot_bias_per_sample_cuda(grad_out, users, items, U, V, ub, ib, D, bounds, range.given, range.lo,
                                         range.hi, kSparse, Tensor(), need_u_weight ? uw : Tensor(),
                                         need_i_weight ? iw : Tensor(), need_u_bias ? ubv : Tensor(),
                                         need_i_bias ? ibv : Tensor());
    }
    return {uw, iw, ubv, ibv};
  }

  if (deterministic) {
    // Each gradient row is written once, from an fp32 sum, so the outputs are the final dtype.
    Tensor uw = need_u_weight ? at::zeros({num_users, D}, options) : unused();
    Tensor iw = need_i_weight ? at::zeros({num_items, D}, options) : unused();
    Tensor ubg = need_u_bias ? at::zeros({num_users}, options) : unused();
    Tensor ibg = need_i_bias ? at::zeros({num_items}, options) : unused();
    // With an empty table every index is bad: every gradient is zero.
    if (B == 0 || !any || num_users == 0 || num_items == 0) return {uw, iw, ubg, ibg};
    Tensor coef = at::empty({B}, acc_options);  // 0 for a sample with a bad index
    embedding_dot_bias_per_sample_cuda(grad_out, users, items, U, V, ub, ib, D, bounds, range.given, range.lo,
                                       range.hi, kCoef, coef, Tensor(), Tensor(), Tensor(), Tensor());
    // The segment reduction reads and writes rows by index: clamped into range, a bad sample
    // lands on a valid row and adds its zero coefficient there (nothing out of bounds).
    const Tensor users_in_range = users.clamp(0, num_users - 1);
    const Tensor items_in_range = items.clamp(0, num_items - 1);
    if (need_u_weight || need_u_bias) {
      const auto [sorted, order] = at::sort(users_in_range, /*stable=*/true, /*dim=*/0, /*descending=*/false);
      embedding_segment_reduce_cuda(sorted, order, coef, items_in_range, need_u_weight ? V : Tensor(), D,
                                    need_u_weight ? uw : Tensor(), need_u_bias ? ubg : Tensor());
    }
    if (need_i_weight || need_i_bias) {
      const auto [sorted, order] = at::sort(items_in_range, /*stable=*/true, /*dim=*/0, /*descending=*/false);
      embedding_segment_reduce_cuda(sorted, order, coef, users_in_range, need_i_weight ? U : Tensor(), D,
                                    need_i_weight ? iw : Tensor(), need_i_bias ? ibg : Tensor());
    }
    return {uw, iw, ubg, ibg};
  }

  // Atomic path: bf16/fp16 accumulate in fp32 and are rounded once at the end.
  Tensor uw = need_u_weight ? at::zeros({num_users, D}, acc_options) : Tensor();
  Tensor iw = need_i_weight ? at::zeros({num_items, D}, acc_options) : Tensor();
  Tensor ubg = need_u_bias ? at::zeros({num_users}, acc_options) : Tensor();
  Tensor ibg = need_i_bias ? at::zeros({num_items}, acc_options) : Tensor();
  if (B > 0 && any) {
    embedding_dot_bias_per_sample_cuda(grad_out, users, items, U, V, ub, ib, D, bounds, range.given, range.lo,
                                       range.hi, kAtomic, Tensor(), uw, iw, ubg, ibg);
  }
  const auto finish = [&](const Tensor& acc) { return acc.defined() ? acc.to(grad_out.scalar_type()) : unused(); };
  return {finish(uw), finish(iw), finish(ubg), finish(ibg)};
}

Tensor embedding_dot_bias_inference(const Tensor& users, const Tensor& items, const Tensor& u_weight,
                                    const Tensor& i_weight, const Tensor& u_bias, const Tensor& i_bias,
                                    std::optional<double> y_lo, std::optional<double> y_hi, bool /*sparse*/,
                                    const OptionalTensor& index_errors) {
  return embedding_dot_bias_forward(users, items, u_weight, i_weight, u_bias, i_bias, y_lo, y_hi, index_errors);
}

}  // namespace fastcore5
