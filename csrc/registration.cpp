// The torch ops of the CUDA C++ backend: namespace fastcore5_cuda, one CUDA kernel per op.
//
// Each op takes the same arguments, in the same order, and returns the same results as the
// Triton launcher of the same name in fastcore5.kernels (so fastcore5/ops/*.py call either one):
//   linear_relu_forward, linear_relu_backward                kernels/linear_relu.py
//   embedding_dot_bias_forward, embedding_dot_bias_backward  kernels/embedding_dot_bias.py
//   sgd_forward                                              kernels/sgd.py
// Where a launcher returns None for a gradient that was not asked for, the op returns an empty
// tensor (an op cannot return None); the Python op layer maps it back.
//
// This file owns the op boundary: argument checks whose messages name the argument, the device
// guard, layout normalisation, output allocation and global settings (TF32). The kernels in the
// .cu files see only validated tensors. Fake (meta) implementations for torch.compile and
// opcheck live in fastcore5/_cuda_ops.py.
//
// FASTCORE5_POISON=1 (set by the test suite) fills every uninitialised output with NaN before a
// kernel runs, as the Triton launchers do, so an element a kernel forgets to write fails a test.
#include <Python.h>

#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "fastcore5.h"

namespace fastcore5 {
namespace {

using at::Tensor;

// ---- argument checks: every message names the op and the argument ----

void check_cuda(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got a ", t.device().type(), " tensor");
}

void check_floating(const char* op, const char* name, const Tensor& t) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, op,
                   ": ", name, " has dtype ", dtype, "; expected float32, float64, float16 or bfloat16");
}

void check_dim(const char* op, const char* name, const Tensor& t, int64_t dim) {
  TORCH_CHECK_VALUE(t.dim() == dim, op, ": ", name, " must have ", dim, " dimensions, got shape ", t.sizes());
}

void check_like(const char* op, const char* name, const Tensor& t, const char* ref_name, const Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device());
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), " but ",
                   ref_name, " has dtype ", ref.scalar_type());
}

void check_index(const char* op, const char* name, const Tensor& t) {
  check_cuda(op, name, t);
  check_dim(op, name, t, 1);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, op, ": ", name, " has dtype ",
                   t.scalar_type(), "; expected int32 or int64");
}

bool poison_outputs() {
  const char* value = std::getenv("FASTCORE5_POISON");
  return value != nullptr && std::strcmp(value, "1") == 0;
}

Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  Tensor out = at::empty(sizes, options);
  if (poison_outputs()) out.fill_(std::numeric_limits<double>::quiet_NaN());
  return out;
}

// A 2-D matrix cuBLASLt can read in place: one unit stride and a valid leading dimension;
// anything else (broadcast, sliced in both dims, ...) is copied once.
Tensor with_unit_stride(const Tensor& t) {
  const int64_t R = t.size(0), C = t.size(1);
  const bool row_major = t.stride(1) == 1 && t.stride(0) >= std::max<int64_t>(1, C);
  const bool col_major = t.stride(0) == 1 && t.stride(1) >= std::max<int64_t>(1, R);
  return row_major || col_major ? t : t.contiguous();
}

bool allow_tf32() {
  // What torch.backends.cuda.matmul.allow_tf32 sets; read per call, as torch's own matmul does.
  return at::globalContext().allowTF32CuBLAS();
}

// ---------------------------------------------------------------------------------------------
// Linear + ReLU
// ---------------------------------------------------------------------------------------------

Tensor linear_relu_forward(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias) {
  constexpr const char* op = "fastcore5_cuda::linear_relu_forward";
  check_cuda(op, "x", x);
  check_floating(op, "x", x);
  check_dim(op, "x", x, 2);
  check_dim(op, "weight", weight, 2);
  check_like(op, "weight", weight, "x", x);
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK_VALUE(weight.size(1) == K, op, ": x has ", K, " features but weight has in_features=", weight.size(1));
  if (bias.has_value()) {
    check_dim(op, "bias", *bias, 1);
    check_like(op, "bias", *bias, "x", x);
    TORCH_CHECK_VALUE(bias->size(0) == N, op, ": bias has ", bias->size(0), " elements but weight has out_features=",
                      N);
  }
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
  linear_relu_forward_cuda(with_unit_stride(x), with_unit_stride(weight), b, out, allow_tf32());
  return out;
}

