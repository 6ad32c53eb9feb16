// The CPU kernels of linear_relu_forward and linear_relu_backward: the contract of
// csrc/linear_relu_op.cpp (same checks, same empty-tensor answers) on CPU tensors.
//
// The GEMMs are PyTorch's: oneDNN's inner product (mkldnn::_linear_pointwise, the op torch's own
// CPU inductor path calls) for fp32 and bf16 when this torch has it, else at::mm / at::addmm (MKL
// or OpenBLAS; fp64 and fp16 always). On the 2-core AMD EPYC development machine oneDNN's GEMM
// ran these shapes about 2x faster than MKL's (bench/NOTES.md, "Linear+ReLU, CPU"). Around them
// everything is one pass over the (M, N) output:
//   forward   out = GEMM (bias added inside the GEMM, except on the at::mm path of fp32/fp64,
//             where the pass adds it), then relu in place: one read and one write of out, which
//             is also the backward's mask (relu' = out > 0), never the pre-activation.
//             On the oneDNN path oneDNN's own relu post-op replaces the pass (measured faster,
//             NOTES) whenever no NaN can arise (no_nan_possible): the post-op turns a NaN into 0,
//             where torch.relu keeps it, so inputs with a NaN or inf take the pass.
//   backward  masked = grad_out where not out <= 0 (a NaN output passes its gradient, as in
//             torch), else 0, and grad_bias = column sums of masked, in the same pass; then
//             grad_x = masked @ weight and grad_weight = masked^T @ x.
// The column sums are taken over fixed blocks of kBiasRows rows, the blocks' partial sums then
// added in block order: the bias gradient is bitwise the same for any thread count. The pass
// is elementwise otherwise, so whatever the thread count changes comes from the BLAS
// (tests/test_cpu_linear_relu.py says what it found).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

#include "../checks.h"
#include "../linear_relu_checks.h"

namespace fastcore5 {
namespace {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;

constexpr int64_t kBiasRows = 64;            // rows per partial column sum of the bias gradient
constexpr int64_t kElementsPerTask = 16384;  // at::parallel_for's grain, in elements of the pass
constexpr int64_t kPadding = 64;             // a row of partial sums is padded to whole vectors

// ---- the GEMMs ----

using OneDnnLinear = Tensor(const Tensor&, const Tensor&, const OptionalTensor&, c10::string_view,
                            c10::List<std::optional<c10::Scalar>>, std::optional<c10::string_view>);

// oneDNN's inner product y = x @ w^T (+ b), when this torch build registers it.
const std::optional<c10::TypedOperatorHandle<OneDnnLinear>>& onednn_linear() {
  static const auto handle = []() -> std::optional<c10::TypedOperatorHandle<OneDnnLinear>> {
    const auto schema = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
    if (!schema.has_value()) return std::nullopt;
    return schema->typed<OneDnnLinear>();
  }();
  return handle;
}

// fp16 is left out: oneDNN has no fp16 inner product on CPUs without AVX512-FP16 (it throws).
// oneDNN sets up a primitive on every call (13 us for a 4x8 @ 8x16 product on the 2-core dev
// machine, against 3 us for eager's whole linear+relu): below about 4M multiply-adds (some tens
// of microseconds of work) MKL's GEMM through at::mm is the faster way.
constexpr int64_t kOneDnnMinMultiplyAdds = int64_t{1} << 22;

bool use_onednn(c10::ScalarType dtype, int64_t rows, int64_t cols, int64_t inner) {
  return (dtype == at::kFloat || dtype == at::kBFloat16) && rows * cols * inner >= kOneDnnMinMultiplyAdds &&
         onednn_linear().has_value();
}

// a (R, I) @ b (C, I)^T (+ bias (C,)) as a new contiguous (R, C) tensor; R, C, I > 0.
Tensor matmul_transposed(const Tensor& a, const Tensor& b, const OptionalTensor& bias) {
  if (use_onednn(a.scalar_type(), a.size(0), b.size(0), a.size(1))) {
    return onednn_linear()->call(a, b, bias, "none", c10::List<std::optional<c10::Scalar>>(), std::nullopt);
  }
  Tensor result = new_output({a.size(0), b.size(0)}, a.options());
  if (bias.has_value()) {
    at::addmm_out(result, *bias, a, b.t());
  } else {
    at::mm_out(result, a, b.t());
  }
  return result;
}

// Whether relu(x @ w^T + b) cannot meet a NaN: every input finite and every |pre-activation|
// bounded (in_features * max|x| * max|w| + max|b|) by half the float range, so no inf - inf
// either. Then oneDNN's relu post-op (which turns a NaN into 0, where torch.relu keeps it) gives
// torch's values: one read of x and w (small next to the output's read and write it saves).
bool no_nan_possible(const Tensor& x, const Tensor& w, const Tensor& bias) {
  constexpr double kInf = std::numeric_limits<double>::infinity();
  const auto largest = [&](const Tensor& t) { return at::linalg_vector_norm(t, kInf).item<double>(); };
  const double bound = static_cast<double>(x.size(1)) * largest(x) * largest(w) + (bias.defined() ? largest(bias) : 0.0);
  return std::isfinite(bound) && bound < 0.5 * static_cast<double>(std::numeric_limits<float>::max());
}

// ---- the vector passes ----

template <typename scalar_t>
using OpVec = at::vec::Vectorized<at::opmath_type<scalar_t>>;

// relu that keeps a NaN, as torch.relu does (a max instruction may return the 0).
template <typename V>
V relu(const V& v) {
  return V::blendv(v, V(0), v < V(0));
}

// grad where not out <= 0, else 0: the gradient of a NaN output passes, as in torch.
template <typename V>
V masked(const V& grad, const V& out) {
  return V::blendv(grad, V(0), out <= V(0));
}

// out (M, N) contiguous = relu(out + bias), in place; bias null or (N,) contiguous, given only
// for fp32/fp64 (the GEMM adds it in bf16/fp16, rounding once).
template <typename scalar_t>
void bias_relu_(scalar_t* out, const scalar_t* bias, int64_t M, int64_t N) {
  using Vec = at::vec::Vectorized<scalar_t>;
  constexpr bool widened = !std::is_same_v<scalar_t, at::opmath_type<scalar_t>>;
  TORCH_INTERNAL_ASSERT(!widened || bias == nullptr);
  const int64_t grain = std::max<int64_t>(1, kElementsPerTask / N);
  at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      scalar_t* values = out + row * N;
      for (int64_t j = 0; j < N; j += Vec::size()) {
        const int64_t count = std::min<int64_t>(Vec::size(), N - j);
        if constexpr (widened) {
          auto [low, high] = at::vec::convert_to_float<scalar_t>(Vec::loadu(values + j, count));
          at::vec::convert_from_float<scalar_t>(relu(low), relu(high)).store(values + j, count);
        } else {
          Vec v = Vec::loadu(values + j, count);
          if (bias != nullptr) v = v + Vec::loadu(bias + j, count);
          relu(v).store(values + j, count);
        }
      }
    }
  });
}

