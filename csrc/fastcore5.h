// The boundary between the op layer (csrc/*_op.cpp) and the CUDA files.
//
// The op layer owns the op contract: it checks every argument (errors name the argument),
// brings operands into the layouts the kernels accept and allocates outputs; settings such as
// allow_tf32 arrive as arguments. The .cu files own the kernels and their launchers and see
// only validated tensors. This split keeps the .cu files on ATen/core/TensorBase.h instead of
// the full at::Tensor API, which roughly halves their nvcc time (the compile check in CI
// builds every file; see tests/test_cuda_compile.py).
#pragma once

#include <ATen/core/TensorBase.h>

#include <cstdint>
#include <vector>

namespace fastcore5 {

// ---- Linear + ReLU (csrc/linear_relu.cu) ----

// out (M, N) = relu(x (M, K) @ weight (N, K)^T + bias (N,)), written into ``out``.
// x and weight each have one unit stride (row- or column-major, any leading dimension);
// out is contiguous; K > 0; bias is undefined or contiguous of out's dtype.
void linear_relu_forward_cuda(
    const at::TensorBase& x, const at::TensorBase& weight, const at::TensorBase& bias,
    const at::TensorBase& out, bool allow_tf32);

// g = grad_out * (out > 0) into ``masked`` (when defined) and grad_bias = sum over rows of g
// (when defined). grad_out and out are contiguous (M, N); masked is contiguous (M, N).
void relu_mask_and_bias_grad_cuda(
    const at::TensorBase& grad_out, const at::TensorBase& out,
    const at::TensorBase& masked, const at::TensorBase& grad_bias);

// result (R, C) = a (R, I) @ b (I, C) with a and b each having one unit stride and result
// contiguous; fp32 accumulation (TF32 only when allow_tf32 and the inputs are fp32).
void matmul_cuda(const at::TensorBase& a, const at::TensorBase& b, const at::TensorBase& result, bool allow_tf32);

// ---- EmbeddingDotBias (csrc/embedding_dot_bias.cu) ----
// Tables: (n, D) of one floating dtype at any strides; bias tables one element per row at
// stride(0); users/items (B,) int32 or int64 at any stride, NOT checked: every kernel bounds-
// checks every index it reads (0 <= index < rows of its table) and a sample with a bad index
// reads and writes nothing out of bounds.

// index_errors: int64 (kIndexErrorSlots,) on the device, zero when created (fastcore5/index_errors.py):
//   0 bad indices (users and items together), atomic add
//   1 bad users indices, atomic add
//   2 smallest negative users index (0 if none), atomic min
//   3 largest users index >= rows (0 if none), atomic max
//   4 rows of u_weight, atomic max (every writer writes the same value)
//   5-8 the same four for items and i_weight
constexpr int kIndexErrorSlots = 9;

// Rows of the users' and items' tables: the bound every index is checked against.
struct IndexBounds {
  int64_t users, items;
};

// out (B,) contiguous = <U[users], V[items]> + ub[users] + ib[items], squashed by (lo, hi) when
// has_range; NaN for a sample with a bad index, recorded into index_errors when it is defined.
void embedding_dot_bias_forward_cuda(
    const at::TensorBase& users, const at::TensorBase& items,
    const at::TensorBase& u_weight, const at::TensorBase& i_weight,
    const at::TensorBase& u_bias, const at::TensorBase& i_bias,
    bool has_range, double lo, double hi, const at::TensorBase& out, const at::TensorBase& index_errors);

// Per-sample backward pass; ``mode`` is 0 (write coef (B,), acc dtype), 1 (atomically add into
// zero-filled acc-dtype accumulators out_uw (n_users, D), out_iw (n_items, D), out_ub (n_users,),
// out_ib (n_items,)) or 2 (write the per-sample sparse values (B, D), (B, D), (B,), (B,) in the
// table dtype). Undefined outputs are skipped. Tables not needed may be undefined: grads of U
// need V and vice versa; has_range needs all four. A sample with an index outside ``bounds``
// contributes nothing: coef 0, no atomic, sparse values 0.
void embedding_dot_bias_per_sample_cuda(
    const at::TensorBase& grad_out, const at::TensorBase& users, const at::TensorBase& items,
    const at::TensorBase& u_weight, const at::TensorBase& i_weight,
    const at::TensorBase& u_bias, const at::TensorBase& i_bias, int64_t D, IndexBounds bounds,
    bool has_range, double lo, double hi, int mode, const at::TensorBase& coef,
    const at::TensorBase& out_uw, const at::TensorBase& out_iw,
    const at::TensorBase& out_ub, const at::TensorBase& out_ib);

// Deterministic reduction for one table: with sorted_keys/order from a stable sort of the
// table's indices, grad_w[r] = sum over samples s with key r of coef[s] * partner_table[partners[s]]
// and grad_b[r] = sum of coef[s]; both contiguous, zero-filled, either may be undefined. Keys and
// partners must be in range (the op layer clamps them; a bad sample's coef is 0).
void embedding_segment_reduce_cuda(
    const at::TensorBase& sorted_keys, const at::TensorBase& order, const at::TensorBase& coef,
    const at::TensorBase& partners, const at::TensorBase& partner_table, int64_t D,
    const at::TensorBase& grad_w, const at::TensorBase& grad_b);

// ---- SGD (csrc/sgd.cu) ----

struct SgdOptions {
  double lr = 0.0;  // used when lr_tensor is undefined
  double momentum = 0.0;
  double dampening = 0.0;
  double weight_decay = 0.0;
  bool nesterov = false;
  bool maximize = false;
  bool decoupled_weight_decay = false;
  bool first_step = false;  // momentum buffers receive the gradient instead of being updated
};

// Host half of the launch: the int64 metadata for T tensors, 3*T addresses (param, grad,
// buffer; buffer 0 without momentum), T+1 prefix sums of per-tensor chunk counts, T element
// counts. registration.cpp copies it to the device in one transfer; *total_chunks is the grid.
std::vector<int64_t> sgd_metadata_layout(
    const std::vector<at::TensorBase>& params, const std::vector<at::TensorBase>& grads,
    const std::vector<at::TensorBase>& momentum_buffers, int64_t* total_chunks);

// One multi-tensor SGD step (one launch) over dense tensors of one dtype and device described
// by ``metadata`` (on the device). lr_tensor, grad_scale, found_inf: undefined or one-element
// floating tensors on the device; skip_flag: undefined or an int64 tensor on the device. A
// nonzero found_inf or skip_flag[0] skips the step entirely (nothing is written).
void sgd_step_cuda(
    const std::vector<at::TensorBase>& params, const at::TensorBase& metadata,
    const at::TensorBase& lr_tensor, const at::TensorBase& grad_scale, const at::TensorBase& found_inf,
    const at::TensorBase& skip_flag, int64_t total_chunks, const SgdOptions& options);

}  // namespace fastcore5
