// The CUDA kernels of linear_relu_forward and linear_relu_backward (the autograd op linear_relu crosses
// autograd in csrc/linear_relu_autograd.cpp, for every device).
//
// Checks every argument (checks.h), brings operands into layouts cuBLASLt reads in place,
// allocates the outputs and calls the launchers of csrc/linear_relu.cu. allow_tf32 is decided in
// Python (fastcore5.kernels._common.fp32_matmul_allows_tf32()) and passed down: reading
// at::globalContext().allowTF32CuBLAS() here would throw once torch's fp32_precision API is used.
#include "checks.h"
#include "linear_relu_checks.h"
#include "fastcore5.h"
#include "ops.h"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

namespace fastcore5 {

namespace {

// A 2-D matrix cuBLASLt can read in place: one unit stride and a valid leading dimension;
// anything else (broadcast, sliced in both dims, ...) is copied once.
Tensor with_unit_stride(const Tensor& t) {
  const int64_t R = t.size(0), C = t.size(1);
  const bool row_major = t.stride(1) == 1 && t.stride(0) >= std::max<int64_t>(1, C);
  const bool col_major = t.stride(0) == 1 && t.stride(1) >= std::max<int64_t>(1, R);
  return row_major || col_major ? t : t.contiguous();
}

}  // namespace

Tensor linear_relu_forward(const Tensor& x, const Tensor& weight, const OptionalTensor& bias, bool allow_tf32) {
  const auto [M, N, K] = check_linear_relu_forward(c10::kCUDA, x, weight, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor out = new_output({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  if (K == 0) {  // no products: relu(bias) in every row, or zeros
    if (bias.has_value()) {
      out.copy_(bias->clamp_min(0).expand({M, N}));
    } else {
      out.zero_();
    }
    return out;
  }
  const Tensor b = bias.has_value() ? bias->contiguous() : Tensor();
  linear_relu_forward_cuda(with_unit_stride(x), with_unit_stride(weight), b, out, allow_tf32);
  return out;
}

std::tuple<Tensor, Tensor, Tensor> linear_relu_backward(const Tensor& grad_out, const Tensor& out,
                                                        const OptionalTensor& x, const OptionalTensor& weight,
                                                        bool need_input_grad, bool need_weight_grad,
                                                        bool need_bias_grad, bool allow_tf32) {
  const auto [M, N, K] = check_linear_relu_backward(c10::kCUDA, grad_out, out, x, weight, need_input_grad, need_weight_grad);
  const c10::cuda::CUDAGuard guard(out.device());
  const auto options = out.options();
  Tensor grad_x = need_input_grad ? new_output({M, K}, options) : at::empty({0}, options);
  Tensor grad_w = need_weight_grad ? new_output({N, K}, options) : at::empty({0}, options);
  Tensor grad_b = need_bias_grad ? new_output({N}, options) : at::empty({0}, options);

  // g = grad_out * (out > 0) is materialised only when a matmul consumes it. contiguous() is a
  // no-op (no copy) for the usual contiguous grad_out and out.
  const bool need_masked = (need_input_grad || need_weight_grad) && M > 0 && N > 0 && K > 0;
  Tensor masked = need_masked ? at::empty({M, N}, options) : Tensor();
  if (M > 0 && N > 0 && (need_masked || need_bias_grad)) {
    relu_mask_and_bias_grad_cuda(grad_out.contiguous(), out.contiguous(), masked, need_bias_grad ? grad_b : Tensor());
  } else if (need_bias_grad) {
    grad_b.zero_();  // M == 0: an empty sum (N == 0: nothing to write)
  }
  if (need_input_grad && M > 0 && K > 0) {
    if (N == 0) {
      grad_x.zero_();
    } else {
      matmul_cuda(masked, with_unit_stride(*weight), grad_x, allow_tf32);
    }
  }
  if (need_weight_grad && N > 0 && K > 0) {
    if (M == 0) {
      grad_w.zero_();
    } else {
      matmul_cuda(masked.t(), with_unit_stride(*x), grad_w, allow_tf32);
    }
  }
  return {grad_x, grad_w, grad_b};
}

}  // namespace fastcore5
