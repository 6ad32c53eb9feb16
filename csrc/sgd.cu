// Multi-tensor SGD step: torch.optim.SGD's update for a whole list of tensors in one launch.
//
// Contract (preconditions guaranteed by csrc/registration.cpp):
//   params[t], grads[t] and (with momentum) momentum_buffers[t] share dtype T, device, shape and
//   strides, and are dense (non-overlapping, every element of the storage span used), so the
//   kernel walks numel() consecutive elements from each data pointer.
//   metadata: int64 device tensor laid out by sgd_metadata_layout (pointers, chunk prefix sums,
//   element counts). lr_tensor / grad_scale / found_inf: null or one element of any floating
//   dtype on the device; skip_flag: null or int64 on the device (EmbeddingDotBias' index_errors,
//   whose element 0 counts bad indices); all read by every block (no host synchronisation).
// Per element, in fp32 (fp64 for fp64 tensors), each of p, grad, buf read once, written once:
//   g = grad / grad_scale                    (with a GradScaler; the quotient is written back to grad)
//   g = -g                                   (maximize)
//   p = p * (1 - lr*wd)  or  g = g + wd*p    (decoupled or L2 weight decay)
//   buf = g (first step)  or  buf = momentum*buf + (1 - dampening)*g
//   g = g + momentum*buf (nesterov)  or  g = buf
//   p = p - lr*g
// A nonzero found_inf or skip_flag[0] makes every block return before touching memory: params,
// grads and buffers keep their values (torch.amp.GradScaler's skipped step; a batch with a bad
// EmbeddingDotBias index). Chunks never overlap: no atomics.
// Work split: each tensor is cut into kChunk-element chunks, one block per chunk; a block finds
// its tensor by binary search over the chunk prefix sums. Accesses are 16 bytes wide when the
// tensor's pointers are 16-byte aligned (chunk starts are multiples of kChunk, so every
// vector stays aligned; the test runs per tensor, on the device); a tensor's last partial vector
// is done element by element.
#include "common.cuh"
#include "fastcore5.h"

