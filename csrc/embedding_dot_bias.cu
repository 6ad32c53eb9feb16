// EmbeddingDotBias (fastai's collaborative-filtering model) forward and backward kernels.
//
// Contract (preconditions guaranteed by csrc/registration.cpp and fastcore5/ops/embedding_dot_bias.py):
//   users, items: (B,) int32 or int64, any stride, NOT checked on the host (that would sync).
//     Every kernel bound-checks every index it reads against the rows of its table; a sample
//     with a bad index reads and writes nothing out of bounds and never asserts on the device:
//     forward output NaN (and a record in index_errors), no backward contribution.
//   u_weight (n_users, D), i_weight (n_items, D): one floating dtype T, any strides.
//   u_bias, i_bias: one element per row at stride(0) ((n,) or (n, 1) tables).
//   res[s] = <U[users[s]], V[items[s]]> + ub[users[s]] + ib[items[s]];
//   out[s] = res[s], or sigmoid(res[s]) * (hi - lo) + lo with a y_range.
// Backward: coef[s] = grad_out[s] * d out / d res (res recomputed from the rows, nothing saved),
//   grad_U[r] = sum_{s: users[s] = r} coef[s] * V[items[s]],  grad_ub[r] = sum coef[s]; same for V.
//   atomic:        per-sample scatter into fp32 (fp64 for fp64) zero-filled accumulators, 16-byte
//                  vector atomics on sm_90; the order of additions varies: not deterministic.
//   deterministic: per-sample coefficients here (kCoef, 0 for a bad sample); the caller clamps
//                  the indices into range, sorts them (stable) and sums every row's samples in
//                  an order fixed by B alone (csrc/embedding_segment_reduce.cu): bitwise reproducible.
//   sparse:        per-sample values (nn.Embedding(sparse=True)'s COO values): no reduction.
// Math in fp32 (fp64 for fp64 tables). All row offsets are int64 (tables may exceed 2^31 elements).
// Work split: a group of G lanes (G a power of two <= kWarpSize, just enough lanes to cover a row with
// one 16-byte access each) handles one sample, so for D = 64 in bf16 a warp serves 4 samples.
#include "common.cuh"
#include "embedding_rows.cuh"
#include "fastcore5.h"