std::tuple<Tensor, Tensor, Tensor> linear_relu_backward(const Tensor& grad_out, const Tensor& out,
                                                        const std::optional<Tensor>& x,
                                                        const std::optional<Tensor>& weight, bool need_input_grad,
                                                        bool need_weight_grad, bool need_bias_grad) {
  constexpr const char* op = "fastcore5_cuda::linear_relu_backward";
  check_cuda(op, "out", out);
  check_floating(op, "out", out);
  check_dim(op, "out", out, 2);
  check_like(op, "grad_out", grad_out, "out", out);
  TORCH_CHECK_VALUE(grad_out.sizes() == out.sizes(), op, ": grad_out has shape ", grad_out.sizes(),
                    " but out has shape ", out.sizes());
  const int64_t M = out.size(0), N = out.size(1);
  TORCH_CHECK_VALUE(!need_input_grad || weight.has_value(), op, ": weight is needed for the input gradient");
  TORCH_CHECK_VALUE(!need_weight_grad || x.has_value(), op, ": x is needed for the weight gradient");
  TORCH_CHECK_VALUE(x.has_value() || weight.has_value(), op, ": one of x and weight must be given");
  if (x.has_value()) {
    check_dim(op, "x", *x, 2);
    check_like(op, "x", *x, "out", out);
    TORCH_CHECK_VALUE(x->size(0) == M, op, ": x has ", x->size(0), " rows but out has ", M);
  }
  if (weight.has_value()) {
    check_dim(op, "weight", *weight, 2);
    check_like(op, "weight", *weight, "out", out);
    TORCH_CHECK_VALUE(weight->size(0) == N, op, ": weight has ", weight->size(0), " rows but out has ", N,
                      " columns");
  }
  const int64_t K = x.has_value() ? x->size(1) : weight->size(1);
  if (x.has_value() && weight.has_value()) {
    TORCH_CHECK_VALUE(weight->size(1) == K, op, ": x has ", K, " features but weight has ", weight->size(1));
  }
  const c10::cuda::CUDAGuard guard(out.device());
  const auto options = out.options();
  Tensor grad_x = need_input_grad ? new_output({M, K}, options) : at::empty({0}, options);
  Tensor grad_w = need_weight_grad ? new_output({N, K}, options) : at::empty({0}, options);
  Tensor grad_b = need_bias_grad ? new_output({N}, options) : at::empty({0}, options);
  const bool tf32 = allow_tf32();

  // g = grad_out * (out > 0) is materialised only when a matmul consumes it.
  const bool need_masked = (need_input_grad || need_weight_grad) && M > 0 && N > 0 && K > 0;
  Tensor masked = need_masked ? at::empty({M, N}, options) : Tensor();
  if (M > 0 && N > 0 && (need_masked || need_bias_grad)) {
    relu_mask_and_bias_grad_cuda(grad_out.contiguous(), out.contiguous(), masked,
                                 need_bias_grad ? grad_b : Tensor());
  } else if (need_bias_grad) {
    grad_b.zero_();  // M == 0: an empty sum (N == 0: nothing to write)
  }
  if (need_input_grad && M > 0 && K > 0) {
    if (N == 0) {
      grad_x.zero_();
    } else {
      matmul_cuda(masked, with_unit_stride(*weight), grad_x, tf32);
    }
  }
  if (need_weight_grad && N > 0 && K > 0) {
    if (M == 0) {
      grad_w.zero_();
    } else {
      matmul_cuda(masked.t(), with_unit_stride(*x), grad_w, tf32);
    }
  }
  return {grad_x, grad_w, grad_b};
}

// ---------------------------------------------------------------------------------------------
// EmbeddingDotBias
// ---------------------------------------------------------------------------------------------