namespace fastcore5 {
namespace {

constexpr int kThreads = kThreadsPerBlock;
constexpr int64_t kChunk = 16384;  // elements per block: 64 KiB of fp32 params

// A one-element scalar of any floating dtype, read on the device.
struct ScalarRef {
  const void* ptr;
  enum Dtype { kFloat, kDouble, kHalf, kBFloat16 } dtype;  // c10::ScalarType is not usable on the device
  template <typename A>
  __device__ __forceinline__ A load() const {
    switch (dtype) {
      case kDouble: return static_cast<A>(*static_cast<const double*>(ptr));
      case kHalf: return static_cast<A>(static_cast<float>(*static_cast<const c10::Half*>(ptr)));
      case kBFloat16: return static_cast<A>(static_cast<float>(*static_cast<const c10::BFloat16*>(ptr)));
      default: return static_cast<A>(*static_cast<const float*>(ptr));
    }
  }
};

ScalarRef scalar_ref(const at::TensorBase& t) {
  if (!t.defined()) return ScalarRef{nullptr, ScalarRef::kFloat};
  ScalarRef::Dtype code = ScalarRef::kFloat;
  switch (t.scalar_type()) {
    case c10::ScalarType::Float: code = ScalarRef::kFloat; break;
    case c10::ScalarType::Double: code = ScalarRef::kDouble; break;
    case c10::ScalarType::Half: code = ScalarRef::kHalf; break;
    case c10::ScalarType::BFloat16: code = ScalarRef::kBFloat16; break;
    default: fail(ArgError::kType, "sgd: scalar tensors must be floating point, got ", t.scalar_type());
  }
  return ScalarRef{t.const_data_ptr(), code};
}

struct SgdParams {
  const int64_t* metadata;
  int64_t tensors;
  ScalarRef lr_tensor, grad_scale, found_inf;
  const int64_t* skip_flag;
  double lr, momentum, keep, weight_decay;  // keep = 1 - dampening
  bool has_momentum, first_step, nesterov, maximize, decoupled;
};

template <typename T, typename A>
__device__ __forceinline__ void sgd_element(T& p_io, T& g_io, T* buf_io, A lr, A scale, bool has_scale,
                                            const SgdParams& P, A momentum, A keep, A wd) {
  A p = static_cast<A>(p_io);
  A g = static_cast<A>(g_io);
  if (has_scale) {
    g = g / scale;
    g_io = static_cast<T>(g);
  }
  if (P.maximize) g = -g;
  if (wd != A(0)) {
    if (P.decoupled) {
      p = p * (A(1) - lr * wd);
    } else {
      g = g + wd * p;
    }
  }
  if (P.has_momentum) {
    A buf = P.first_step ? g : momentum * static_cast<A>(*buf_io) + keep * g;
    *buf_io = static_cast<T>(buf);
    g = P.nesterov ? g + momentum * buf : buf;
  }
  p_io = static_cast<T>(p - lr * g);
}

template <typename T, int VEC>
__global__ void sgd_kernel(SgdParams P) {
  using A = acc_t<T>;
  if (P.found_inf.ptr != nullptr && P.found_inf.load<float>() != 0.0f) return;
  if (P.skip_flag != nullptr && *P.skip_flag != 0) return;
  const int64_t T_ = P.tensors;
  const int64_t* pointers = P.metadata;               // 3*T: param, grad, buffer addresses
  const int64_t* prefix = P.metadata + 3 * T_;        // T+1 chunk prefix sums
  const int64_t* numels = P.metadata + 4 * T_ + 1;    // T element counts
  const int64_t block = blockIdx.x;
  int64_t lo = 0, hi = T_ - 1;  // the last tensor t with prefix[t] <= block
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (prefix[mid] <= block) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const int64_t t = lo;
  const int64_t start = (block - prefix[t]) * kChunk;
  const int64_t count = min(kChunk, numels[t] - start);
  T* p = reinterpret_cast<T*>(pointers[t]) + start;
  T* g = reinterpret_cast<T*>(pointers[T_ + t]) + start;
  T* b = P.has_momentum ? reinterpret_cast<T*>(pointers[2 * T_ + t]) + start : nullptr;

  const A lr = P.lr_tensor.ptr != nullptr ? P.lr_tensor.load<A>() : static_cast<A>(P.lr);
  const bool has_scale = P.grad_scale.ptr != nullptr;
  const A scale = has_scale ? P.grad_scale.load<A>() : A(1);
  const A momentum = static_cast<A>(P.momentum), keep = static_cast<A>(P.keep), wd = static_cast<A>(P.weight_decay);

  // 16-byte accesses when all of this tensor's pointers are 16-byte aligned (chunk starts are
  // multiples of kChunk, so the chunk's pointers are then aligned too); else element by element.
  const bool aligned = aligned16(p) && aligned16(g) && (b == nullptr || aligned16(b));
  const int64_t vectors = aligned ? count / VEC : 0;
  for (int64_t v = threadIdx.x; v < vectors; v += kThreads) {
    Vec<T, VEC> pv = reinterpret_cast<Vec<T, VEC>*>(p)[v];
    Vec<T, VEC> gv = reinterpret_cast<Vec<T, VEC>*>(g)[v];
    Vec<T, VEC> bv = {};
    if (b != nullptr && !P.first_step) bv = reinterpret_cast<Vec<T, VEC>*>(b)[v];
#pragma unroll
    for (int j = 0; j < VEC; ++j) sgd_element<T, A>(pv.v[j], gv.v[j], &bv.v[j], lr, scale, has_scale, P, momentum, keep, wd);
    reinterpret_cast<Vec<T, VEC>*>(p)[v] = pv;
    if (has_scale) reinterpret_cast<Vec<T, VEC>*>(g)[v] = gv;
    if (b != nullptr) reinterpret_cast<Vec<T, VEC>*>(b)[v] = bv;
  }
  for (int64_t e = vectors * VEC + threadIdx.x; e < count; e += kThreads) {
    T buf_value = b != nullptr ? b[e] : T(0);
    T grad_value = g[e];
    sgd_element<T, A>(p[e], grad_value, &buf_value, lr, scale, has_scale, P, momentum, keep, wd);
    if (has_scale) g[e] = grad_value;
    if (b != nullptr) b[e] = buf_value;
  }
}

}  // namespace

std::vector<int64_t> sgd_metadata_layout(const std::vector<at::TensorBase>& params,
                                         const std::vector<at::TensorBase>& grads,
                                         const std::vector<at::TensorBase>& momentum_buffers, int64_t* total_chunks) {
  const int64_t T = static_cast<int64_t>(params.size());
  std::vector<int64_t> meta(5 * T + 1, 0);
  int64_t chunks = 0;
  for (int64_t t = 0; t < T; ++t) {
    meta[t] = reinterpret_cast<int64_t>(params[t].data_ptr());
    meta[T + t] = reinterpret_cast<int64_t>(grads[t].data_ptr());
    meta[2 * T + t] = momentum_buffers.empty() ? 0 : reinterpret_cast<int64_t>(momentum_buffers[t].data_ptr());
    meta[3 * T + t] = chunks;
    meta[4 * T + 1 + t] = params[t].numel();
    chunks += ceil_div(params[t].numel(), kChunk);
  }
  meta[4 * T] = chunks;
  *total_chunks = chunks;
  return meta;
}

void sgd_step_cuda(const std::vector<at::TensorBase>& params, const at::TensorBase& metadata,
                   const at::TensorBase& lr_tensor, const at::TensorBase& grad_scale, const at::TensorBase& found_inf,
                   const at::TensorBase& skip_flag, int64_t total_chunks, const SgdOptions& options) {
  if (params.empty() || total_chunks == 0) return;
  if (total_chunks >= (1LL << 31)) fail(ArgError::kValue, "sgd: ", total_chunks, " chunks are too many for one launch");
  SgdParams P;
  P.metadata = metadata.const_data_ptr<int64_t>();
  P.tensors = static_cast<int64_t>(params.size());
  P.lr_tensor = scalar_ref(lr_tensor);
  P.grad_scale = scalar_ref(grad_scale);
  P.found_inf = scalar_ref(found_inf);
  P.skip_flag = skip_flag.defined() ? skip_flag.const_data_ptr<int64_t>() : nullptr;
  P.lr = options.lr;
  P.momentum = options.momentum;
  P.keep = 1.0 - options.dampening;
  P.weight_decay = options.weight_decay;
  P.has_momentum = options.momentum != 0.0;
  P.first_step = options.first_step;
  P.nesterov = options.nesterov && P.has_momentum;
  P.maximize = options.maximize;
  P.decoupled = options.decoupled_weight_decay;
  dispatch_floating(params[0].scalar_type(), "sgd", [&](auto tag) {
    using T = decltype(tag);
    sgd_kernel<T, vec16<T>()><<<static_cast<unsigned>(total_chunks), kThreads, 0, current_stream()>>>(P);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace fastcore5
