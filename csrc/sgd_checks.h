// The argument checks of sgd_step, one set for its CUDA kernel (csrc/sgd_op.cpp) and its CPU
// kernel (csrc/cpu/sgd.cpp): the same errors, each naming the argument, on either device.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>

#include "checks.h"

namespace fastcore5 {

namespace sgd_detail {

inline void check_dense_like(const char* op, c10::DeviceType device_type, const char* list, size_t i,
                             const at::Tensor& t, const at::Tensor& param, const at::Tensor& first) {
  // The common case in one expression: the name is built (an allocation per tensor) only to fail.
  if (t.device().type() == device_type && t.device() == first.device() && t.scalar_type() == first.scalar_type() &&
      t.sizes() == param.sizes() && t.strides() == param.strides() && t.is_non_overlapping_and_dense()) {
    return;
  }
  const std::string name = std::string(list) + "[" + std::to_string(i) + "]";
  check_device_type(op, name, t, device_type);
  check_like(op, name, t, "params[0]", first);
  if (t.sizes() != param.sizes() || t.strides() != param.strides()) {
    fail(ArgError::kValue, op, ": ", name, " has shape ", t.sizes(), " and strides ", t.strides(), " but params[", i,
         "] has shape ", param.sizes(), " and strides ", param.strides());
  }
  fail(ArgError::kValue, op, ": ", name, " must be dense (contiguous or channels-last), got strides ", t.strides());
}

inline void check_scalar_tensor(const char* op, const char* name, const std::optional<at::Tensor>& t,
                                const at::Tensor& param) {
  if (!t.has_value()) return;
  check_floating(op, name, *t);
  if (t->numel() != 1) fail(ArgError::kValue, op, ": ", name, " must have exactly one element, got shape ", t->sizes());
  if (t->device() != param.device()) {
    fail(ArgError::kRuntime, op, ": ", name, " is on ", t->device(), " but params are on ", param.device());
  }
}

inline void check_skip_flag(const char* op, const std::optional<at::Tensor>& t, const at::Tensor& param) {
  if (!t.has_value()) return;
  if (t->scalar_type() != at::kLong) fail(ArgError::kType, op, ": skip_flag has dtype ", t->scalar_type(), "; expected int64");
  if (t->numel() < 1) fail(ArgError::kValue, op, ": skip_flag must have at least one element, got shape ", t->sizes());
  if (t->device() != param.device()) {
    fail(ArgError::kRuntime, op, ": skip_flag is on ", t->device(), " but params are on ", param.device());
  }
}

}  // namespace sgd_detail

// Every check of sgd_step but the empty list (which the kernels return on before calling this):
// lists of matching lengths; params, grads and (with momentum) buffers of one floating dtype, on
// ``device_type``, pairwise of one shape and strides, dense; the scalar tensors on the params' device.
inline void check_sgd_arguments(const char* op, c10::DeviceType device_type, at::TensorList params,
                                at::TensorList grads, at::TensorList momentum_buffers, bool has_momentum,
                                const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& grad_scale,
                                const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& skip_flag) {
  using namespace sgd_detail;
  if (grads.size() != params.size()) fail(ArgError::kValue, op, ": got ", params.size(), " params but ", grads.size(), " grads");
  if (has_momentum && momentum_buffers.size() != params.size()) {
    fail(ArgError::kValue, op, ": got ", params.size(), " params but ", momentum_buffers.size(), " momentum_buffers");
  }
  const at::Tensor& first = params[0];
  check_device_type(op, "params[0]", first, device_type);
  check_floating(op, "params[0]", first);
  for (size_t i = 0; i < params.size(); ++i) {
    check_dense_like(op, device_type, "params", i, params[i], params[i], first);
    check_dense_like(op, device_type, "grads", i, grads[i], params[i], first);
    if (has_momentum) check_dense_like(op, device_type, "momentum_buffers", i, momentum_buffers[i], params[i], first);
  }
  check_scalar_tensor(op, "lr_tensor", lr_tensor, first);
  check_scalar_tensor(op, "grad_scale", grad_scale, first);
  check_scalar_tensor(op, "found_inf", found_inf, first);
  check_skip_flag(op, skip_flag, first);
}

}  // namespace fastcore5
