// Linear + bias + ReLU on cuBLASLt, and the fused ReLU-mask / bias-gradient kernel of its backward.
//
// Contract (the op layer, csrc/registration.cpp, guarantees the preconditions):
//   forward   out (M, N) = relu(x (M, K) @ W (N, K)^T + b (N,)), one cuBLASLt matmul whose
//             epilogue adds the bias and applies the ReLU before the only store of ``out``
//             (CUBLASLT_EPILOGUE_RELU_BIAS, or RELU without a bias). Where cuBLASLt offers no
//             algorithm with that epilogue for a dtype/layout, the plain matmul runs and
//             bias_relu_kernel finishes the tile in a second pass (same result, one extra
//             read+write of ``out``).
//   backward  g = grad_out where not out <= 0 (a NaN output passes, as in torch), else 0;
//             grad_b = sum_rows g                                (relu_mask_bias_kernel, one pass)
//             grad_x = g @ W, grad_W = g^T @ x                   (two cuBLASLt matmuls)
//             Only ``out`` is needed (relu' = out > 0), never the pre-activation. cuBLASLt's
//             DRELU_BGRAD epilogue applies the ReLU derivative to a matmul *result*, which fits the
//             layer below a ReLU, not this op, so the mask is applied to grad_out here.
// Math: fp32 accumulation for fp32/bf16/fp16 (TF32 tensor cores for fp32 only when allow_tf32,
// i.e. torch.backends.cuda.matmul.allow_tf32), fp64 for fp64. Split-K partial sums, if cuBLASLt
// picks split-K, are kept in the compute type (REDUCTION_SCHEME_COMPUTE_TYPE), never bf16/fp16.
// The bias sum is a fixed two-level reduction: deterministic. Offsets are int64.
#include "common.cuh"
#include "fastcore5.h"

#include <c10/cuda/CUDACachingAllocator.h>
#include <cublasLt.h>

#include <array>
#include <map>
#include <memory>

