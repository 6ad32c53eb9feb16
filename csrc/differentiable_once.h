// The C++ autograd ops' double-backward refusal: the gradients, made to raise the error every
// backend raises (fastcore5/ops/_once.py words it for the Python backends; the tests match both)
// when differentiated, because the backward ops are not themselves differentiable. Only when the
// backward is recorded (create_graph=True with a gradient that requires grad), as
// _once.not_twice_differentiable does.
#pragma once

#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>

#include <string>
#include <utility>

namespace fastcore5 {

inline torch::autograd::variable_list differentiable_once(const char* op, torch::autograd::variable_list grads,
                                                          const torch::autograd::variable_list& grad_outputs) {
  bool recorded = false;
  for (const at::Tensor& g : grad_outputs) recorded = recorded || (g.defined() && g.requires_grad());
  if (!recorded || !at::GradMode::is_enabled()) return grads;
  for (at::Tensor& g : grads) {
    if (g.defined()) g = g.detach().requires_grad_();
  }
  const std::string name(op);
  torch::autograd::DelayedError error("fastcore5." + name + " is differentiable once: double backward (differentiating a "
                                      "gradient taken with create_graph=True) is not supported on any backend; use "
                                      "fastcore5.reference." + name + " for that",
                                      static_cast<int64_t>(grads.size()));
  return error.apply(std::move(grads));
}

}  // namespace fastcore5
