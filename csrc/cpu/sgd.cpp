// The CPU kernel of sgd_step: torch.optim.SGD's update for a whole list of tensors in one
// at::parallel_for, the contract of csrc/sgd.cu (its header comment) on CPU tensors.
//
// Per element, in fp32 (fp64 for fp64 tensors), each of p, grad, buf read once, written once:
//   g = grad / grad_scale                    (with a GradScaler; the quotient is written back to grad)
//   g = -g                                   (maximize)
//   p = p * (1 - lr*wd)  or  g = g + wd*p    (decoupled or L2 weight decay)
//   buf = g (first step)  or  buf = momentum*buf + (1 - dampening)*g
//   g = g + momentum*buf (nesterov)  or  g = buf
//   p = p - lr*g
// lr_tensor, grad_scale, found_inf and skip_flag are CPU tensors: read once per call on the host,
// which costs no synchronisation here. A nonzero found_inf or skip_flag[0] returns before
// anything is written.
//
// Work split, like the GPU's multi-tensor table: every tensor is cut into kChunk-element chunks,
// numbered across all tensors, and one at::parallel_for hands each thread a run of consecutive
// chunks (which it walks tensor by tensor, one call per tensor piece); a step of fewer than
// kParallelFromElements elements stays on the calling thread. Host work is O(number of tensors)
// per call of the op; fastcore5.optim.SGD keeps its spans between steps instead (sgd_plan.cpp),
// and its contiguous mode (fastcore5/optim/flat.py) has a few flat ranges, so that mode's host
// work does not grow with the model. A chunk is a whole number of 64-byte cache
// lines for every dtype, so two threads never write the same line of an aligned tensor.
// Every element, a tensor's tail included, goes through the same at::vec::Vectorized code (the
// tail through a partial load and store): an element's result does not depend on where a
// thread's range starts, so any thread count gives bitwise the same result.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "../sgd_checks.h"
#include "sgd_kernel.h"
#include "sgd_update.h"

namespace fastcore5 {
namespace cpu_sgd {
namespace {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;

constexpr int64_t kChunksPerThreadAtLeast = 4;  // at::parallel_for's grain: smaller steps run on one thread
// A step over fewer elements runs on the calling thread whatever its number of chunks: a fork and
// join costs more than 64k elements of SGD (~1.3 MB moved, ~30 us on one core), and on a loaded
// machine a join can wait milliseconds for a descheduled thread. Many tiny tensors (2000 of 16
// elements: one chunk each) would otherwise fork for 32k elements of work. Torch's own CPU loops
// parallelise from 32k elements per thread (at::internal::GRAIN_SIZE).
constexpr int64_t kParallelFromElements = 65536;

// n consecutive elements from p, g and (with momentum) b, for fp32 and fp64 tensors.
template <typename scalar_t>
void step_full_precision(scalar_t* p, scalar_t* g, scalar_t* b, int64_t n, const Update<scalar_t>& u) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const bool read_buf = u.has_momentum && !u.first_step;
  for (int64_t i = 0; i < n; i += Vec::size()) {
    const int64_t count = std::min<int64_t>(Vec::size(), n - i);
    const bool full = count == Vec::size();
    auto load = [&](const scalar_t* ptr) { return full ? Vec::loadu(ptr + i) : Vec::loadu(ptr + i, count); };
    Vec pv = load(p), gv = load(g), bv = read_buf ? load(b) : Vec(0);
    u.apply(pv, gv, bv);
    pv.store(p + i, count);
    if (u.has_scale) gv.store(g + i, count);
    if (u.has_momentum) bv.store(b + i, count);
  }
}

// The same for bf16 and fp16 tensors: each vector widened to two fp32 vectors, one rounding per store.
template <typename scalar_t>
void step_reduced_precision(scalar_t* p, scalar_t* g, scalar_t* b, int64_t n, const Update<float>& u) {
  using Vec = at::vec::Vectorized<scalar_t>;
  using FVec = at::vec::Vectorized<float>;
  const bool read_buf = u.has_momentum && !u.first_step;
  for (int64_t i = 0; i < n; i += Vec::size()) {
    const int64_t count = std::min<int64_t>(Vec::size(), n - i);
    const bool full = count == Vec::size();
    auto load = [&](const scalar_t* ptr) {
      return at::vec::convert_to_float<scalar_t>(full ? Vec::loadu(ptr + i) : Vec::loadu(ptr + i, count));
    };
    auto [p0, p1] = load(p);
    auto [g0, g1] = load(g);
    FVec b0(0), b1(0);
    if (read_buf) std::tie(b0, b1) = load(b);
    u.apply(p0, g0, b0);
    u.apply(p1, g1, b1);
    at::vec::convert_from_float<scalar_t>(p0, p1).store(p + i, count);
    if (u.has_scale) at::vec::convert_from_float<scalar_t>(g0, g1).store(g + i, count);
    if (u.has_momentum) at::vec::convert_from_float<scalar_t>(b0, b1).store(b + i, count);
  }
}

template <typename scalar_t, typename acc_t>
void run_step(const std::vector<TensorSpan>& spans, int64_t total_chunks, int64_t total_numel,
              const Update<acc_t>& update) {
  auto walk = [&](int64_t begin, int64_t end) {
    // The span owning chunk ``begin``: the last one numbered at or before it (an empty tensor
    // owns no chunk and shares its first_chunk with the next tensor, which comes after it).
    auto span = std::upper_bound(spans.begin(), spans.end(), begin,
                                 [](int64_t chunk, const TensorSpan& s) { return chunk < s.first_chunk; }) - 1;
    for (int64_t chunk = begin; chunk < end; ++span) {
      const int64_t span_chunks = chunks_of(span->numel);
      const int64_t stop = std::min(end, span->first_chunk + span_chunks);
      if (stop <= chunk) continue;  // an empty tensor
      const int64_t start = (chunk - span->first_chunk) * kChunk;
      const int64_t count = std::min(span->numel, (stop - span->first_chunk) * kChunk) - start;
      auto* p = static_cast<scalar_t*>(span->p) + start;
      auto* g = static_cast<scalar_t*>(span->g) + start;
      auto* b = span->b == nullptr ? nullptr : static_cast<scalar_t*>(span->b) + start;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        step_full_precision<scalar_t>(p, g, b, count, update);
      } else {
        step_reduced_precision<scalar_t>(p, g, b, count, update);
      }
      chunk = stop;
    }
  };
  if (total_numel < kParallelFromElements) {
    walk(0, total_chunks);
  } else {
    at::parallel_for(0, total_chunks, kChunksPerThreadAtLeast, walk);
  }
}

}  // namespace

