// The SGD op: sgd_step (one multi-tensor launch of csrc/sgd.cu per call).
//
// The per-tensor metadata (addresses, chunk counts) is built on the host and reaches the device
// through a pinned staging buffer and one asynchronous copy: the host never waits for the device.
// Under CUDA-graph capture the captured memcpy reads the staging buffer at every replay, so a
// staging buffer used in a capture is kept for the life of the process (a graph is replayed
// with the tensors it was captured with, so its metadata never changes). So that the capture
// itself allocates no host memory (cudaHostAlloc, or the caching host allocator's event queries,
// inside a capture are what CUDA may refuse), every eager call keeps one spare pinned block at
// least as large as its metadata; the warm-up calls that torch.cuda.graph requires before a
// capture leave the spare that the captured call then takes over.
#include "checks.h"
#include "fastcore5.h"
#include "ops.h"
#include "sgd_checks.h"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstring>
#include <mutex>
#include <vector>

namespace fastcore5 {
namespace {

bool capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

// The pinned blocks for captured copies. Blocks are never freed: a captured graph reads its block
// at every replay, and a spare that was outgrown may be freed only with a device sync.
struct CaptureStaging {
  std::mutex mutex;
  void* spare = nullptr;
  size_t spare_bytes = 0;
};

CaptureStaging& capture_staging() {
  static auto* staging = new CaptureStaging();  // leaked: outlives every graph
  return *staging;
}

// Eager call: make sure a spare of at least ``bytes`` is ready for a capture.
void keep_spare(size_t bytes) {
  CaptureStaging& staging = capture_staging();
  const std::lock_guard<std::mutex> lock(staging.mutex);
  if (staging.spare_bytes >= bytes) return;
  void* block = nullptr;
  C10_CUDA_CHECK(cudaHostAlloc(&block, bytes, cudaHostAllocDefault));
  staging.spare = block;
  staging.spare_bytes = bytes;
}

// Captured call: the spare, now owned by the graph. Without a large enough spare (no eager call
// of this size since the last capture took it, e.g. a second sgd_step in the same capture) a
// block is allocated here, which CUDA permits during capture on current drivers; if it refuses,
// C10_CUDA_CHECK raises its error and the capture fails cleanly.
void* capture_block(size_t bytes) {
  CaptureStaging& staging = capture_staging();
  const std::lock_guard<std::mutex> lock(staging.mutex);
  if (staging.spare_bytes >= bytes) {
    void* block = staging.spare;
    staging.spare = nullptr;
    staging.spare_bytes = 0;
    return block;
  }
  void* block = nullptr;
  C10_CUDA_CHECK(cudaHostAlloc(&block, bytes, cudaHostAllocDefault));
  return block;
}

// The metadata on the device, copied asynchronously from pinned memory.
Tensor stage_metadata(const std::vector<int64_t>& layout, const c10::Device& device) {
  const int64_t n = static_cast<int64_t>(layout.size());
  const size_t bytes = layout.size() * sizeof(int64_t);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  if (!capturing(stream)) {
    keep_spare(bytes);
    Tensor staging = at::empty({n}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    std::memcpy(staging.data_ptr<int64_t>(), layout.data(), bytes);
    // copy_ records the copy on the pinned block, so the caching host allocator does not hand
    // the block out again before the copy has read it.
    return staging.to(device, /*non_blocking=*/true);
  }
  void* block = capture_block(bytes);
  std::memcpy(block, layout.data(), bytes);
  Tensor metadata = at::empty({n}, at::TensorOptions().dtype(at::kLong).device(device));
  C10_CUDA_CHECK(cudaMemcpyAsync(metadata.data_ptr(), block, bytes, cudaMemcpyHostToDevice, stream));
  return metadata;
}

}  // namespace

void sgd_step(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
              const OptionalTensor& lr_tensor, double lr, double momentum, double dampening, double weight_decay,
              bool nesterov, bool maximize, bool decoupled_weight_decay, bool first_step,
              const OptionalTensor& grad_scale, const OptionalTensor& found_inf, const OptionalTensor& skip_flag) {
  constexpr const char* op = "fastcore5_native::sgd_step";
  if (params.empty()) return;
  const bool has_momentum = momentum != 0.0;
  check_sgd_arguments(op, c10::DeviceType::CUDA, params, grads, momentum_buffers, has_momentum, lr_tensor, grad_scale,
                      found_inf, skip_flag);
  const Tensor& first = params[0];
  const c10::cuda::CUDAGuard guard(first.device());

  const std::vector<at::TensorBase> p(params.begin(), params.end());
  const std::vector<at::TensorBase> g(grads.begin(), grads.end());
  const std::vector<at::TensorBase> b =
      has_momentum ? std::vector<at::TensorBase>(momentum_buffers.begin(), momentum_buffers.end())
                   : std::vector<at::TensorBase>();
  int64_t total_chunks = 0;
  const std::vector<int64_t> layout = sgd_metadata_layout(p, g, b, &total_chunks);
  if (total_chunks == 0) return;
  const Tensor metadata = stage_metadata(layout, first.device());

  SgdOptions options;
  options.lr = lr;
  options.momentum = momentum;
  options.dampening = dampening;
  options.weight_decay = weight_decay;
  options.nesterov = nesterov;
  options.maximize = maximize;
  options.decoupled_weight_decay = decoupled_weight_decay;
  options.first_step = first_step;
  sgd_step_cuda(p, metadata, or_undefined(lr_tensor), or_undefined(grad_scale), or_undefined(found_inf),
                or_undefined(skip_flag), total_chunks, options);
}

}  // namespace fastcore5
