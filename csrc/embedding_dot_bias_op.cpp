// The EmbeddingDotBias ops: embedding_dot_bias_forward, embedding_dot_bias_backward and the
// autograd op embedding_dot_bias.
//
// Indices are never checked on the host (that would synchronise with the device): the kernels
// of csrc/embedding_dot_bias.cu bound-check every index, give a sample with a bad index a NaN
// output and no gradient contribution, and record what they saw in ``index_errors`` (the layout
// is documented in fastcore5.h and owned by fastcore5/index_errors.py).
#include "checks.h"
#include "embedding_dot_bias_checks.h"
#include "fastcore5.h"
#include "ops.h"

#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/_sparse_coo_tensor_unsafe.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/csrc/autograd/custom_function.h>

namespace fastcore5 {
namespace {

enum PerSampleMode { kCoef = 0, kAtomic = 1, kSparse = 2 };

}  // namespace

Tensor embedding_dot_bias_forward(const Tensor& users, const Tensor& items, const Tensor& u_weight,
                                  const Tensor& i_weight, const Tensor& u_bias, const Tensor& i_bias,
                                  std::optional<double> y_lo, std::optional<double> y_hi,
                                  const OptionalTensor& index_errors) {
  constexpr const char* op = "fastcore5_cuda::embedding_dot_bias_forward";
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
  constexpr const char* op = "fastcore5_cuda::embedding_dot_bias_backward";
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

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

const auto& forward_op() {
  static const auto handle =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastcore5_cuda::embedding_dot_bias_forward", "")
          .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                        std::optional<double>, std::optional<double>, const OptionalTensor&)>();
  return handle;
}

const auto& backward_op() {
  static const auto handle =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastcore5_cuda::embedding_dot_bias_backward", "")
          .typed<std::tuple<Tensor, Tensor, Tensor, Tensor>(
              const Tensor&, const Tensor&, const Tensor&, const OptionalTensor&, const OptionalTensor&,
              const OptionalTensor&, const OptionalTensor&, int64_t, int64_t, std::optional<double>,
              std::optional<double>, bool, bool, bool, bool, bool, bool)>();
  return handle;
}

// nn.Embedding(sparse=True)'s gradient: uncoalesced COO with one entry per sample, the index of
// a bad sample clamped into range (its value is 0). ``values`` (B, ...) becomes shaped like
// ``table`` ((n, D), (n, 1) or (n,)).
Tensor sparse_grad(const Tensor& index, const Tensor& values, const Tensor& table) {
  const int64_t rows = table.size(0);
  Tensor shaped = table.dim() == 2 && values.dim() == 1 ? values.unsqueeze(1) : values;
  Tensor indices = rows > 0 ? index.clamp(0, rows - 1).to(at::kLong).unsqueeze(0)
                            : at::empty({1, 0}, index.options().dtype(at::kLong));
  if (rows == 0) shaped = shaped.narrow(0, 0, 0);
  return at::_sparse_coo_tensor_unsafe(indices, shaped, table.sizes(), shaped.options().layout(at::kSparse));
}

struct EmbeddingDotBiasFunction : public torch::autograd::Function<EmbeddingDotBiasFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& users, const Tensor& items, const Tensor& u_weight,
                        const Tensor& i_weight, const Tensor& u_bias, const Tensor& i_bias,
                        std::optional<double> y_lo, std::optional<double> y_hi, bool sparse,
                        const OptionalTensor& index_errors) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    Tensor out = forward_op().call(users, items, u_weight, i_weight, u_bias, i_bias, y_lo, y_hi, index_errors);
    // The tables are parameters (saving them costs nothing); the score is recomputed, not saved.
    ctx->save_for_backward({users, items, u_weight, i_weight, u_bias, i_bias});
    ctx->saved_data["y_lo"] = y_lo;
    ctx->saved_data["y_hi"] = y_hi;
    ctx->saved_data["sparse"] = sparse;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &users = saved[0], &items = saved[1], &U = saved[2], &V = saved[3], &ub = saved[4], &ib = saved[5];
    const bool need_uw = ctx->needs_input_grad(2), need_iw = ctx->needs_input_grad(3);
    const bool need_ub = ctx->needs_input_grad(4), need_ib = ctx->needs_input_grad(5);
    const Tensor& grad_out = grad_outputs[0];
    const variable_list none(10);
    if (!grad_out.defined() || !(need_uw || need_iw || need_ub || need_ib)) return none;
    const bool sparse = ctx->saved_data["sparse"].toBool();
    const auto y_lo = ctx->saved_data["y_lo"].toOptional<double>();
    const auto y_hi = ctx->saved_data["y_hi"].toOptional<double>();
    const auto [g_uw, g_iw, g_ub, g_ib] = backward_op().call(
        grad_out, users, items, U, V, ub, ib, U.size(0), V.size(0), y_lo, y_hi, need_uw, need_iw, need_ub, need_ib,
        at::globalContext().deterministicAlgorithms(), sparse);
    variable_list grads = none;
    if (sparse) {
      if (need_uw) grads[2] = sparse_grad(users, g_uw, U);
      if (need_iw) grads[3] = sparse_grad(items, g_iw, V);
      if (need_ub) grads[4] = sparse_grad(users, g_ub, ub);
      if (need_ib) grads[5] = sparse_grad(items, g_ib, ib);
    } else {
      if (need_uw) grads[2] = g_uw;
      if (need_iw) grads[3] = g_iw;
      if (need_ub) grads[4] = g_ub.view(ub.sizes());
      if (need_ib) grads[5] = g_ib.view(ib.sizes());
    }
    return grads;
  }
};

}  // namespace

Tensor embedding_dot_bias_autograd(const Tensor& users, const Tensor& items, const Tensor& u_weight,
                                   const Tensor& i_weight, const Tensor& u_bias, const Tensor& i_bias,
                                   std::optional<double> y_lo, std::optional<double> y_hi, bool sparse,
                                   const OptionalTensor& index_errors) {
  return EmbeddingDotBiasFunction::apply(users, items, u_weight, i_weight, u_bias, i_bias, y_lo, y_hi, sparse,
                                         index_errors);
}

}  // namespace fastcore5