// masked (M, N) = grad_out where not out <= 0 (written when ``masked`` is non-null) and
// grad_bias (N,) = its column sums (when non-null); all contiguous, M, N > 0.
template <typename scalar_t>
void mask_and_bias_grad(const scalar_t* grad_out, const scalar_t* out, scalar_t* masked_out, scalar_t* grad_bias,
                        int64_t M, int64_t N) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<scalar_t>;
  using Acc = OpVec<scalar_t>;
  constexpr bool widened = !std::is_same_v<scalar_t, opmath_t>;
  const int64_t blocks = (M + kBiasRows - 1) / kBiasRows;
  const int64_t padded = (N + kPadding - 1) / kPadding * kPadding;
  Tensor partials;
  opmath_t* sums = nullptr;
  if (grad_bias != nullptr) {
    partials = at::zeros({blocks, padded}, at::TensorOptions().dtype(c10::CppTypeToScalarType<opmath_t>::value));
    sums = partials.data_ptr<opmath_t>();
  }
  const int64_t grain = std::max<int64_t>(1, kElementsPerTask / (kBiasRows * N));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      opmath_t* block_sums = sums != nullptr ? sums + block * padded : nullptr;
      for (int64_t row = block * kBiasRows; row < std::min(M, (block + 1) * kBiasRows); ++row) {
        const int64_t base = row * N;
        for (int64_t j = 0; j < N; j += Vec::size()) {
          const int64_t count = std::min<int64_t>(Vec::size(), N - j);
          const Vec g = Vec::loadu(grad_out + base + j, count);
          const Vec o = Vec::loadu(out + base + j, count);
          if constexpr (widened) {
            auto [g0, g1] = at::vec::convert_to_float<scalar_t>(g);
            auto [o0, o1] = at::vec::convert_to_float<scalar_t>(o);
            const Acc m0 = masked(g0, o0), m1 = masked(g1, o1);
            if (block_sums != nullptr) {
              (Acc::loadu(block_sums + j) + m0).store(block_sums + j);
              (Acc::loadu(block_sums + j + Acc::size()) + m1).store(block_sums + j + Acc::size());
            }
            if (masked_out != nullptr) at::vec::convert_from_float<scalar_t>(m0, m1).store(masked_out + base + j, count);
          } else {
            const Vec m = masked(g, o);  // lanes past count were loaded as 0 and add 0
            if (block_sums != nullptr) (Vec::loadu(block_sums + j) + m).store(block_sums + j);
            if (masked_out != nullptr) m.store(masked_out + base + j, count);
          }
        }
      }
    }
  });
  if (grad_bias == nullptr) return;
  // The blocks' sums, added in block order by whichever thread owns the column range.
  const int64_t column_grain = std::max<int64_t>(Acc::size(), kElementsPerTask / blocks);
  at::parallel_for(0, N, column_grain, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      opmath_t total = 0;
      for (int64_t block = 0; block < blocks; ++block) total += sums[block * padded + j];
      grad_bias[j] = static_cast<scalar_t>(total);
    }
  });
}

