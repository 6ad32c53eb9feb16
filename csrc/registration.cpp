// The torch library of the native backends: namespace fastcore5_native, the C++ ops for CPU and
// CUDA tensors (the op layer and the tests call torch.ops.fastcore5_native.*).
//
// Schemas (fixed by the cross-team contract; the Python op layer in fastcore5/ops calls these):
//   linear_relu_forward, linear_relu_backward           kernel-level ops, like the Triton
//   embedding_dot_bias_forward, embedding_dot_bias_backward   launchers of the same names in
//   sgd_step                                            fastcore5.kernels (plus allow_tf32)
//   sgd_sparse_step                                     CPU only: SGD of sparse COO gradients
//   linear_relu, embedding_dot_bias                     autograd ops: autograd in C++ (Autograd
//                                                       key), so an eager call crosses into C++ once
// Two sets of kernels implement them, both optional:
//   CUDA   csrc/*_op.cpp (argument checks, layouts, allocation) over the kernels in csrc/*.cu,
//          registered below when setup.py builds them (it then defines FASTCORE5_WITH_CUDA);
//   CPU    csrc/cpu/<op>.cpp, each registering its own ops for the CPU dispatch key.
// The autograd kernels of linear_relu and embedding_dot_bias serve both (csrc/linear_relu_autograd.cpp,
// csrc/embedding_dot_bias_autograd.cpp). This file and those are compiled in every build (setup.py's
// COMMON_SOURCES): this one holds the schemas, the error helper and the module; csrc/output_buffers.cpp,
// also common, where the kernels' outputs come from.
// Fake (meta) implementations for torch.compile and opcheck live in fastcore5/_native_ops.py, the
// module named by set_python_module below.
#include <Python.h>

#include <c10/util/Exception.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "ops.h"
#include "python_functions.h"

namespace fastcore5 {

// The one place the op layer throws: the c10 type decides the Python exception torch raises.
void throw_argument_error(ArgError kind, std::string message) {
  const c10::SourceLocation where{__func__, __FILE__, static_cast<uint32_t>(__LINE__)};
  switch (kind) {
    case ArgError::kType: throw c10::TypeError(where, std::move(message));
    case ArgError::kValue: throw c10::ValueError(where, std::move(message));
    case ArgError::kIndex: throw c10::IndexError(where, std::move(message));
    case ArgError::kRuntime: break;
  }
  throw c10::Error(where, std::move(message));
}

namespace {

std::vector<PyMethodDef>& python_functions() {
  static std::vector<PyMethodDef> functions;  // built by static initialisers, before PyInit__C runs
  return functions;
}

}  // namespace

bool add_python_function(const PyMethodDef& function) {
  python_functions().push_back(function);
  return true;
}

}  // namespace fastcore5

TORCH_LIBRARY(fastcore5_native, m) {
  // torch requires a C++-defined op with a Python fake to name the module registering it.
  m.set_python_module("fastcore5._native_ops");
  m.def("linear_relu_forward(Tensor x, Tensor weight, Tensor? bias, bool allow_tf32) -> Tensor");
  m.def(
      "linear_relu_backward(Tensor grad_out, Tensor out, Tensor? x, Tensor? weight, bool need_input_grad, "
      "bool need_weight_grad, bool need_bias_grad, bool allow_tf32) -> (Tensor, Tensor, Tensor)");
  m.def("linear_relu(Tensor x, Tensor weight, Tensor? bias, bool allow_tf32) -> Tensor");
  m.def(
      "embedding_dot_bias_forward(Tensor users, Tensor items, Tensor u_weight, Tensor i_weight, Tensor u_bias, "
      "Tensor i_bias, float? y_lo, float? y_hi, Tensor(a!)? index_errors) -> Tensor");
  m.def(
      "embedding_dot_bias_backward(Tensor grad_out, Tensor users, Tensor items, Tensor? u_weight, Tensor? i_weight, "
      "Tensor? u_bias, Tensor? i_bias, int num_users, int num_items, float? y_lo, float? y_hi, bool need_u_weight, "
      "bool need_i_weight, bool need_u_bias, bool need_i_bias, bool deterministic, bool sparse) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "embedding_dot_bias(Tensor users, Tensor items, Tensor u_weight, Tensor i_weight, Tensor u_bias, "
      "Tensor i_bias, float? y_lo, float? y_hi, bool sparse, Tensor(a!)? index_errors) -> Tensor");
  m.def(
      "sgd_step(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] momentum_buffers, Tensor? lr_tensor, "
      "float lr, float momentum, float dampening, float weight_decay, bool nesterov, bool maximize, "
      "bool decoupled_weight_decay, bool first_step, Tensor? grad_scale, Tensor? found_inf, Tensor? skip_flag) -> ()");
  // A step of params with sparse COO gradients (one sparse dimension), each given as its indices
  // (nnz,) and values (nnz, *param.shape[1:]); CPU only (csrc/cpu/sgd_sparse.cpp).
  m.def(
      "sgd_sparse_step(Tensor(a!)[] params, Tensor[] indices, Tensor[] values, Tensor(b!)[] momentum_buffers, "
      "Tensor? lr_tensor, float lr, float momentum, float dampening, float weight_decay, bool nesterov, "
      "bool maximize, bool decoupled_weight_decay, bool first_step, Tensor? grad_scale, Tensor? found_inf, "
      "Tensor? skip_flag) -> ()");
}

#ifdef FASTCORE5_WITH_CUDA
TORCH_LIBRARY_IMPL(fastcore5_native, CUDA, m) {
  m.impl("linear_relu_forward", &fastcore5::linear_relu_forward);
  m.impl("linear_relu_backward", &fastcore5::linear_relu_backward);
  m.impl("linear_relu", &fastcore5::linear_relu_forward);  // below autograd
  m.impl("embedding_dot_bias_forward", &fastcore5::embedding_dot_bias_forward);
  m.impl("embedding_dot_bias_backward", &fastcore5::embedding_dot_bias_backward);
  m.impl("embedding_dot_bias", &fastcore5::embedding_dot_bias_inference);
  m.impl("sgd_step", &fastcore5::sgd_step);
}
#endif  // FASTCORE5_WITH_CUDA

// `import fastcore5._C` loads this library, whose static initialisers above register the ops; the
// module holds only the plain functions the sources added (python_functions.h): no pybind11, the
// ops are reached through torch.ops.fastcore5_native.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static std::vector<PyMethodDef> table;
  if (table.empty()) {
    table = fastcore5::python_functions();
    table.push_back({nullptr, nullptr, 0, nullptr});
  }
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                               "fastcore5's C++ ops (CPU, and CUDA when built), registered as torch.ops.fastcore5_native",
                               -1, table.data()};
  return PyModule_Create(&module);
}