void check_table(const char* op, const char* name, const Tensor& t, const char* ref_name, const Tensor& ref) {
  check_cuda(op, name, t);
  check_floating(op, name, t);
  check_dim(op, name, t, 2);
  check_like(op, name, t, ref_name, ref);
}

void check_bias(const char* op, const char* name, const Tensor& t, const char* ref_name, const Tensor& ref,
                std::optional<int64_t> rows) {
  check_like(op, name, t, ref_name, ref);
  TORCH_CHECK_VALUE(t.dim() == 1 || (t.dim() == 2 && t.size(1) == 1), op, ": ", name,
                    " must have shape (n,) or (n, 1), got ", t.sizes());
  if (rows.has_value()) {
    TORCH_CHECK_VALUE(t.size(0) == *rows, op, ": ", name, " has ", t.size(0), " rows but its embedding table has ",
                      *rows);
  }
}

std::pair<bool, std::pair<double, double>> y_range(const char* op, const std::optional<double>& y_lo,
                                                   const std::optional<double>& y_hi) {
  TORCH_CHECK_VALUE(y_lo.has_value() == y_hi.has_value(), op, ": y_lo and y_hi must both be given or both be None");
  return {y_lo.has_value(), {y_lo.value_or(0.0), y_hi.value_or(0.0)}};
}

Tensor embedding_dot_bias_forward(const Tensor& users, const Tensor& items, const Tensor& u_weight,
                                  const Tensor& i_weight, const Tensor& u_bias, const Tensor& i_bias,
                                  std::optional<double> y_lo, std::optional<double> y_hi) {
  constexpr const char* op = "fastcore5_cuda::embedding_dot_bias_forward";
  check_index(op, "users", users);
  check_index(op, "items", items);
  TORCH_CHECK_VALUE(users.size(0) == items.size(0), op, ": users has ", users.size(0), " entries but items has ",
                    items.size(0));
  check_table(op, "u_weight", u_weight, "u_weight", u_weight);
  check_table(op, "i_weight", i_weight, "u_weight", u_weight);
  TORCH_CHECK(users.device() == u_weight.device() && items.device() == u_weight.device(), op,
              ": users and items must be on the tables' device ", u_weight.device());
  TORCH_CHECK_VALUE(u_weight.size(1) == i_weight.size(1), op, ": u_weight has ", u_weight.size(1),
                    " factors but i_weight has ", i_weight.size(1));
  check_bias(op, "u_bias", u_bias, "u_weight", u_weight, u_weight.size(0));
  check_bias(op, "i_bias", i_bias, "u_weight", u_weight, i_weight.size(0));
  const auto [has_range, bounds] = y_range(op, y_lo, y_hi);
  const c10::cuda::CUDAGuard guard(u_weight.device());
  Tensor out = new_output({users.size(0)}, u_weight.options());
  embedding_dot_bias_forward_cuda(users, items, u_weight, i_weight, u_bias, i_bias, has_range, bounds.first,
                                  bounds.second, out);
  return out;
}

enum PerSampleMode { kCoef = 0, kAtomic = 1, kSparse = 2 };

