// The argument checks of linear_relu_forward and linear_relu_backward, shared by the CUDA op
// (csrc/linear_relu_op.cpp) and the CPU kernels (csrc/cpu/linear_relu.cpp): one message per
// failure, the same on every device (checks.h).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "checks.h"

namespace fastcore5 {

// The extents of the GEMMs: x or grad_x (M, K), weight (N, K), out (M, N).
struct LinearReLUExtents {
  int64_t M, N, K;
};

// x (M, K), weight (N, K), bias (N,) or none, all on ``device_type`` with x's dtype.
inline LinearReLUExtents check_linear_relu_forward(c10::DeviceType device_type, const at::Tensor& x,
                                                   const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "fastcore5_native::linear_relu_forward";
  check_device_type(op, "x", x, device_type);
  check_floating(op, "x", x);
  check_dim(op, "x", x, 2);
  check_dim(op, "weight", weight, 2);
  check_like(op, "weight", weight, "x", x);
  const int64_t K = x.size(1), N = weight.size(0);
  if (weight.size(1) != K) fail(ArgError::kValue, op, ": x has ", K, " features but weight has in_features=", weight.size(1));
  if (bias.has_value()) {
    check_dim(op, "bias", *bias, 1);
    check_like(op, "bias", *bias, "x", x);
    if (bias->size(0) != N) {
      fail(ArgError::kValue, op, ": bias has ", bias->size(0), " elements but weight has out_features=", N);
    }
  }
  return {x.size(0), N, K};
}

// grad_out and out (M, N); x (M, K) and weight (N, K) when given, each required by the gradient
// that needs it. K is 0 when neither x nor weight is given (only grad_bias can be asked for).
inline LinearReLUExtents check_linear_relu_backward(c10::DeviceType device_type, const at::Tensor& grad_out,
                                                    const at::Tensor& out, const std::optional<at::Tensor>& x,
                                                    const std::optional<at::Tensor>& weight, bool need_input_grad,
                                                    bool need_weight_grad) {
  constexpr const char* op = "fastcore5_native::linear_relu_backward";
  check_device_type(op, "out", out, device_type);
  check_floating(op, "out", out);
  check_dim(op, "out", out, 2);
  check_like(op, "grad_out", grad_out, "out", out);
  if (grad_out.sizes() != out.sizes()) {
    fail(ArgError::kValue, op, ": grad_out has shape ", grad_out.sizes(), " but out has shape ", out.sizes());
  }
  const int64_t M = out.size(0), N = out.size(1);
  if (need_input_grad && !weight.has_value()) fail(ArgError::kValue, op, ": weight is needed for the input gradient");
  if (need_weight_grad && !x.has_value()) fail(ArgError::kValue, op, ": x is needed for the weight gradient");
  if (x.has_value()) {
    check_dim(op, "x", *x, 2);
    check_like(op, "x", *x, "out", out);
    if (x->size(0) != M) fail(ArgError::kValue, op, ": x has ", x->size(0), " rows but out has ", M);
  }
  if (weight.has_value()) {
    check_dim(op, "weight", *weight, 2);
    check_like(op, "weight", *weight, "out", out);
    if (weight->size(0) != N) fail(ArgError::kValue, op, ": weight has ", weight->size(0), " rows but out has ", N, " columns");
  }
  const int64_t K = x.has_value() ? x->size(1) : weight.has_value() ? weight->size(1) : 0;
  if (x.has_value() && weight.has_value() && weight->size(1) != K) {
    fail(ArgError::kValue, op, ": x has ", K, " features but weight has ", weight->size(1));
  }
  return {M, N, K};
}

}  // namespace fastcore5
