// The CPU SGD kernel's interface, shared by the op sgd_step (sgd.cpp), which builds its tensor
// spans on every call, and the optimizer's cached step plans (sgd_plan.cpp), which keep them.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace fastcore5 {
namespace cpu_sgd {

constexpr int64_t kChunk = 4096;  // elements: 16 KiB of fp32 params, a multiple of 64 bytes for every dtype

inline int64_t chunks_of(int64_t numel) { return (numel + kChunk - 1) / kChunk; }

// One tensor's share of the chunk numbering: chunks [first_chunk, first_chunk + chunks_of(numel)).
struct TensorSpan {
  void* p;
  void* g;
  void* b;  // nullptr without momentum
  int64_t numel;
  int64_t first_chunk;
};

// The scalar arguments of one step, as sgd_step takes them (LAUNCHER_SCHEMA in fastcore5/ops/sgd.py).
struct StepArgs {
  std::optional<at::Tensor> lr_tensor;
  double lr = 0.0, momentum = 0.0, dampening = 0.0, weight_decay = 0.0;
  bool nesterov = false, maximize = false, decoupled_weight_decay = false, first_step = false;
  std::optional<at::Tensor> grad_scale, found_inf, skip_flag;
};

// One step over ``spans`` (params of ``dtype``, numbered up to ``total_chunks``); the scalar
// tensors are read here, on the host, and a raised found_inf or skip_flag writes nothing. The
// arguments must have passed check_sgd_arguments (or the plan's equivalent checks).
void run_spans(c10::ScalarType dtype, const std::vector<TensorSpan>& spans, int64_t total_chunks, const StepArgs& args);

}  // namespace cpu_sgd
}  // namespace fastcore5