// ---- the ops ----

Tensor linear_relu_forward_cpu(const Tensor& x, const Tensor& weight, const OptionalTensor& bias, bool allow_tf32) {
  const auto [M, N, K] = check_linear_relu_forward(c10::kCPU, x, weight, bias);
  (void)allow_tf32;  // CPU GEMMs have no TF32: fp32 is IEEE fp32 either way
  if (M == 0 || N == 0 || K == 0) {
    Tensor out = new_output({M, N}, x.options());
    if (M > 0 && N > 0) {  // K == 0, no products: relu(bias) in every row, or zeros
      if (bias.has_value()) {
        out.copy_(bias->clamp_min(0).expand({M, N}));
      } else {
        out.zero_();
      }
    }
    return out;
  }
  const c10::ScalarType dtype = x.scalar_type();
  // The pass adds the bias only on the at::mm path of fp32/fp64 (saving addmm's copy of the bias
  // into every row); elsewhere the GEMM adds it, rounding once in bf16/fp16.
  const bool onednn = use_onednn(dtype, M, N, K);
  const bool bias_in_pass = bias.has_value() && !onednn && (dtype == at::kFloat || dtype == at::kDouble);
  const Tensor b = bias.has_value() ? bias->contiguous() : Tensor();
  if (onednn && no_nan_possible(x, weight, b)) {
    return onednn_linear()->call(x, weight, bias, "relu", c10::List<std::optional<c10::Scalar>>(), std::nullopt);
  }
  Tensor out = matmul_transposed(x, weight, bias_in_pass || !bias.has_value() ? OptionalTensor() : OptionalTensor(b));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "linear_relu_forward_cpu", [&] {
    bias_relu_<scalar_t>(out.data_ptr<scalar_t>(), bias_in_pass ? b.const_data_ptr<scalar_t>() : nullptr, M, N);
  });
  return out;
}

// The schema's signature, as the CUDA kernel's (csrc/linear_relu_op.cpp): one op, a kernel per device.
std::tuple<Tensor, Tensor, Tensor> linear_relu_backward_cpu(const Tensor& grad_out, const Tensor& out,
                                                            const OptionalTensor& x, const OptionalTensor& weight,
                                                            bool need_input_grad, bool need_weight_grad,
                                                            bool need_bias_grad, bool allow_tf32) {
  const auto [M, N, K] = check_linear_relu_backward(c10::kCPU, grad_out, out, x, weight, need_input_grad, need_weight_grad);
  (void)allow_tf32;
  const auto options = out.options();
  Tensor grad_b = need_bias_grad ? new_output({N}, options) : at::empty({0}, options);

  const bool need_masked = (need_input_grad || need_weight_grad) && M > 0 && N > 0 && K > 0;
  Tensor masked_grad = need_masked ? new_output({M, N}, options) : Tensor();
  if (M > 0 && N > 0 && (need_masked || need_bias_grad)) {
    const Tensor g = grad_out.contiguous(), o = out.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "linear_relu_backward_cpu", [&] {
      mask_and_bias_grad<scalar_t>(g.const_data_ptr<scalar_t>(), o.const_data_ptr<scalar_t>(),
                                   need_masked ? masked_grad.data_ptr<scalar_t>() : nullptr,
                                   need_bias_grad ? grad_b.data_ptr<scalar_t>() : nullptr, M, N);
    });
  } else if (need_bias_grad) {
    grad_b.zero_();  // M == 0: an empty sum (N == 0: nothing to write)
  }

  Tensor grad_x = at::empty({0}, options);
  if (need_input_grad) {
    if (M > 0 && K > 0 && N > 0) {
      grad_x = matmul_transposed(masked_grad, weight->t(), std::nullopt);  // masked @ weight
    } else {
      grad_x = new_output({M, K}, options);
      grad_x.zero_();
    }
  }
  Tensor grad_w = at::empty({0}, options);
  if (need_weight_grad) {
    grad_w = new_output({N, K}, options);
    if (M > 0 && K > 0 && N > 0) {
      // (x^T @ masked)^T: the big operand, masked, goes in as the GEMM's transposed one, which
      // oneDNN reads in place; the (K, N) result is transposed into grad_w (N*K elements).
      grad_w.copy_(matmul_transposed(x->t(), masked_grad.t(), std::nullopt).t());
    } else {
      grad_w.zero_();
    }
  }
  return {grad_x, grad_w, grad_b};
}

}  // namespace
}  // namespace fastcore5

TORCH_LIBRARY_IMPL(fastcore5_native, CPU, m) {
  m.impl("linear_relu_forward", &fastcore5::linear_relu_forward_cpu);
  m.impl("linear_relu_backward", &fastcore5::linear_relu_backward_cpu);
  m.impl("linear_relu", &fastcore5::linear_relu_forward_cpu);  // below autograd (csrc/linear_relu_autograd.cpp)
}
