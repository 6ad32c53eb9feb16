// The autograd kernel of fastcore5_native::linear_relu, for every device: built in every build (CPU
// only, CUDA only, both), so the cpu and cuda backends cross autograd in C++ the same way.
//
// An eager call from Python is then one dispatcher call: the public function calls
// torch.ops.fastcore5_native.linear_relu, whose Autograd kernel (below) either
//   - sees no input needing a gradient (or grad mode off) and goes straight to the device's
//     kernel of linear_relu_forward, without building a graph node, or
//   - applies LinearReLUFunction, whose forward and backward call linear_relu_forward and
//     linear_relu_backward through the dispatcher (under torch.compile they then resolve to the
//     fakes of fastcore5/_native_ops.py).
// Below autograd (inference mode) linear_relu is the device's forward kernel, registered beside it
// (csrc/cpu/linear_relu.cpp, csrc/registration.cpp).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <tuple>

#include "differentiable_once.h"
#include "ops.h"

namespace fastcore5 {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The kernel-level ops, reached through the dispatcher (not called directly): under
// torch.compile the autograd kernel runs on fake tensors and these resolve to the fakes.
const auto& forward_op() {
  static const auto handle = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("fastcore5_native::linear_relu_forward", "")
                                 .typed<Tensor(const Tensor&, const Tensor&, const OptionalTensor&, bool)>();
  return handle;
}

const auto& backward_op() {
  static const auto handle =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastcore5_native::linear_relu_backward", "")
          .typed<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const OptionalTensor&,
                                                    const OptionalTensor&, bool, bool, bool, bool)>();
  return handle;
}

// Saves only what the backward needs: out always (relu' = out > 0, never the pre-activation),
// weight only for grad_x, x only for grad_weight.
struct LinearReLUFunction : public torch::autograd::Function<LinearReLUFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const OptionalTensor& bias,
                        bool allow_tf32) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    Tensor out = forward_op().call(x, weight, bias, allow_tf32);
    const bool need_x = x.requires_grad(), need_w = weight.requires_grad();
    ctx->save_for_backward({out, need_x ? weight : Tensor(), need_w ? x : Tensor()});
    ctx->saved_data["allow_tf32"] = allow_tf32;
    ctx->saved_data["has_bias"] = bias.has_value();
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1);
    const bool need_b = has_bias && ctx->needs_input_grad(2);
    const Tensor& grad_out = grad_outputs[0];
    if (!grad_out.defined() || !(need_x || need_w || need_b)) return {Tensor(), Tensor(), Tensor(), Tensor()};
    Tensor grad_x, grad_w, grad_b;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;  // the backward op has no autograd of its own
      std::tie(grad_x, grad_w, grad_b) =
          backward_op().call(grad_out, saved[0], need_w ? OptionalTensor(saved[2]) : std::nullopt,
                             need_x ? OptionalTensor(saved[1]) : std::nullopt, need_x, need_w, need_b,
                             ctx->saved_data["allow_tf32"].toBool());
    }
    return differentiable_once(
        "linear_relu", {need_x ? grad_x : Tensor(), need_w ? grad_w : Tensor(), need_b ? grad_b : Tensor(), Tensor()}, grad_outputs);
  }
};

Tensor linear_relu_autograd(const Tensor& x, const Tensor& weight, const OptionalTensor& bias, bool allow_tf32) {
  const bool recorded = at::GradMode::is_enabled() &&
                        (x.requires_grad() || weight.requires_grad() || (bias.has_value() && bias->requires_grad()));
  if (!recorded) {  // no graph node to build: the forward kernel alone (most of a tiny call's time otherwise)
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return forward_op().call(x, weight, bias, allow_tf32);
  }
  return LinearReLUFunction::apply(x, weight, bias, allow_tf32);
}

}  // namespace
}  // namespace fastcore5

TORCH_LIBRARY_IMPL(fastcore5_native, Autograd, m) {
  m.impl("linear_relu", &fastcore5::linear_relu_autograd);
}