std::tuple<Tensor, Tensor, Tensor, Tensor> embedding_dot_bias_backward(
    const Tensor& grad_out, const Tensor& users, const Tensor& items, const std::optional<Tensor>& u_weight,
    const std::optional<Tensor>& i_weight, const std::optional<Tensor>& u_bias, const std::optional<Tensor>& i_bias,
    int64_t num_users, int64_t num_items, std::optional<double> y_lo, std::optional<double> y_hi, bool need_u_weight,
    bool need_i_weight, bool need_u_bias, bool need_i_bias, bool deterministic, bool sparse) {
  constexpr const char* op = "fastcore5_cuda::embedding_dot_bias_backward";
  check_cuda(op, "grad_out", grad_out);
  check_floating(op, "grad_out", grad_out);
  check_dim(op, "grad_out", grad_out, 1);
  check_index(op, "users", users);
  check_index(op, "items", items);
  const int64_t B = users.size(0);
  TORCH_CHECK_VALUE(items.size(0) == B && grad_out.size(0) == B, op, ": users, items and grad_out must have one entry "
                    "per sample, got ", B, ", ", items.size(0), " and ", grad_out.size(0));
  TORCH_CHECK(users.device() == grad_out.device() && items.device() == grad_out.device(), op,
              ": users and items must be on grad_out's device ", grad_out.device());
  const auto [has_range, bounds] = y_range(op, y_lo, y_hi);
  TORCH_CHECK_VALUE(!need_u_weight || i_weight.has_value(), op, ": i_weight is needed for the gradient of u_weight");
  TORCH_CHECK_VALUE(!need_i_weight || u_weight.has_value(), op, ": u_weight is needed for the gradient of i_weight");
  TORCH_CHECK_VALUE(!has_range || (u_weight.has_value() && i_weight.has_value() && u_bias.has_value() &&
                                   i_bias.has_value()),
                    op, ": with a y_range all four tables are needed to recompute the score");
  if (u_weight.has_value()) {
    check_table(op, "u_weight", *u_weight, "grad_out", grad_out);
    TORCH_CHECK_VALUE(u_weight->size(0) == num_users, op, ": u_weight has ", u_weight->size(0),
                      " rows but num_users is ", num_users);
  }
  if (i_weight.has_value()) {
    check_table(op, "i_weight", *i_weight, "grad_out", grad_out);
    TORCH_CHECK_VALUE(i_weight->size(0) == num_items, op, ": i_weight has ", i_weight->size(0),
                      " rows but num_items is ", num_items);
  }
  if (u_weight.has_value() && i_weight.has_value()) {
    TORCH_CHECK_VALUE(u_weight->size(1) == i_weight->size(1), op, ": u_weight has ", u_weight->size(1),
                      " factors but i_weight has ", i_weight->size(1));
  }
  if (u_bias.has_value()) check_bias(op, "u_bias", *u_bias, "grad_out", grad_out, num_users);
  if (i_bias.has_value()) check_bias(op, "i_bias", *i_bias, "grad_out", grad_out, num_items);
  const int64_t D = u_weight.has_value() ? u_weight->size(1) : i_weight.has_value() ? i_weight->size(1) : 0;
  const auto table = [](const std::optional<Tensor>& t) { return t.has_value() ? *t : Tensor(); };
  const Tensor U = table(u_weight), V = table(i_weight), ub = table(u_bias), ib = table(i_bias);
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const auto options = grad_out.options();
  const auto acc_options = options.dtype(grad_out.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  const auto unused = [&] { return at::empty({0}, options); };

  if (sparse) {
    Tensor uw = need_u_weight ? new_output({B, D}, options) : unused();
    Tensor iw = need_i_weight ? new_output({B, D}, options) : unused();
    Tensor ubv = need_u_bias ? new_output({B}, options) : unused();
    Tensor ibv = need_i_bias ? new_output({B}, options) : unused();
    if (need_u_weight || need_i_weight || need_u_bias || need_i_bias) {
      embedding_dot_bias_per_sample_cuda(grad_out, users, items, U, V, ub, ib, D, has_range, bounds.first,
                                         bounds.second, kSparse, Tensor(), need_u_weight ? uw : Tensor(),
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
    if (B == 0 || !(need_u_weight || need_i_weight || need_u_bias || need_i_bias)) return {uw, iw, ubg, ibg};
    Tensor coef = at::empty({B}, acc_options);
    embedding_dot_bias_per_sample_cuda(grad_out, users, items, U, V, ub, ib, D, has_range, bounds.first, bounds.second,
                                       kCoef, coef, Tensor(), Tensor(), Tensor(), Tensor());
    if (need_u_weight || need_u_bias) {
      const auto [sorted, order] = at::sort(users, /*stable=*/true, /*dim=*/0, /*descending=*/false);
      embedding_segment_reduce_cuda(sorted, order, coef, items, need_u_weight ? V : Tensor(), D,
                                    need_u_weight ? uw : Tensor(), need_u_bias ? ubg : Tensor());
    }
    if (need_i_weight || need_i_bias) {
      const auto [sorted, order] = at::sort(items, /*stable=*/true, /*dim=*/0, /*descending=*/false);
      embedding_segment_reduce_cuda(sorted, order, coef, users, need_i_weight ? U : Tensor(), D,
                                    need_i_weight ? iw : Tensor(), need_i_bias ? ibg : Tensor());
    }
    return {uw, iw, ubg, ibg};
  }

  // Atomic path: bf16/fp16 accumulate in fp32 and are rounded once at the end.
  Tensor uw = need_u_weight ? at::zeros({num_users, D}, acc_options) : Tensor();
  Tensor iw = need_i_weight ? at::zeros({num_items, D}, acc_options) : Tensor();
  Tensor ubg = need_u_bias ? at::zeros({num_users}, acc_options) : Tensor();
  Tensor ibg = need_i_bias ? at::zeros({num_items}, acc_options) : Tensor();
  if (B > 0 && (need_u_weight || need_i_weight || need_u_bias || need_i_bias)) {
    embedding_dot_bias_per_sample_cuda(grad_out, users, items, U, V, ub, ib, D, has_range, bounds.first, bounds.second,
                                       kAtomic, Tensor(), uw, iw, ubg, ibg);
  }
  const auto finish = [&](const Tensor& acc) { return acc.defined() ? acc.to(grad_out.scalar_type()) : unused(); };
  return {finish(uw), finish(iw), finish(ubg), finish(ibg)};
}

// ---------------------------------------------------------------------------------------------
// SGD
// ---------------------------------------------------------------------------------------------

void check_dense_like(const char* op, const char* list, size_t i, const Tensor& t, const Tensor& param) {
  const std::string name = std::string(list) + "[" + std::to_string(i) + "]";
  check_cuda(op, name.c_str(), t);
  check_like(op, name.c_str(), t, "params[0]", param);
  TORCH_CHECK_VALUE(t.sizes() == param.sizes() && t.strides() == param.strides(), op, ": ", name, " has shape ",
                    t.sizes(), " and strides ", t.strides(), " but params[", i, "] has shape ", param.sizes(),
                    " and strides ", param.strides());
  TORCH_CHECK_VALUE(t.is_non_overlapping_and_dense(), op, ": ", name,
                    " must be dense (contiguous or channels-last), got strides ", t.strides());
}

void check_scalar_tensor(const char* op, const char* name, const std::optional<Tensor>& t, const Tensor& param) {
  if (!t.has_value()) return;
  check_floating(op, name, *t);
  TORCH_CHECK_VALUE(t->numel() == 1, op, ": ", name, " must have exactly one element, got shape ", t->sizes());
  TORCH_CHECK(t->device() == param.device(), op, ": ", name, " is on ", t->device(), " but params are on ",
              param.device());
}

void sgd_forward(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                 const std::optional<Tensor>& lr_tensor, double lr, double momentum, double dampening,
                 double weight_decay, bool nesterov, bool maximize, bool decoupled_weight_decay, bool first_step,
                 const std::optional<Tensor>& grad_scale, const std::optional<Tensor>& found_inf) {
  constexpr const char* op = "fastcore5_cuda::sgd_forward";
  if (params.empty()) return;
  TORCH_CHECK_VALUE(grads.size() == params.size(), op, ": got ", params.size(), " params but ", grads.size(),
                    " grads");
  const bool has_momentum = momentum != 0.0;
  TORCH_CHECK_VALUE(!has_momentum || momentum_buffers.size() == params.size(), op, ": got ", params.size(),
                    " params but ", momentum_buffers.size(), " momentum_buffers");
  const Tensor& first = params[0];
  check_cuda(op, "params[0]", first);
  check_floating(op, "params[0]", first);
  for (size_t i = 0; i < params.size(); ++i) {
    check_dense_like(op, "params", i, params[i], params[i]);
    check_like(op, ("params[" + std::to_string(i) + "]").c_str(), params[i], "params[0]", first);
    check_dense_like(op, "grads", i, grads[i], params[i]);
    if (has_momentum) check_dense_like(op, "momentum_buffers", i, momentum_buffers[i], params[i]);
  }
  check_scalar_tensor(op, "lr_tensor", lr_tensor, first);
  check_scalar_tensor(op, "grad_scale", grad_scale, first);
  check_scalar_tensor(op, "found_inf", found_inf, first);
  const c10::cuda::CUDAGuard guard(first.device());

  const std::vector<at::TensorBase> p(params.begin(), params.end());
  const std::vector<at::TensorBase> g(grads.begin(), grads.end());
  const std::vector<at::TensorBase> b =
      has_momentum ? std::vector<at::TensorBase>(momentum_buffers.begin(), momentum_buffers.end())
                   : std::vector<at::TensorBase>();
  int64_t total_chunks = 0;
  const std::vector<int64_t> layout = sgd_metadata_layout(p, g, b, &total_chunks);
  if (total_chunks == 0) return;
  // One pinned staging buffer and one asynchronous copy: the host never waits for the device.
  // The caching host allocator keeps the pinned block alive until the copy has run.
  Tensor staging = at::empty({static_cast<int64_t>(layout.size())},
                             at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::memcpy(staging.data_ptr<int64_t>(), layout.data(), layout.size() * sizeof(int64_t));
  const Tensor metadata = staging.to(first.device(), /*non_blocking=*/true);

  SgdOptions options;
  options.lr = lr;
  options.momentum = momentum;
  options.dampening = dampening;
  options.weight_decay = weight_decay;
  options.nesterov = nesterov;
  options.maximize = maximize;
  options.decoupled_weight_decay = decoupled_weight_decay;
  options.first_step = first_step;
  const auto optional = [](const std::optional<Tensor>& t) { return t.has_value() ? *t : Tensor(); };
  sgd_step_cuda(p, metadata, optional(lr_tensor), optional(grad_scale), optional(found_inf), total_chunks, options);
}

}  // namespace
}  // namespace fastcore5

TORCH_LIBRARY(fastcore5_cuda, m) {
  // The fake (meta) implementations are registered from Python, by this module (imported by
  // fastcore5.backends.cuda_extension); torch requires a C++-defined op to name it.
  m.set_python_module("fastcore5._cuda_ops");
  m.def("linear_relu_forward(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def(
      "linear_relu_backward(Tensor grad_out, Tensor out, Tensor? x, Tensor? weight, bool need_input_grad, "
      "bool need_weight_grad, bool need_bias_grad) -> (Tensor, Tensor, Tensor)");
  m.def(
      "embedding_dot_bias_forward(Tensor users, Tensor items, Tensor u_weight, Tensor i_weight, Tensor u_bias, "
      "Tensor i_bias, float? y_lo, float? y_hi) -> Tensor");
  m.def(
      "embedding_dot_bias_backward(Tensor grad_out, Tensor users, Tensor items, Tensor? u_weight, Tensor? i_weight, "
      "Tensor? u_bias, Tensor? i_bias, int num_users, int num_items, float? y_lo, float? y_hi, bool need_u_weight, "
      "bool need_i_weight, bool need_u_bias, bool need_i_bias, bool deterministic, bool sparse) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "sgd_forward(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] momentum_buffers, Tensor? lr_tensor, "
      "float lr, float momentum, float dampening, float weight_decay, bool nesterov, bool maximize, "
      "bool decoupled_weight_decay, bool first_step, Tensor? grad_scale, Tensor? found_inf) -> ()");
}

TORCH_LIBRARY_IMPL(fastcore5_cuda, CUDA, m) {
  m.impl("linear_relu_forward", &fastcore5::linear_relu_forward);
  m.impl("linear_relu_backward", &fastcore5::linear_relu_backward);
  m.impl("embedding_dot_bias_forward", &fastcore5::embedding_dot_bias_forward);
  m.impl("embedding_dot_bias_backward", &fastcore5::embedding_dot_bias_backward);
  m.impl("sgd_forward", &fastcore5::sgd_forward);
}

// `import fastcore5._C` loads this library, whose static initialisers above register the ops;
// the module itself is empty (no pybind11: the ops are reached through torch.ops.fastcore5_cuda).
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fastcore5's CUDA C++ ops, registered as torch.ops.fastcore5_cuda", -1, nullptr};
  return PyModule_Create(&module);
}
