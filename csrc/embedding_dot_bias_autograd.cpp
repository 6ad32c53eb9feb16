// The autograd kernel of fastcore5_native::embedding_dot_bias, for every device: built in every
// build (CPU only, CUDA only, both), so the cpu and cuda backends cross autograd in C++ the same
// way (as csrc/linear_relu_autograd.cpp does for linear_relu).
//
// The public function (fastcore5/ops/embedding_dot_bias.py) calls the op only when a table needs a
// gradient; EmbeddingDotBiasFunction's forward and backward then call embedding_dot_bias_forward
// and embedding_dot_bias_backward through the dispatcher, which picks the device's kernel (under
// torch.compile they resolve to the fakes of fastcore5/_native_ops.py). Below autograd (inference
// mode) embedding_dot_bias is the device's forward kernel (csrc/cpu/embedding_dot_bias.cpp,
// csrc/registration.cpp).
//
// The index record is the forward kernel's: with validate="sync" on CPU the caller reads the
// record it passed as soon as the op returns.
#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/_sparse_coo_tensor_unsafe.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/rsub.h>
#include <ATen/ops/sub.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <tuple>

#include "differentiable_once.h"
#include "ops.h"

namespace fastcore5 {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

const auto& forward_op() {
  static const auto handle =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastcore5_native::embedding_dot_bias_forward", "")
          .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                        std::optional<double>, std::optional<double>, const OptionalTensor&)>();
  return handle;
}

const auto& backward_op() {
  static const auto handle =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastcore5_native::embedding_dot_bias_backward", "")
          .typed<std::tuple<Tensor, Tensor, Tensor, Tensor>(
              const Tensor&, const Tensor&, const Tensor&, const OptionalTensor&, const OptionalTensor&,
              const OptionalTensor&, const OptionalTensor&, int64_t, int64_t, std::optional<double>,
              std::optional<double>, bool, bool, bool, bool, bool, bool)>();
  return handle;
}

// Whether the backward forms d out / d score from the saved output, out = sigmoid(score) * (hi - lo)
// + lo: (out - lo) * (hi - out) / (hi - lo), as torch.sigmoid's backward uses its output. Then the
// backward op runs without a y_range and never recomputes the score (on CPU that recomputation
// read each sample's own row and called exp: ~0.8 ms of a ~4.3 ms ML-25M backward). Only CPU
// outputs in fp32/fp64: a bf16/fp16 output is too coarse near hi (hi - out rounds to 0 or to a
// few ulps), and on CUDA the fused recompute costs little, so both keep recomputing.
bool range_from_output(const Tensor& out, std::optional<double> y_lo) {
  const auto dtype = out.scalar_type();
  return y_lo.has_value() && out.device().is_cpu() && (dtype == at::kFloat || dtype == at::kDouble);
}

// grad_out * d out / d score from the output (range_from_output), in the output's dtype. ATen ops
// rather than a loop over the data: the autograd is also traced with fake tensors (opcheck's
// aot_dispatch tests, torch.compile). fastcore5/ops/embedding_dot_bias.py (_coefficient_from_output)
// forms the same value with the same operations in the same order, so the torch.compile path gives
// the same bits.
Tensor coefficient_from_output(const Tensor& grad_out, const Tensor& out, double lo, double hi) {
  return at::sub(out, lo).mul_(at::rsub(out, hi)).mul_(grad_out).mul_(1.0 / (hi - lo));
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
    // The tables are parameters (saving them costs nothing). With a y_range the derivative comes
    // from the output where that is exact enough (range_from_output), else from the score, which
    // the backward op recomputes from the tables.
    const bool from_output = range_from_output(out, y_lo);
    variable_list to_save{users, items, u_weight, i_weight, u_bias, i_bias};
    if (from_output) to_save.push_back(out);
    ctx->save_for_backward(to_save);
    ctx->saved_data["from_output"] = from_output;
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
    auto y_lo = ctx->saved_data["y_lo"].toOptional<double>();
    auto y_hi = ctx->saved_data["y_hi"].toOptional<double>();
    variable_list grads = none;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;  // the backward op has no autograd of its own
      Tensor coef = grad_out;
      if (ctx->saved_data["from_output"].toBool()) {
        coef = coefficient_from_output(grad_out, saved[6], *y_lo, *y_hi);
        y_lo = y_hi = std::nullopt;  // the backward op takes coef as the gradient of the score
      }
      const auto [g_uw, g_iw, g_ub, g_ib] =
          backward_op().call(coef, users, items, U, V, ub, ib, U.size(0), V.size(0), y_lo, y_hi, need_uw,
                             need_iw, need_ub, need_ib, at::globalContext().deterministicAlgorithms(), sparse);
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
    }
    return differentiable_once("embedding_dot_bias", std::move(grads), grad_outputs);
  }
};

Tensor embedding_dot_bias_autograd(const Tensor& users, const Tensor& items, const Tensor& u_weight,
                                   const Tensor& i_weight, const Tensor& u_bias, const Tensor& i_bias,
                                   std::optional<double> y_lo, std::optional<double> y_hi, bool sparse,
                                   const OptionalTensor& index_errors) {
  return EmbeddingDotBiasFunction::apply(users, items, u_weight, i_weight, u_bias, i_bias, y_lo, y_hi, sparse,
                                         index_errors);
}

}  // namespace
}  // namespace fastcore5

TORCH_LIBRARY_IMPL(fastcore5_native, Autograd, m) {
  m.impl("embedding_dot_bias", &fastcore5::embedding_dot_bias_autograd);
}
