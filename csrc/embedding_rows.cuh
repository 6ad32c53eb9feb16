// Row access shared by the EmbeddingDotBias kernels (csrc/embedding_dot_bias.cu) and the
// deterministic segment reduction (csrc/embedding_segment_reduce.cu): index vectors of either
// integer width at any stride, tables at any strides, and the test for 16-byte row accesses.
#pragma once

#include "common.cuh"

#include <initializer_list>

namespace fastcore5 {

// An index vector of either integer width, read at any stride.
struct IndexRef {
  const void* ptr;
  int64_t stride;
  bool wide;
  __device__ __forceinline__ int64_t operator[](int64_t s) const {
    return wide ? static_cast<const int64_t*>(ptr)[s * stride]
                : static_cast<int64_t>(static_cast<const int32_t*>(ptr)[s * stride]);
  }
};

inline IndexRef index_ref(const at::TensorBase& t) {
  return IndexRef{t.const_data_ptr(), t.stride(0), t.scalar_type() == c10::ScalarType::Long};
}

template <typename T>
struct TableRef {
  const T* ptr;
  int64_t row_stride, col_stride;
  __device__ __forceinline__ const T* row(int64_t r) const { return ptr + r * row_stride; }
};

template <typename T>
TableRef<T> table_ref(const at::TensorBase& t) {
  if (!t.defined()) return TableRef<T>{nullptr, 0, 0};
  return TableRef<T>{t.const_data_ptr<T>(), t.stride(0), t.dim() > 1 ? t.stride(1) : 1};
}

// 16-byte row accesses need unit column stride, D and the row stride multiples of VEC, an
// aligned base; checked for every table the kernel reads rows of.
template <typename T>
bool rows_vectorizable(std::initializer_list<const at::TensorBase*> tables, int64_t D) {
  constexpr int V = vec16<T>();
  if (V == 1 || D % V != 0) return false;
  for (const at::TensorBase* t : tables) {
    if (!t->defined()) continue;
    if (t->stride(1) != 1 || t->stride(0) % V != 0 || !aligned16(t->const_data_ptr())) return false;
  }
  return true;
}

}  // namespace fastcore5
