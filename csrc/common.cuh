// What the CUDA files share: dtype dispatch, 16-byte vectors, launch helpers.
#pragma once

#include <ATen/core/TensorBase.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <vector>

#include "errors.h"

namespace fastcore5 {

// Accumulation type: fp32 for every floating dtype but fp64, which keeps fp64.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };
template <typename T> using acc_t = typename Acc<T>::type;

// Call ``body(T{})`` with T the C++ type of ``dtype`` (float, double, c10::Half, c10::BFloat16).
template <typename Body>
void dispatch_floating(c10::ScalarType dtype, const char* what, Body&& body) {
  switch (dtype) {
    case c10::ScalarType::Float: body(float{}); break;
    case c10::ScalarType::Double: body(double{}); break;
    case c10::ScalarType::Half: body(c10::Half{}); break;
    case c10::ScalarType::BFloat16: body(c10::BFloat16{}); break;
    default: fail(ArgError::kType, what, ": unsupported dtype ", dtype, "; expected float32, float64, float16 or bfloat16");
  }
}

// VEC elements of T moved as one access: 16 bytes when VEC == 16 / sizeof(T).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

template <typename T>
constexpr int vec16() {
  return static_cast<int>(16 / sizeof(T));
}

__host__ __device__ inline bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// Threads per warp on every NVIDIA GPU (the device's warpSize is not a compile-time constant):
// lane numbers, one-warp work units and warp shuffles are written in it.
constexpr int kWarpSize = 32;
// Every lane of a warp: the mask of a shuffle that the whole warp takes part in.
constexpr unsigned kFullWarpMask = 0xffffffffu;

// Threads per block of the elementwise, per-sample and SGD kernels: 8 warps, small enough for
// several resident blocks per SM (latency hiding across blocks) and a multiple of every group
// size G <= kWarpSize the EmbeddingDotBias kernels use.
constexpr int kThreadsPerBlock = 8 * kWarpSize;

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Multiprocessor count of the current device, cached per device (grid sizing only).
inline int sm_count() {
  static std::mutex mutex;
  static std::vector<int> counts;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  std::lock_guard<std::mutex> lock(mutex);
  if (static_cast<int>(counts.size()) <= device) counts.resize(device + 1, 0);
  if (counts[device] == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&counts[device], cudaDevAttrMultiProcessorCount, device));
  }
  return counts[device];
}

inline cudaStream_t current_stream() {
  return c10::cuda::getCurrentCUDAStream().stream();
}

}  // namespace fastcore5
