// Argument checks of the op layer (csrc/*_op.cpp, csrc/cpu/*.cpp). Every check reads only
// defined tensors (optional arguments are unwrapped after has_value()) and builds its message
// only when it fails; errors.h says how the error is raised.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>

#include "errors.h"

namespace fastcore5 {

// ---- the checks shared by the ops ----

// ``t`` lives on a device of ``type`` (the kernel's: CUDA in csrc/*_op.cpp, CPU in csrc/cpu/).
inline void check_device_type(const char* op, const std::string& name, const at::Tensor& t, c10::DeviceType type) {
  if (t.device().type() != type) {
    fail(ArgError::kRuntime, op, ": ", name, " must be a ", c10::DeviceTypeName(type), " tensor, got a ",
         t.device().type(), " tensor");
  }
}

inline void check_cuda(const char* op, const std::string& name, const at::Tensor& t) {
  check_device_type(op, name, t, c10::DeviceType::CUDA);
}

inline bool is_floating(c10::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16;
}

inline void check_floating(const char* op, const std::string& name, const at::Tensor& t) {
  if (!is_floating(t.scalar_type())) {
    fail(ArgError::kType, op, ": ", name, " has dtype ", t.scalar_type(),
         "; expected float32, float64, float16 or bfloat16");
  }
}

inline void check_dim(const char* op, const std::string& name, const at::Tensor& t, int64_t dim) {
  if (t.dim() != dim) fail(ArgError::kValue, op, ": ", name, " must have ", dim, " dimensions, got shape ", t.sizes());
}

// Same device and dtype as ``ref``.
inline void check_like(const char* op, const std::string& name, const at::Tensor& t, const char* ref_name,
                       const at::Tensor& ref) {
  if (t.device() != ref.device()) {
    fail(ArgError::kRuntime, op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ", ref.device());
  }
  if (t.scalar_type() != ref.scalar_type()) {
    fail(ArgError::kType, op, ": ", name, " has dtype ", t.scalar_type(), " but ", ref_name, " has dtype ",
         ref.scalar_type());
  }
}

// A 1-D int32/int64 index tensor on a device of ``device_type`` (CUDA for csrc/*_op.cpp).
inline void check_index(const char* op, const char* name, const at::Tensor& t,
                        c10::DeviceType device_type = c10::DeviceType::CUDA) {
  check_device_type(op, name, t, device_type);
  check_dim(op, name, t, 1);
  if (t.scalar_type() != at::kInt && t.scalar_type() != at::kLong) {
    fail(ArgError::kType, op, ": ", name, " has dtype ", t.scalar_type(), "; expected int32 or int64");
  }
}

// A fresh output tensor (large CPU ones from a cache of freed outputs); NaN-filled when
// FASTCORE5_POISON=1. csrc/output_buffers.cpp.
at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options);

// A CPU byte buffer a kernel uses as scratch, from the same cache, so one kept between calls is
// bounded and released with the outputs (fastcore5.cpu_cache); never poisoned. Same file.
at::Tensor new_cpu_scratch(int64_t bytes);

inline at::Tensor or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() ? *t : at::Tensor();
}

}  // namespace fastcore5