void run_spans(c10::ScalarType dtype, const std::vector<TensorSpan>& spans, int64_t total_chunks, const StepArgs& a) {
  if (a.found_inf.has_value() && read_scalar(*a.found_inf) != 0.0) return;
  if (a.skip_flag.has_value() && *a.skip_flag->const_data_ptr<int64_t>() != 0) return;
  if (total_chunks == 0) return;
  int64_t total_numel = 0;
  for (const TensorSpan& span : spans) total_numel += span.numel;
  const double lr = a.lr_tensor.has_value() ? read_scalar(*a.lr_tensor) : a.lr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "sgd_step", [&] {
    using acc_t = at::opmath_type<scalar_t>;  // float, or double for double
    run_step<scalar_t, acc_t>(spans, total_chunks, total_numel,
                              make_update<acc_t>(lr, a.momentum, a.dampening, a.weight_decay, a.nesterov, a.maximize,
                                                 a.decoupled_weight_decay, a.first_step, a.grad_scale));
  });
}

namespace {

void sgd_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                  const OptionalTensor& lr_tensor, double lr, double momentum, double dampening, double weight_decay,
                  bool nesterov, bool maximize, bool decoupled_weight_decay, bool first_step,
                  const OptionalTensor& grad_scale, const OptionalTensor& found_inf, const OptionalTensor& skip_flag) {
  constexpr const char* op = "fastcore5_native::sgd_step";
  if (params.empty()) return;
  const bool has_momentum = momentum != 0.0;
  check_sgd_arguments(op, c10::DeviceType::CPU, params, grads, momentum_buffers, has_momentum, lr_tensor, grad_scale,
                      found_inf, skip_flag);
  std::vector<TensorSpan> spans;
  spans.reserve(params.size());
  int64_t total_chunks = 0;
  for (const auto t : c10::irange(params.size())) {
    const int64_t numel = params[t].numel();
    spans.push_back({params[t].data_ptr(), grads[t].data_ptr(), has_momentum ? momentum_buffers[t].data_ptr() : nullptr,
                     numel, total_chunks});
    total_chunks += chunks_of(numel);
  }
  const StepArgs args{lr_tensor, lr, momentum, dampening, weight_decay, nesterov, maximize, decoupled_weight_decay,
                      first_step, grad_scale, found_inf, skip_flag};
  run_spans(params[0].scalar_type(), spans, total_chunks, args);
}

}  // namespace
}  // namespace cpu_sgd
}  // namespace fastcore5

TORCH_LIBRARY_IMPL(fastcore5_native, CPU, m) {
  m.impl("sgd_step", &fastcore5::cpu_sgd::sgd_step_cpu);
}
