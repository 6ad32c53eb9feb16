// Deterministic EmbeddingDotBias backward: the segment reduction over the sorted indices of one table.
//
// Contract (csrc/embedding_dot_bias_op.cpp guarantees it): sorted_keys (N,) int32/int64 and
// order (N,) int64 from a stable sort of one table's indices, clamped into [0, rows) first;
// coef (B,) in the accumulation type, 0 for a sample with a bad index; partners (B,) the other
// table's indices, clamped the same way; grad_w (rows, D) and grad_b (rows,) contiguous,
// zero-filled, either undefined. Math in fp32 (fp64 for fp64). Bitwise reproducible.
#include "common.cuh"
#include "embedding_rows.cuh"
#include "fastcore5.h"

#include <c10/cuda/CUDACachingAllocator.h>

namespace fastcore5 {
namespace {

constexpr int kThreads = kThreadsPerBlock;

// ---------------------------------------------------------------------------------------------
// Deterministic segment reduction over the sorted keys of one table.
//
// The sorted sequence (N entries: key = row, order = sample) is cut into chunks of kChunk
// entries, one warp each. Inside a chunk the warp walks the entries in order; each run of equal
// keys (a "piece") is summed in fp32 registers, lanes spanning the D columns (kWarpSize*VEC per column
// tile). A piece that is its row's whole segment is stored straight into the gradient row (its
// only writer). A piece cut by a chunk boundary goes to a scratch slot: ``head`` if its segment
// began in an earlier chunk, else ``tail``. segment_carry_kernel then lets the chunk where each
// cut segment begins add its tail and the following chunks' heads, in chunk order, and store the
// row. Every sum runs in an order fixed by N and kChunk: bitwise identical from run to run.
// Scratch rows are D + 1 wide; column D carries the bias sum.
// ---------------------------------------------------------------------------------------------
constexpr int kChunk = kWarpSize;  // entries per chunk: each lane fetches one

struct SegmentArgs {
  IndexRef keys;           // sorted rows (N,)
  const int64_t* order;    // sample of each sorted entry (N,)
  int64_t N, D;
  IndexRef partners;       // the other table's index per sample (B,)
};

template <typename T, int VEC>
__global__ void segment_chunk_kernel(SegmentArgs args, const acc_t<T>* __restrict__ coef, TableRef<T> partner_table,
                                     T* __restrict__ grad_w, T* __restrict__ grad_b, acc_t<T>* __restrict__ head,
                                     acc_t<T>* __restrict__ tail) {
  using A = acc_t<T>;
  const int64_t chunk = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t begin = chunk * kChunk;
  if (begin >= args.N) return;  // whole warps exit together
  const int64_t end = min(args.N, begin + kChunk);
  const int64_t D = args.D;
  // Lane l fetches entry begin + l once; the walk below broadcasts it (kChunk == kWarpSize).
  int64_t my_key = -1, my_partner = 0;
  A my_coef = A(0);
  if (begin + lane < end) {
    my_key = args.keys[begin + lane];
    const int64_t sample = args.order[begin + lane];
    my_coef = coef[sample];
    if (grad_w != nullptr) my_partner = args.partners[sample];
  }
  const int64_t key_before = begin > 0 ? args.keys[begin - 1] : -1;
  const int64_t key_after = end < args.N ? args.keys[end] : -1;
  const int64_t width = D + 1;
  const int64_t col_extent = grad_w != nullptr ? D : 1;  // one pass for the bias alone
  for (int64_t col0 = 0; col0 < col_extent; col0 += kWarpSize * VEC) {
    const int64_t c = col0 + static_cast<int64_t>(lane) * VEC;
    const bool has_cols = grad_w != nullptr && c < D;
    A acc[VEC];
    A bias_acc = A(0);
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc[j] = A(0);
    int piece_begin = 0;
    const int count = static_cast<int>(end - begin);
    for (int e = 0; e < count; ++e) {
      const int64_t key = __shfl_sync(kFullWarpMask, my_key, e);
      const A cf = __shfl_sync(kFullWarpMask, my_coef, e);
      const int64_t partner = __shfl_sync(kFullWarpMask, my_partner, e);
      if (has_cols) {
        const T* row = partner_table.row(partner);
        if (VEC > 1) {
          const Vec<T, VEC> r = *reinterpret_cast<const Vec<T, VEC>*>(row + c);
#pragma unroll
          for (int j = 0; j < VEC; ++j) acc[j] += cf * static_cast<A>(r.v[j]);
        } else {
          acc[0] += cf * static_cast<A>(row[c * partner_table.col_stride]);
        }
      }
      bias_acc += cf;
      const bool last_of_piece = e + 1 == count || __shfl_sync(kFullWarpMask, my_key, e + 1) != key;
      if (!last_of_piece) continue;
      const bool starts_before = piece_begin == 0 && key_before == key;
      const bool continues_after = e + 1 == count && key_after == key;
      A* slot = nullptr;
      if (starts_before) {
        slot = head + chunk * width;
      } else if (continues_after) {
        slot = tail + chunk * width;
      }
      if (has_cols) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          if (slot != nullptr) {
            slot[c + j] = acc[j];
          } else {
            grad_w[key * D + c + j] = static_cast<T>(acc[j]);
          }
          acc[j] = A(0);
        }
      }
      if (col0 == 0 && lane == 0 && grad_b != nullptr) {
        if (slot != nullptr) {
          slot[D] = bias_acc;
        } else {
          grad_b[key] = static_cast<T>(bias_acc);
        }
      }
      bias_acc = A(0);
      piece_begin = e + 1;
    }
  }
}