namespace fastcore5 {
namespace {

// ---------------------------------------------------------------------------------------------
// cuBLASLt plumbing
// ---------------------------------------------------------------------------------------------

#define FASTCORE5_CUBLAS_CHECK(call, what)                                                      \
  do {                                                                                          \
    cublasStatus_t status_ = (call);                                                            \
    if (status_ != CUBLAS_STATUS_SUCCESS) {                                                     \
      fail(ArgError::kRuntime, "cuBLASLt ", what, " failed: ", cublasLtGetStatusString(status_)); \
    }                                                                                           \
  } while (0)

// Hopper's cuBLASLt kernels want up to 32 MiB of workspace (split-K, stream-K); the caching
// allocator makes the per-call allocation cheap.
constexpr size_t kWorkspaceBytes = 32u << 20;

// One cuBLASLt handle per device, created on first use and kept for the life of the process
// (destroying it at exit could run after the CUDA context is gone).
cublasLtHandle_t lt_handle() {
  static std::mutex mutex;
  static std::vector<cublasLtHandle_t> handles;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  std::lock_guard<std::mutex> lock(mutex);
  if (static_cast<int>(handles.size()) <= device) handles.resize(device + 1, nullptr);
  if (handles[device] == nullptr) FASTCORE5_CUBLAS_CHECK(cublasLtCreate(&handles[device]), "cublasLtCreate");
  return handles[device];
}

struct MatmulDescDeleter {
  void operator()(cublasLtMatmulDescOpaque_t* d) const { cublasLtMatmulDescDestroy(d); }
};
struct LayoutDeleter {
  void operator()(cublasLtMatrixLayoutOpaque_t* d) const { cublasLtMatrixLayoutDestroy(d); }
};
struct PreferenceDeleter {
  void operator()(cublasLtMatmulPreferenceOpaque_t* d) const { cublasLtMatmulPreferenceDestroy(d); }
};
using MatmulDesc = std::unique_ptr<cublasLtMatmulDescOpaque_t, MatmulDescDeleter>;
using Layout = std::unique_ptr<cublasLtMatrixLayoutOpaque_t, LayoutDeleter>;
using Preference = std::unique_ptr<cublasLtMatmulPreferenceOpaque_t, PreferenceDeleter>;

cudaDataType_t data_type(c10::ScalarType dtype) {
  switch (dtype) {
    case c10::ScalarType::Float: return CUDA_R_32F;
    case c10::ScalarType::Double: return CUDA_R_64F;
    case c10::ScalarType::Half: return CUDA_R_16F;
    case c10::ScalarType::BFloat16: return CUDA_R_16BF;
    default: fail(ArgError::kType, "linear_relu: unsupported dtype ", dtype);
  }
}

// A row-major logical matrix X (R, C) with one unit stride, seen by cuBLAS (column-major) as an
// operand whose op() yields X or X^T.
struct Operand {
  const void* ptr;
  cublasOperation_t op;
  uint64_t stored_rows, stored_cols;  // the column-major matrix in memory, before op()
  int64_t ld;
};

Operand as_operand(const at::TensorBase& X, bool want_transpose) {
  const int64_t R = X.size(0), C = X.size(1);
  const bool row_major = X.stride(1) == 1 && X.stride(0) >= std::max<int64_t>(1, C);
  Operand o;
  o.ptr = X.const_data_ptr();
  if (row_major) {  // memory holds X^T column-major: C x R, ld = stride(0)
    o.stored_rows = C;
    o.stored_cols = R;
    o.ld = X.stride(0);
    o.op = want_transpose ? CUBLAS_OP_N : CUBLAS_OP_T;
  } else {  // stride(0) == 1: memory holds X column-major: R x C, ld = stride(1)
    TORCH_INTERNAL_ASSERT(X.stride(0) == 1 && X.stride(1) >= std::max<int64_t>(1, R), "operand without a unit stride");
    o.stored_rows = R;
    o.stored_cols = C;
    o.ld = X.stride(1);
    o.op = want_transpose ? CUBLAS_OP_T : CUBLAS_OP_N;
  }
  return o;
}

// Largest power of two (<= 256) dividing the address: cuBLASLt's heuristic otherwise assumes
// 256-byte aligned operands and may pick a kernel that faults on a sliced tensor.
uint32_t alignment_of(const void* p) {
  uint32_t a = 256;
  while (a > 1 && reinterpret_cast<uintptr_t>(p) % a != 0) a /= 2;
  return a;
}

// cuBLASLt's heuristic costs tens of microseconds of host time per query, as much as a small
// GEMM takes on the GPU: its answer is kept per problem (device, shapes, leading dimensions,
// transposes, dtype, compute type, epilogue, alignments), so a training loop asks once per layer
// shape. found == false records "no algorithm for this epilogue" so the fallback is not re-asked.
struct HeuristicAnswer {
  bool found;
  cublasLtMatmulHeuristicResult_t result;
};
using HeuristicKey = std::array<int64_t, 16>;

std::mutex heuristic_mutex;
std::map<HeuristicKey, HeuristicAnswer>& heuristic_cache() {
  static auto* cache = new std::map<HeuristicKey, HeuristicAnswer>();  // leaked: used until exit
  return *cache;
}

// D (m, n column-major, ld = m, contiguous) = op(A) (m, k) @ op(B) (k, n) [+ bias, relu].
// Returns false when cuBLASLt has no algorithm for this epilogue (the caller falls back).
bool lt_matmul(const Operand& A, const Operand& B, void* D, uint64_t m, uint64_t n, c10::ScalarType dtype,
               bool allow_tf32, cublasLtEpilogue_t epilogue, const void* bias) {
  const cudaDataType_t type = data_type(dtype);
  const bool fp64 = dtype == c10::ScalarType::Double;
  const cublasComputeType_t compute = fp64 ? CUBLAS_COMPUTE_64F
                                      : (dtype == c10::ScalarType::Float && allow_tf32) ? CUBLAS_COMPUTE_32F_FAST_TF32
                                                                                         : CUBLAS_COMPUTE_32F;
  const cudaDataType_t scale_type = fp64 ? CUDA_R_64F : CUDA_R_32F;

  cublasLtMatmulDesc_t raw_desc = nullptr;
  FASTCORE5_CUBLAS_CHECK(cublasLtMatmulDescCreate(&raw_desc, compute, scale_type), "matmul descriptor");
  MatmulDesc desc(raw_desc);
  FASTCORE5_CUBLAS_CHECK(
      cublasLtMatmulDescSetAttribute(desc.get(), CUBLASLT_MATMUL_DESC_TRANSA, &A.op, sizeof(A.op)), "TRANSA");
  FASTCORE5_CUBLAS_CHECK(
      cublasLtMatmulDescSetAttribute(desc.get(), CUBLASLT_MATMUL_DESC_TRANSB, &B.op, sizeof(B.op)), "TRANSB");
  FASTCORE5_CUBLAS_CHECK(
      cublasLtMatmulDescSetAttribute(desc.get(), CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof(epilogue)),
      "EPILOGUE");
  if (bias != nullptr) {
    FASTCORE5_CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(desc.get(), CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)),
        "BIAS_POINTER");
    FASTCORE5_CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(desc.get(), CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &type, sizeof(type)),
        "BIAS_DATA_TYPE");
  }

  cublasLtMatrixLayout_t raw = nullptr;
  FASTCORE5_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&raw, type, A.stored_rows, A.stored_cols, A.ld), "layout A");
  Layout layout_a(raw);
  FASTCORE5_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&raw, type, B.stored_rows, B.stored_cols, B.ld), "layout B");
  Layout layout_b(raw);
  FASTCORE5_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&raw, type, m, n, static_cast<int64_t>(m)), "layout D");
  Layout layout_d(raw);

  cublasLtMatmulPreference_t raw_pref = nullptr;
  FASTCORE5_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&raw_pref), "preference");
  Preference pref(raw_pref);
  const uint64_t workspace_bytes = kWorkspaceBytes;
  FASTCORE5_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.get(), CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                              &workspace_bytes, sizeof(workspace_bytes)),
                         "MAX_WORKSPACE_BYTES");
  // Split-K partials only in the compute type: bf16/fp16 partial sums would round the result twice.
  const uint32_t reduction = CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
  FASTCORE5_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.get(), CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK,
                                                              &reduction, sizeof(reduction)),
                         "REDUCTION_SCHEME_MASK");
  const uint32_t align_a = alignment_of(A.ptr), align_b = alignment_of(B.ptr), align_d = alignment_of(D);
  FASTCORE5_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.get(), CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                                                              &align_a, sizeof(align_a)),
                         "MIN_ALIGNMENT_A_BYTES");
  FASTCORE5_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.get(), CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                                                              &align_b, sizeof(align_b)),
                         "MIN_ALIGNMENT_B_BYTES");
  FASTCORE5_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.get(), CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                                                              &align_d, sizeof(align_d)),
                         "MIN_ALIGNMENT_C_BYTES");
  FASTCORE5_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.get(), CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                                                              &align_d, sizeof(align_d)),
                         "MIN_ALIGNMENT_D_BYTES");

  cublasLtHandle_t handle = lt_handle();
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const HeuristicKey key{device,
                         static_cast<int64_t>(A.stored_rows), static_cast<int64_t>(A.stored_cols), A.ld, A.op,
                         static_cast<int64_t>(B.stored_rows), static_cast<int64_t>(B.stored_cols), B.ld, B.op,
                         static_cast<int64_t>(m), static_cast<int64_t>(type), static_cast<int64_t>(compute),
                         static_cast<int64_t>(epilogue), static_cast<int64_t>(align_a),
                         static_cast<int64_t>(align_b), static_cast<int64_t>(align_d) * 2 + (bias != nullptr)};
  HeuristicAnswer answer{};
  bool cached = false;
  {
    const std::lock_guard<std::mutex> lock(heuristic_mutex);
    const auto it = heuristic_cache().find(key);
    if (it != heuristic_cache().end()) {
      answer = it->second;
      cached = true;
    }
  }
  if (!cached) {
    int found = 0;
    const cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(handle, desc.get(), layout_a.get(), layout_b.get(),
                                                                 layout_d.get(), layout_d.get(), pref.get(), 1,
                                                                 &answer.result, &found);
    if (status != CUBLAS_STATUS_NOT_SUPPORTED) FASTCORE5_CUBLAS_CHECK(status, "heuristic");
    answer.found = status == CUBLAS_STATUS_SUCCESS && found > 0;
    const std::lock_guard<std::mutex> lock(heuristic_mutex);
    heuristic_cache().emplace(key, answer);
  }
  if (!answer.found) return false;
  const cublasLtMatmulHeuristicResult_t& heuristic = answer.result;

  auto& allocator = *c10::cuda::CUDACachingAllocator::get();
  c10::DataPtr workspace = allocator.allocate(heuristic.workspaceSize);
  const float alpha32 = 1.0f, beta32 = 0.0f;
  const double alpha64 = 1.0, beta64 = 0.0;
  const void* alpha = fp64 ? static_cast<const void*>(&alpha64) : static_cast<const void*>(&alpha32);
  const void* beta = fp64 ? static_cast<const void*>(&beta64) : static_cast<const void*>(&beta32);
  FASTCORE5_CUBLAS_CHECK(cublasLtMatmul(handle, desc.get(), alpha, A.ptr, layout_a.get(), B.ptr, layout_b.get(), beta,
                                        D, layout_d.get(), D, layout_d.get(), &heuristic.algo, workspace.get(),
                                        heuristic.workspaceSize, current_stream()),
                         "matmul");
  return true;
}

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