namespace fastcore5 {
namespace {

constexpr int kThreads = kThreadsPerBlock;

// Sum over the G lanes of a group (G a power of two); every lane of the warp must call it.
template <typename A>
__device__ __forceinline__ A group_sum(A value, int G) {
  for (int offset = G / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(kFullWarpMask, value, offset, G);
  return value;
}

__device__ __forceinline__ bool in_range(int64_t index, int64_t rows) {
  return index >= 0 && index < rows;
}

// Records one sample's bad indices into index_errors (layout in fastcore5.h); lane 0 only.
__device__ __forceinline__ void record_index_errors(long long* errors, int64_t u, int64_t i, IndexBounds bounds) {
  const bool bad_u = !in_range(u, bounds.users), bad_i = !in_range(i, bounds.items);
  atomicAdd(reinterpret_cast<unsigned long long*>(errors), static_cast<unsigned long long>(bad_u + bad_i));
  const auto record = [&](long long* slots, int64_t index, int64_t rows) {
    atomicAdd(reinterpret_cast<unsigned long long*>(slots), 1ULL);
    if (index < 0) {
      atomicMin(slots + 1, static_cast<long long>(index));
    } else {
      atomicMax(slots + 2, static_cast<long long>(index));
    }
    atomicMax(slots + 3, static_cast<long long>(rows));
  };
  if (bad_u) record(errors + 1, u, bounds.users);
  if (bad_i) record(errors + 5, i, bounds.items);
}

template <typename A>
__device__ __forceinline__ A sigmoid(A x) {
  return A(1) / (A(1) + exp(-x));
}

// This lane's share of <a_row, b_row>: columns lane*VEC + k*G*VEC (16-byte loads) when VEC > 1,
// else columns lane + k*G at the tables' column strides.
template <typename T, int VEC>
__device__ __forceinline__ acc_t<T> partial_dot(const T* a_row, int64_t a_cs, const T* b_row, int64_t b_cs, int64_t D,
                                                int lane, int G) {
  using A = acc_t<T>;
  A acc = A(0);
  if (VEC > 1) {
    for (int64_t c = static_cast<int64_t>(lane) * VEC; c < D; c += static_cast<int64_t>(G) * VEC) {
      const Vec<T, VEC> a = *reinterpret_cast<const Vec<T, VEC>*>(a_row + c);
      const Vec<T, VEC> b = *reinterpret_cast<const Vec<T, VEC>*>(b_row + c);
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc += static_cast<A>(a.v[j]) * static_cast<A>(b.v[j]);
    }
  } else {
    for (int64_t c = lane; c < D; c += G) acc += static_cast<A>(a_row[c * a_cs]) * static_cast<A>(b_row[c * b_cs]);
  }
  return acc;
}

// The pre-activation score <U[u], V[i]> + ub[u] + ib[i] of this group's sample, returned to every
// lane of a valid sample (0 for an invalid one). It shuffles: every lane of the warp must call it.
template <typename T, int VEC>
__device__ __forceinline__ acc_t<T> sample_score(const TableRef<T>& U, const TableRef<T>& V, const TableRef<T>& ub,
                                                 const TableRef<T>& ib, int64_t u, int64_t i, bool valid, int64_t D,
                                                 int lane, int G) {
  using A = acc_t<T>;
  A dot = valid ? partial_dot<T, VEC>(U.row(u), U.col_stride, V.row(i), V.col_stride, D, lane, G) : A(0);
  dot = group_sum(dot, G);
  return valid ? dot + static_cast<A>(*ub.row(u)) + static_cast<A>(*ib.row(i)) : A(0);
}

// ---------------------------------------------------------------------------------------------
// Forward: one group of G lanes per sample; writes out[s] (contiguous, dtype T): the score, or
// NaN for a sample with a bad index, which lane 0 also records into ``errors`` (when not null).
// ---------------------------------------------------------------------------------------------
template <typename T, int VEC>
__global__ void forward_kernel(IndexRef users, IndexRef items, TableRef<T> U, TableRef<T> V, TableRef<T> ub,
                               TableRef<T> ib, int64_t B, int64_t D, int G, IndexBounds bounds, bool has_range,
                               acc_t<T> lo, acc_t<T> hi, T* __restrict__ out, long long* __restrict__ errors) {
  using A = acc_t<T>;
  const int64_t s = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / G;
  const int lane = threadIdx.x % G;
  const bool in_batch = s < B;
  const int64_t u = in_batch ? users[s] : 0;
  const int64_t i = in_batch ? items[s] : 0;
  const bool valid = in_batch && in_range(u, bounds.users) && in_range(i, bounds.items);
  A res = sample_score<T, VEC>(U, V, ub, ib, u, i, valid, D, lane, G);
  if (!in_batch || lane != 0) return;
  if (valid) {
    if (has_range) res = sigmoid(res) * (hi - lo) + lo;
    out[s] = static_cast<T>(res);
  } else {
    out[s] = static_cast<T>(NAN);
    if (errors != nullptr) record_index_errors(errors, u, i, bounds);
  }
}

// ---------------------------------------------------------------------------------------------
// Backward, per sample. MODE selects what is written:
//   kCoef:   coef[s] (acc type) for the deterministic path;
//   kAtomic: coef * partner row atomically added into acc-type accumulators (grad_uw/grad_iw
//            contiguous (n, D), grad_ub/grad_ib contiguous (n,)); each may be null (not wanted);
//   kSparse: per-sample values in T: uw[s] = coef*V[i], iw[s] = coef*U[u] (contiguous (B, D)),
//            ub[s] = ib[s] = coef.
// A sample with an index outside ``bounds`` reads no row: its coef is 0, it adds nothing in
// kAtomic and writes zeros in kSparse (its row of the COO values must still be written).
// ---------------------------------------------------------------------------------------------
enum Mode { kCoef = 0, kAtomic = 1, kSparse = 2 };

template <typename A, int VEC>
__device__ __forceinline__ void atomic_add_vec(A* dst, const A (&v)[VEC]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr bool kFloat4 = sizeof(A) == 4 && VEC % 4 == 0;
#else
  constexpr bool kFloat4 = false;
#endif
  if constexpr (kFloat4) {
    // sm_90 has 16-byte float atomics. dst is 16-byte aligned: the accumulators are fresh
    // allocations, D % VEC == 0 and the column is a multiple of VEC.
#pragma unroll
    for (int j = 0; j < VEC; j += 4) {
      atomicAdd(reinterpret_cast<float4*>(dst + j), make_float4(v[j], v[j + 1], v[j + 2], v[j + 3]));
    }
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) atomicAdd(dst + j, v[j]);
  }
}

template <typename T, int VEC, int MODE>
__global__ void per_sample_backward_kernel(const T* __restrict__ grad_out, int64_t grad_stride, IndexRef users,
                                           IndexRef items, TableRef<T> U, TableRef<T> V, TableRef<T> ub,
                                           TableRef<T> ib, int64_t B, int64_t D, int G, IndexBounds bounds,
                                           bool has_range, acc_t<T> lo, acc_t<T> hi,
                                           acc_t<T>* __restrict__ coef_out, void* __restrict__ out_uw,
                                           void* __restrict__ out_iw, void* __restrict__ out_ub,
                                           void* __restrict__ out_ib) {
  using A = acc_t<T>;
  const int64_t s = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / G;
  const int lane = threadIdx.x % G;
  const bool in_batch = s < B;
  int64_t u = 0, i = 0;
  A coef = A(0);
  bool valid = false;
  if (in_batch) {
    u = users[s];
    i = items[s];
    valid = in_range(u, bounds.users) && in_range(i, bounds.items);
    if (valid) coef = static_cast<A>(grad_out[s * grad_stride]);
  }
  if (has_range) {  // uniform across the warp, so every lane calls the shuffling sample_score
    const A sg = sigmoid(sample_score<T, VEC>(U, V, ub, ib, u, i, valid, D, lane, G));
    coef *= (hi - lo) * sg * (A(1) - sg);
  }
  if (!in_batch) return;  // no shuffles below
  if constexpr (MODE == kAtomic) {
    if (!valid) return;
  }
  if constexpr (MODE == kCoef) {
    if (lane == 0) coef_out[s] = coef;
    return;
  }
  if (lane == 0) {
    if constexpr (MODE == kAtomic) {
      if (out_ub != nullptr) atomicAdd(static_cast<A*>(out_ub) + u, coef);
      if (out_ib != nullptr) atomicAdd(static_cast<A*>(out_ib) + i, coef);
    } else {
      if (out_ub != nullptr) static_cast<T*>(out_ub)[s] = static_cast<T>(coef);
      if (out_ib != nullptr) static_cast<T*>(out_ib)[s] = static_cast<T>(coef);
    }
  }
  // Two passes, one per table gradient: grad_U rows take the item row, grad_V rows the user row.
  for (int side = 0; side < 2; ++side) {
    void* dst_table = side == 0 ? out_uw : out_iw;
    if (dst_table == nullptr) continue;
    const TableRef<T>& src = side == 0 ? V : U;
    const T* src_row = valid ? src.row(side == 0 ? i : u) : nullptr;
    const int64_t dst_row = MODE == kAtomic ? (side == 0 ? u : i) : s;
    for (int64_t c = static_cast<int64_t>(lane) * VEC; c < D; c += static_cast<int64_t>(G) * VEC) {
      A v[VEC];
      if (!valid) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) v[j] = A(0);
      } else if (VEC > 1) {
        const Vec<T, VEC> row = *reinterpret_cast<const Vec<T, VEC>*>(src_row + c);
#pragma unroll
        for (int j = 0; j < VEC; ++j) v[j] = coef * static_cast<A>(row.v[j]);
      } else {
        v[0] = coef * static_cast<A>(src_row[c * src.col_stride]);
      }
      if constexpr (MODE == kAtomic) {
        atomic_add_vec<A, VEC>(static_cast<A*>(dst_table) + dst_row * D + c, v);
      } else {
        Vec<T, VEC> w;
#pragma unroll
        for (int j = 0; j < VEC; ++j) w.v[j] = static_cast<T>(v[j]);
        *reinterpret_cast<Vec<T, VEC>*>(static_cast<T*>(dst_table) + dst_row * D + c) = w;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Launch helpers
// ---------------------------------------------------------------------------------------------

// Lanes per sample: enough for one VEC-wide access per lane across the row, a power of two <= kWarpSize.
int group_size(int64_t D, int vec) {
  const int64_t lanes = std::max<int64_t>(1, ceil_div(D, vec));
  int G = 1;
  while (G < kWarpSize && G < lanes) G *= 2;
  return G;
}


unsigned sample_blocks(int64_t B, int G) {
  const int64_t blocks = ceil_div(B * G, kThreads);
  if (blocks >= (1LL << 31)) fail(ArgError::kValue, "embedding_dot_bias: batch of ", B, " samples too large for one launch");
  return static_cast<unsigned>(blocks);
}

}  // namespace

void embedding_dot_bias_forward_cuda(const at::TensorBase& users, const at::TensorBase& items,
                                     const at::TensorBase& u_weight, const at::TensorBase& i_weight,
                                     const at::TensorBase& u_bias, const at::TensorBase& i_bias, bool has_range,
                                     double lo, double hi, const at::TensorBase& out,
                                     const at::TensorBase& index_errors) {
  const int64_t B = users.size(0), D = u_weight.size(1);
  if (B == 0) return;
  dispatch_floating(u_weight.scalar_type(), "embedding_dot_bias", [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const bool vector = rows_vectorizable<T>({&u_weight, &i_weight}, D);
    const int G = group_size(D, vector ? vec16<T>() : 1);
    const auto launch = [&](auto kernel) {
      kernel<<<sample_blocks(B, G), kThreads, 0, current_stream()>>>(
          index_ref(users), index_ref(items), table_ref<T>(u_weight), table_ref<T>(i_weight), table_ref<T>(u_bias),
          table_ref<T>(i_bias), B, D, G, IndexBounds{u_weight.size(0), i_weight.size(0)}, has_range,
          static_cast<A>(lo), static_cast<A>(hi), out.mutable_data_ptr<T>(),
          index_errors.defined() ? static_cast<long long*>(index_errors.mutable_data_ptr()) : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (vector) {
      launch(forward_kernel<T, vec16<T>()>);
    } else {
      launch(forward_kernel<T, 1>);
    }
  });
}

void embedding_dot_bias_per_sample_cuda(const at::TensorBase& grad_out, const at::TensorBase& users,
                                        const at::TensorBase& items, const at::TensorBase& u_weight,
                                        const at::TensorBase& i_weight, const at::TensorBase& u_bias,
                                        const at::TensorBase& i_bias, int64_t D, IndexBounds bounds, bool has_range,
                                        double lo, double hi,
                                        int mode, const at::TensorBase& coef, const at::TensorBase& out_uw,
                                        const at::TensorBase& out_iw, const at::TensorBase& out_ub,
                                        const at::TensorBase& out_ib) {
  const int64_t B = users.size(0);
  if (B == 0) return;
  dispatch_floating(grad_out.scalar_type(), "embedding_dot_bias backward", [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const bool vector = rows_vectorizable<T>({&u_weight, &i_weight}, D);
    const int G = group_size(D, vector ? vec16<T>() : 1);
    const auto ptr = [](const at::TensorBase& t) { return t.defined() ? t.data_ptr() : nullptr; };
    const auto launch = [&](auto kernel) {
      kernel<<<sample_blocks(B, G), kThreads, 0, current_stream()>>>(
          grad_out.const_data_ptr<T>(), grad_out.stride(0), index_ref(users), index_ref(items), table_ref<T>(u_weight),
          table_ref<T>(i_weight), table_ref<T>(u_bias), table_ref<T>(i_bias), B, D, G, bounds, has_range,
          static_cast<A>(lo), static_cast<A>(hi), coef.defined() ? coef.mutable_data_ptr<A>() : nullptr, ptr(out_uw),
          ptr(out_iw), ptr(out_ub), ptr(out_ib));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    constexpr int V = vec16<T>();
    switch (mode) {
      case kCoef: vector ? launch(per_sample_backward_kernel<T, V, kCoef>) : launch(per_sample_backward_kernel<T, 1, kCoef>); break;
      case kAtomic: vector ? launch(per_sample_backward_kernel<T, V, kAtomic>) : launch(per_sample_backward_kernel<T, 1, kAtomic>); break;
      case kSparse: vector ? launch(per_sample_backward_kernel<T, V, kSparse>) : launch(per_sample_backward_kernel<T, 1, kSparse>); break;
      default: fail(ArgError::kRuntime, "embedding_dot_bias backward: unknown mode ", mode);
    }
  });
}

}  // namespace fastcore5