// One warp per chunk; the warp of the chunk where a cut segment begins finishes that segment.
template <typename T>
__global__ void segment_carry_kernel(SegmentArgs args, T* __restrict__ grad_w, T* __restrict__ grad_b,
                                     const acc_t<T>* __restrict__ head, const acc_t<T>* __restrict__ tail) {
  using A = acc_t<T>;
  const int64_t chunk = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t chunks = (args.N + kChunk - 1) / kChunk;
  if (chunk >= chunks) return;
  const int64_t begin = chunk * kChunk;
  const int64_t end = min(args.N, begin + kChunk);
  const int64_t key = args.keys[end - 1];
  const bool continues_after = end < args.N && args.keys[end] == key;
  const bool starts_before = begin > 0 && args.keys[begin] == key && args.keys[begin - 1] == key;
  if (!continues_after || starts_before) return;
  // Chunks chunk+1 .. last hold the head pieces of this segment; the last is where it stops.
  int64_t last = chunk + 1;
  while ((last + 1) * kChunk < args.N && args.keys[(last + 1) * kChunk] == key) ++last;
  const int64_t D = args.D, width = D + 1;
  const int64_t col_extent = grad_w != nullptr ? D : 0;
  for (int64_t c = lane; c < col_extent; c += kWarpSize) {
    A sum = tail[chunk * width + c];
    for (int64_t k = chunk + 1; k <= last; ++k) sum += head[k * width + c];
    grad_w[key * D + c] = static_cast<T>(sum);
  }
  if (grad_b != nullptr && lane == 0) {
    A sum = tail[chunk * width + D];
    for (int64_t k = chunk + 1; k <= last; ++k) sum += head[k * width + D];
    grad_b[key] = static_cast<T>(sum);
  }
}

}  // namespace

void embedding_segment_reduce_cuda(const at::TensorBase& sorted_keys, const at::TensorBase& order,
                                   const at::TensorBase& coef, const at::TensorBase& partners,
                                   const at::TensorBase& partner_table, int64_t D, const at::TensorBase& grad_w,
                                   const at::TensorBase& grad_b) {
  const int64_t N = sorted_keys.size(0);
  if (N == 0 || (!grad_w.defined() && !grad_b.defined())) return;
  const at::TensorBase& like = grad_w.defined() ? grad_w : grad_b;
  dispatch_floating(like.scalar_type(), "embedding_dot_bias backward", [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const int64_t chunks = ceil_div(N, kChunk);
    const int64_t width = D + 1;
    auto& allocator = *c10::cuda::CUDACachingAllocator::get();
    c10::DataPtr head = allocator.allocate(sizeof(A) * chunks * width);
    c10::DataPtr tail = allocator.allocate(sizeof(A) * chunks * width);
    SegmentArgs args{index_ref(sorted_keys), order.const_data_ptr<int64_t>(), N, D,
                     grad_w.defined() ? index_ref(partners) : IndexRef{nullptr, 0, true}};
    T* grad_w_ptr = grad_w.defined() ? grad_w.mutable_data_ptr<T>() : nullptr;
    T* grad_b_ptr = grad_b.defined() ? grad_b.mutable_data_ptr<T>() : nullptr;
    const TableRef<T> table = table_ref<T>(partner_table);
    const int64_t warps_per_block = kThreads / kWarpSize;
    const int64_t blocks = ceil_div(chunks, warps_per_block);
    if (blocks >= (1LL << 31)) fail(ArgError::kValue, "embedding_dot_bias backward: ", N, " samples too large for one launch");
    // The gradient rows are contiguous (grad_w is a fresh (n, D) tensor), so only the partner
    // table decides whether rows move as 16-byte vectors.
    const bool vector = grad_w.defined() && rows_vectorizable<T>({&partner_table}, D) && aligned16(grad_w_ptr);
    const auto launch = [&](auto kernel) {
      kernel<<<static_cast<unsigned>(blocks), kThreads, 0, current_stream()>>>(
          args, coef.const_data_ptr<A>(), table, grad_w_ptr, grad_b_ptr, static_cast<A*>(head.get()),
          static_cast<A*>(tail.get()));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (vector) {
      launch(segment_chunk_kernel<T, vec16<T>()>);
    } else {
      launch(segment_chunk_kernel<T, 1>);
    }
    if (chunks > 1) {
      segment_carry_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, current_stream()>>>(
          args, grad_w_ptr, grad_b_ptr, static_cast<const A*>(head.get()), static_cast<const A*>(tail.get()));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

}  // namespace fastcore5