// bias_relu_kernel: out[r, c] = relu(out[r, c] + bias[c]) (bias may be null), in place over a
// contiguous (rows, cols) matrix; the fallback epilogue when cuBLASLt offers none. Each thread
// owns VEC consecutive elements of a row (VEC > 1 only when cols % VEC == 0 and both pointers
// are 16-byte aligned). Grid-stride over int64 vector indices.
template <typename T, int VEC>
__global__ void bias_relu_kernel(T* __restrict__ out, const T* __restrict__ bias, int64_t rows, int64_t cols) {
  using A = acc_t<T>;
  const int64_t vectors = rows * (cols / VEC);
  for (int64_t v = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; v < vectors;
       v += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t col = (v * VEC) % cols;
    Vec<T, VEC> value = reinterpret_cast<Vec<T, VEC>*>(out)[v];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      A a = static_cast<A>(value.v[j]);
      if (bias != nullptr) a += static_cast<A>(bias[col + j]);
      value.v[j] = static_cast<T>(a < A(0) ? A(0) : a);  // a NaN stays NaN, as in torch.relu
    }
    reinterpret_cast<Vec<T, VEC>*>(out)[v] = value;
  }
}

// relu_mask_bias_kernel: over contiguous (rows, cols) grad_out and out,
//   masked[r, c] = out[r, c] <= 0 ? 0 : grad_out[r, c]          (when masked != null)
//   partial[blockIdx.y, c] = sum over this block's rows of masked  (when partial != null)
// Block = 32 x 8 threads; threadIdx.x owns VEC consecutive columns of a 32*VEC column tile,
// threadIdx.y strides over the block's row range [row_begin, row_end) in steps of 8. The column
// sums are reduced over threadIdx.y in a fixed order through shared memory: with the fixed grid
// chosen by the launcher, the result does not depend on scheduling (deterministic).
constexpr int kMaskRowsPerStep = 8;

