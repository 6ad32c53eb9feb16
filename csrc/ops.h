// The torch ops of the CUDA C++ backend (namespace fastcore5_native), as C++ functions.
//
// csrc/registration.cpp gives them their schemas (fixed by the cross-team contract, listed
// there) and registers them for the CUDA and Autograd dispatch keys (the Autograd kernels of linear_relu
// and embedding_dot_bias are csrc/*_autograd.cpp, built for every device); csrc/*_op.cpp implement
// them: argument checks (checks.h), layout normalisation, output allocation, then the launchers
// of fastcore5.h. A gradient that was not asked for comes back from a *_backward op as an empty
// (0,) tensor (an op cannot return None); the autograd ops map it back to "no gradient".
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace fastcore5 {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;

// ---- linear_relu_op.cpp ----
Tensor linear_relu_forward(const Tensor& x, const Tensor& weight, const OptionalTensor& bias, bool allow_tf32);
std::tuple<Tensor, Tensor, Tensor> linear_relu_backward(const Tensor& grad_out, const Tensor& out,
                                                        const OptionalTensor& x, const OptionalTensor& weight,
                                                        bool need_input_grad, bool need_weight_grad,
                                                        bool need_bias_grad, bool allow_tf32);

// ---- embedding_dot_bias_op.cpp ----
Tensor embedding_dot_bias_forward(const Tensor& users, const Tensor& items, const Tensor& u_weight,
                                  const Tensor& i_weight, const Tensor& u_bias, const Tensor& i_bias,
                                  std::optional<double> y_lo, std::optional<double> y_hi,
                                  const OptionalTensor& index_errors);
std::tuple<Tensor, Tensor, Tensor, Tensor> embedding_dot_bias_backward(
    const Tensor& grad_out, const Tensor& users, const Tensor& items, const OptionalTensor& u_weight,
    const OptionalTensor& i_weight, const OptionalTensor& u_bias, const OptionalTensor& i_bias, int64_t num_users,
    int64_t num_items, std::optional<double> y_lo, std::optional<double> y_hi, bool need_u_weight,
    bool need_i_weight, bool need_u_bias, bool need_i_bias, bool deterministic, bool sparse);
// The CUDA kernel of embedding_dot_bias (no autograd: inference mode, or below the Autograd key).
Tensor embedding_dot_bias_inference(const Tensor& users, const Tensor& items, const Tensor& u_weight,
                                    const Tensor& i_weight, const Tensor& u_bias, const Tensor& i_bias,
                                    std::optional<double> y_lo, std::optional<double> y_hi, bool sparse,
                                    const OptionalTensor& index_errors);

// ---- sgd_op.cpp ----
void sgd_step(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
              const OptionalTensor& lr_tensor, double lr, double momentum, double dampening, double weight_decay,
              bool nesterov, bool maximize, bool decoupled_weight_decay, bool first_step,
              const OptionalTensor& grad_scale, const OptionalTensor& found_inf, const OptionalTensor& skip_flag);

}  // namespace fastcore5