template <typename T, int VEC>
__global__ void relu_mask_bias_kernel(const T* __restrict__ grad_out, const T* __restrict__ out, T* __restrict__ masked,
                                      acc_t<T>* __restrict__ partial, int64_t rows, int64_t cols,
                                      int64_t rows_per_block) {
  using A = acc_t<T>;
  __shared__ A sums[kMaskRowsPerStep][32 * VEC];
  const int64_t col = (static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x) * VEC;
  const int64_t row_begin = static_cast<int64_t>(blockIdx.y) * rows_per_block;
  const int64_t row_end = min(rows, row_begin + rows_per_block);
  A acc[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) acc[j] = A(0);
  if (col < cols) {
    for (int64_t r = row_begin + threadIdx.y; r < row_end; r += kMaskRowsPerStep) {
      const int64_t at = r * cols + col;
      const Vec<T, VEC> g = *reinterpret_cast<const Vec<T, VEC>*>(grad_out + at);
      const Vec<T, VEC> o = *reinterpret_cast<const Vec<T, VEC>*>(out + at);
      Vec<T, VEC> m;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        m.v[j] = static_cast<A>(o.v[j]) <= A(0) ? T(0) : g.v[j];  // passes a NaN output's gradient, as torch does
        acc[j] += static_cast<A>(m.v[j]);
      }
      if (masked != nullptr) *reinterpret_cast<Vec<T, VEC>*>(masked + at) = m;
    }
  }
  if (partial == nullptr) return;
#pragma unroll
  for (int j = 0; j < VEC; ++j) sums[threadIdx.y][threadIdx.x * VEC + j] = acc[j];
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      A total = sums[0][threadIdx.x * VEC + j];
      for (int y = 1; y < kMaskRowsPerStep; ++y) total += sums[y][threadIdx.x * VEC + j];
      partial[static_cast<int64_t>(blockIdx.y) * cols + col + j] = total;
    }
  }
}

// bias_grad_finish_kernel: grad_bias[c] = sum over s in [0, splits) of partial[s, c], in order.
template <typename T>
__global__ void bias_grad_finish_kernel(const acc_t<T>* __restrict__ partial, T* __restrict__ grad_bias, int64_t cols,
                                        int64_t splits) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c >= cols) return;
  acc_t<T> total = partial[c];
  for (int64_t s = 1; s < splits; ++s) total += partial[s * cols + c];
  grad_bias[c] = static_cast<T>(total);
}

template <typename T>
void launch_bias_relu(const at::TensorBase& out, const at::TensorBase& bias) {
  const int64_t rows = out.size(0), cols = out.size(1);
  T* out_ptr = out.mutable_data_ptr<T>();
  const T* bias_ptr = bias.defined() ? bias.const_data_ptr<T>() : nullptr;
  constexpr int V = vec16<T>();
  const bool vector = cols % V == 0 && aligned16(out_ptr);
  const int threads = kThreadsPerBlock;
  const int64_t work = rows * (vector ? cols / V : cols);
  const int blocks = static_cast<int>(std::min<int64_t>(ceil_div(work, threads), 32LL * sm_count()));
  if (vector) {
    bias_relu_kernel<T, V><<<blocks, threads, 0, current_stream()>>>(out_ptr, bias_ptr, rows, cols);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    bias_relu_kernel<T, 1><<<blocks, threads, 0, current_stream()>>>(out_ptr, bias_ptr, rows, cols);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T, int VEC>
void launch_relu_mask_bias(const at::TensorBase& grad_out, const at::TensorBase& out, const at::TensorBase& masked,
                           const at::TensorBase& grad_bias) {
  using A = acc_t<T>;
  const int64_t rows = out.size(0), cols = out.size(1);
  const int64_t col_tiles = ceil_div(cols, 32 * VEC);
  // Enough row splits for ~4 blocks per SM, each split a multiple of the 8-row step. Depends only
  // on the shape and the card, so the bias sum is reproducible run to run on one card.
  const int64_t max_splits = std::max<int64_t>(1, ceil_div(rows, 4 * kMaskRowsPerStep));
  const int64_t splits = std::min<int64_t>(max_splits, std::max<int64_t>(1, ceil_div(4LL * sm_count(), col_tiles)));
  const int64_t rows_per_block = ceil_div(ceil_div(rows, splits), kMaskRowsPerStep) * kMaskRowsPerStep;
  const int64_t used_splits = ceil_div(rows, rows_per_block);
  if (col_tiles >= (1LL << 31) || used_splits >= 65536) {
    fail(ArgError::kValue, "linear_relu backward: output of shape [", rows, ", ", cols, "] too large for the grid");
  }

  c10::DataPtr partial_storage;
  A* partial = nullptr;
  if (grad_bias.defined()) {
    partial_storage = c10::cuda::CUDACachingAllocator::get()->allocate(sizeof(A) * used_splits * cols);
    partial = static_cast<A*>(partial_storage.get());
  }
  const dim3 grid(static_cast<unsigned>(col_tiles), static_cast<unsigned>(used_splits));
  const dim3 block(32, kMaskRowsPerStep);
  relu_mask_bias_kernel<T, VEC><<<grid, block, 0, current_stream()>>>(
      grad_out.const_data_ptr<T>(), out.const_data_ptr<T>(), masked.defined() ? masked.mutable_data_ptr<T>() : nullptr,
      partial, rows, cols, rows_per_block);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (grad_bias.defined()) {
    const int threads = kThreadsPerBlock;
    bias_grad_finish_kernel<T><<<static_cast<unsigned>(ceil_div(cols, threads)), threads, 0, current_stream()>>>(
        partial, grad_bias.mutable_data_ptr<T>(), cols, used_splits);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

void linear_relu_forward_cuda(const at::TensorBase& x, const at::TensorBase& weight, const at::TensorBase& bias,
                              const at::TensorBase& out, bool allow_tf32) {
  const int64_t M = x.size(0), N = weight.size(0);
  if (M == 0 || N == 0) return;
  // Column-major view: out^T (N x M) = W (N x K) @ x^T (K x M).
  const Operand A = as_operand(weight, /*want_transpose=*/false);
  const Operand B = as_operand(x, /*want_transpose=*/true);
  const void* bias_ptr = bias.defined() ? bias.const_data_ptr() : nullptr;
  const cublasLtEpilogue_t fused = bias_ptr != nullptr ? CUBLASLT_EPILOGUE_RELU_BIAS : CUBLASLT_EPILOGUE_RELU;
  if (lt_matmul(A, B, out.mutable_data_ptr(), N, M, out.scalar_type(), allow_tf32, fused, bias_ptr)) return;
  const bool plain = lt_matmul(A, B, out.mutable_data_ptr(), N, M, out.scalar_type(), allow_tf32,
                               CUBLASLT_EPILOGUE_DEFAULT, nullptr);
  if (!plain) {
    fail(ArgError::kRuntime, "linear_relu: cuBLASLt has no algorithm for dtype ", out.scalar_type(), " and shape M=", M,
         " N=", N, " K=", x.size(1));
  }
  dispatch_floating(out.scalar_type(), "linear_relu", [&](auto tag) {
    using T = decltype(tag);
    launch_bias_relu<T>(out, bias);
  });
}

void matmul_cuda(const at::TensorBase& a, const at::TensorBase& b, const at::TensorBase& result, bool allow_tf32) {
  const int64_t R = a.size(0), C = b.size(1);
  if (R == 0 || C == 0) return;
  // Column-major view: result^T (C x R) = b^T (C x I) @ a^T (I x R).
  const Operand A = as_operand(b, /*want_transpose=*/true);
  const Operand B = as_operand(a, /*want_transpose=*/true);
  const bool ok = lt_matmul(A, B, result.mutable_data_ptr(), C, R, result.scalar_type(), allow_tf32,
                            CUBLASLT_EPILOGUE_DEFAULT, nullptr);
  if (!ok) {
    fail(ArgError::kRuntime, "linear_relu backward: cuBLASLt has no algorithm for dtype ", result.scalar_type(),
         " and shape ", R, "x", a.size(1), " @ ", a.size(1), "x", C);
  }
}

void relu_mask_and_bias_grad_cuda(const at::TensorBase& grad_out, const at::TensorBase& out,
                                  const at::TensorBase& masked, const at::TensorBase& grad_bias) {
  if (out.numel() == 0) return;
  dispatch_floating(out.scalar_type(), "linear_relu backward", [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = vec16<T>();
    const bool vector = out.size(1) % V == 0 && aligned16(grad_out.const_data_ptr()) &&
                        aligned16(out.const_data_ptr()) && (!masked.defined() || aligned16(masked.const_data_ptr()));
    if (vector) {
      launch_relu_mask_bias<T, V>(grad_out, out, masked, grad_bias);
    } else {
      launch_relu_mask_bias<T, 1>(grad_out, out, masked, grad_bias);
    }
  });
}

}  // namespace fastcore5
