// fastcore5.optim.SGD's CPU step plans: the tensors of one launch kept in C++ between steps, so
// that a step costs two plain Python calls instead of Python passes over every tensor plus a
// dispatcher call that unpacks three tensor lists (fastcore5/ops/sgd.py: cpu_step_plan).
//
//   sgd_cpu_plan(params, buffers, grads, gradless) -> plan, or None when the tensors do not fit
//       (then the optimizer steps through the op sgd_step, whose checks name what is wrong).
//       buffers: [] without momentum. grads: the gradients, fixed for the plan's life (contiguous
//       mode's flat views), or None: each step reads every param's .grad. gradless: params whose
//       .grad must stay None (only with grads None).
//   sgd_cpu_prepare(plan) -> bool: reads and checks this step's gradients and params. False when
//       anything differs from what the plan was made for (a gradient appeared, vanished, changed
//       layout, dtype, shape or strides; a param was replaced or cast): nothing is written, and the
//       optimizer plans again. Writes nothing either way, so the optimizer prepares every param
//       group before it steps any (a refused step changes nothing).
//   sgd_cpu_run(plan, hyper, first_step, grad_scale, found_inf, skip_flag): the step over the
//       prepared tensors; hyper is an SGDHyper (lr as a number or a one-element tensor on the CPU,
//       momentum, dampening, weight_decay, nesterov, maximize, decoupled_weight_decay), read here
//       (no Python conversion of each value per step). Then the params' version counters are
//       bumped, as the optimizer's op path does (autograd notices a param changed after it was
//       saved). The GIL is released while the kernel runs.
//
// Per tensor and step the plan reads the param's and the gradient's TensorImpl (the same facts
// check_sgd_arguments reads) and nothing else: no Python object is touched, nothing is allocated.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/python_variable.h>

#include <memory>
#include <optional>
#include <utility>
#include <vector>

#include "../python_functions.h"
#include "../sgd_checks.h"
#include "sgd_kernel.h"

namespace fastcore5 {
namespace cpu_sgd {
namespace {

using at::Tensor;
constexpr const char* kCapsuleName = "fastcore5.sgd_cpu_plan";
constexpr const char* kOp = "fastcore5._C.sgd_cpu_run";

// A plain dense CPU tensor the kernel may walk by address: no Python subclass, no lazy negation.
bool plain_dense_cpu(const Tensor& t, c10::ScalarType dtype) {
  const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  return impl->device_type() == c10::DeviceType::CPU && impl->layout() == c10::kStrided &&
         impl->dtype() == dtype && !impl->is_python_dispatch() && !impl->is_neg() && impl->has_storage() &&
         impl->is_non_overlapping_and_dense();
}

bool same_layout(const Tensor& a, const Tensor& b) {
  return a.sizes() == b.sizes() && a.strides() == b.strides();
}

class StepPlan {
 public:
  StepPlan(std::vector<Tensor> params, std::vector<Tensor> buffers, std::optional<std::vector<Tensor>> grads,
           std::vector<Tensor> gradless)
      : params_(std::move(params)), buffers_(std::move(buffers)), fixed_grads_(std::move(grads)),
        gradless_(std::move(gradless)), dtype_(params_.front().scalar_type()), spans_(params_.size()) {
    int64_t chunk = 0;
    for (size_t i = 0; i < params_.size(); ++i) {
      spans_[i].first_chunk = chunk;
      chunk += chunks_of(params_[i].numel());
    }
    total_chunks_ = chunk;
  }

  // Whether the tensors given at construction fit a plan (else the caller uses the op).
  bool fits() const {
    if (!buffers_.empty() && buffers_.size() != params_.size()) return false;
    if (fixed_grads_ && (fixed_grads_->size() != params_.size() || !gradless_.empty())) return false;
    for (size_t i = 0; i < params_.size(); ++i) {
      const Tensor& p = params_[i];
      if (!plain_dense_cpu(p, dtype_) || p.is_inference()) return false;
      if (!buffers_.empty() && !(plain_dense_cpu(buffers_[i], dtype_) && same_layout(buffers_[i], p))) return false;
      if (fixed_grads_ && !(plain_dense_cpu((*fixed_grads_)[i], dtype_) && same_layout((*fixed_grads_)[i], p))) {
        return false;
      }
    }
    return c10::isFloatingType(dtype_);
  }

  bool prepare() {
    prepared_ = false;
    const bool with_buffers = !buffers_.empty();
    for (size_t i = 0; i < params_.size(); ++i) {
      const Tensor& p = params_[i];
      const Tensor& g = fixed_grads_ ? (*fixed_grads_)[i] : p.unsafeGetTensorImpl()->grad();
      // A param whose .data was replaced keeps its place in the plan: it must still fit its buffer.
      if (!g.defined() || !plain_dense_cpu(p, dtype_) || !plain_dense_cpu(g, dtype_) || !same_layout(g, p)) return false;
      if (with_buffers && !same_layout(buffers_[i], p)) return false;
      TensorSpan& span = spans_[i];
      span.numel = p.numel();
      span.p = p.mutable_data_ptr();
      span.g = g.mutable_data_ptr();
      span.b = with_buffers ? buffers_[i].mutable_data_ptr() : nullptr;
    }
    for (const Tensor& p : gradless_) {
      if (p.unsafeGetTensorImpl()->grad().defined()) return false;
    }
    prepared_ = true;
    return true;
  }

  void run(const StepArgs& args) {
    if (!prepared_) {
      throw_argument_error(ArgError::kRuntime, std::string(kOp) + ": the plan was not prepared for this step");
    }
    if (fixed_grads_ == std::nullopt) prepared_ = false;  // the next step reads its own gradients
    if ((args.momentum != 0.0) != !buffers_.empty()) {
      throw_argument_error(ArgError::kValue, std::string(kOp) + ": momentum " +
                                                 (buffers_.empty() ? "!= 0 but the plan has no buffers"
                                                                   : "== 0 but the plan has buffers"));
    }
    const Tensor& first = params_.front();
    sgd_detail::check_scalar_tensor(kOp, "lr_tensor", args.lr_tensor, first);
    sgd_detail::check_scalar_tensor(kOp, "grad_scale", args.grad_scale, first);
    sgd_detail::check_scalar_tensor(kOp, "found_inf", args.found_inf, first);
    sgd_detail::check_skip_flag(kOp, args.skip_flag, first);
    run_spans(dtype_, spans_, total_chunks_, args);
    for (const Tensor& p : params_) p.unsafeGetTensorImpl()->bump_version();
  }

 private:
  std::vector<Tensor> params_, buffers_;
  std::optional<std::vector<Tensor>> fixed_grads_;
  std::vector<Tensor> gradless_;
  c10::ScalarType dtype_;
  std::vector<TensorSpan> spans_;
  int64_t total_chunks_ = 0;
  bool prepared_ = false;
};

// ---- the Python side: argument conversion and errors ----

// Sets the Python exception torch would raise for ``error`` (c10::ValueError -> ValueError, ...).
void set_python_error(const std::exception& error) {
  PyObject* type = PyExc_RuntimeError;
  const char* message = error.what();
  if (const auto* c10_error = dynamic_cast<const c10::Error*>(&error)) {
    message = c10_error->what_without_backtrace();
    if (dynamic_cast<const c10::TypeError*>(&error) != nullptr) type = PyExc_TypeError;
    if (dynamic_cast<const c10::ValueError*>(&error) != nullptr) type = PyExc_ValueError;
    if (dynamic_cast<const c10::IndexError*>(&error) != nullptr) type = PyExc_IndexError;
  }
  PyErr_SetString(type, message);
}

// A list or tuple of tensors; false with a TypeError set otherwise.
bool tensor_list(PyObject* object, const char* name, std::vector<Tensor>& out) {
  if (!PyList_Check(object) && !PyTuple_Check(object)) {
    PyErr_Format(PyExc_TypeError, "%s must be a list of tensors", name);
    return false;
  }
  const Py_ssize_t size = PySequence_Fast_GET_SIZE(object);
  PyObject** items = PySequence_Fast_ITEMS(object);
  out.reserve(static_cast<size_t>(size));
  for (Py_ssize_t k = 0; k < size; ++k) {
    if (!THPVariable_Check(items[k])) {
      PyErr_Format(PyExc_TypeError, "%s[%zd] must be a tensor", name, k);
      return false;
    }
    out.push_back(THPVariable_Unpack(items[k]));
  }
  return true;
}

bool optional_tensor(PyObject* object, const char* name, std::optional<Tensor>& out) {
  if (object == Py_None) return true;
  if (!THPVariable_Check(object)) {
    PyErr_Format(PyExc_TypeError, "%s must be a tensor or None", name);
    return false;
  }
  out = THPVariable_Unpack(object);
  return true;
}

StepPlan* plan_of(PyObject* capsule) {
  return static_cast<StepPlan*>(PyCapsule_GetPointer(capsule, kCapsuleName));  // NULL + TypeError if not a plan
}

void delete_plan(PyObject* capsule) {
  delete static_cast<StepPlan*>(PyCapsule_GetPointer(capsule, kCapsuleName));
}

PyObject* sgd_cpu_plan(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 4) {
    PyErr_SetString(PyExc_TypeError, "sgd_cpu_plan(params, buffers, grads, gradless) takes 4 arguments");
    return nullptr;
  }
  try {
    std::vector<Tensor> params, buffers, gradless;
    std::optional<std::vector<Tensor>> grads;
    if (!tensor_list(args[0], "params", params) || !tensor_list(args[1], "buffers", buffers) ||
        !tensor_list(args[3], "gradless", gradless)) {
      return nullptr;
    }
    if (args[2] != Py_None && !tensor_list(args[2], "grads", grads.emplace())) return nullptr;
    if (params.empty()) Py_RETURN_NONE;
    auto plan = std::make_unique<StepPlan>(std::move(params), std::move(buffers), std::move(grads),
                                           std::move(gradless));
    if (!plan->fits()) Py_RETURN_NONE;
    if (args[2] != Py_None && !plan->prepare()) Py_RETURN_NONE;  // fixed gradients: prepared once
    PyObject* capsule = PyCapsule_New(plan.get(), kCapsuleName, delete_plan);
    if (capsule != nullptr) plan.release();
    return capsule;
  } catch (const std::exception& error) {
    set_python_error(error);
    return nullptr;
  }
}

PyObject* sgd_cpu_prepare(PyObject*, PyObject* plan_capsule) {
  StepPlan* plan = plan_of(plan_capsule);
  if (plan == nullptr) return nullptr;
  try {
    return PyBool_FromLong(plan->prepare());
  } catch (const std::exception& error) {
    set_python_error(error);
    return nullptr;
  }
}

PyObject* sgd_cpu_run(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 6) {
    PyErr_SetString(PyExc_TypeError, "sgd_cpu_run(plan, hyper, first_step, grad_scale, found_inf, skip_flag) takes 6 arguments");
    return nullptr;
  }
  StepPlan* plan = plan_of(args[0]);
  if (plan == nullptr) return nullptr;
  PyObject* hyper = args[1];
  if (!PyTuple_Check(hyper) || PyTuple_GET_SIZE(hyper) != 7) {
    PyErr_SetString(PyExc_TypeError, "sgd_cpu_run: hyper must be an SGDHyper (a 7-tuple)");
    return nullptr;
  }
  StepArgs step;
  PyObject* lr = PyTuple_GET_ITEM(hyper, 0);
  if (THPVariable_Check(lr)) {
    step.lr_tensor = THPVariable_Unpack(lr);
  } else {
    step.lr = PyFloat_AsDouble(lr);
    if (step.lr == -1.0 && PyErr_Occurred()) return nullptr;
  }
  double* numbers[] = {&step.momentum, &step.dampening, &step.weight_decay};
  for (int k = 0; k < 3; ++k) {
    *numbers[k] = PyFloat_AsDouble(PyTuple_GET_ITEM(hyper, 1 + k));
    if (*numbers[k] == -1.0 && PyErr_Occurred()) return nullptr;
  }
  PyObject* flag_objects[] = {PyTuple_GET_ITEM(hyper, 4), PyTuple_GET_ITEM(hyper, 5), PyTuple_GET_ITEM(hyper, 6), args[2]};
  bool* flags[] = {&step.nesterov, &step.maximize, &step.decoupled_weight_decay, &step.first_step};
  for (int k = 0; k < 4; ++k) {
    const int value = PyObject_IsTrue(flag_objects[k]);
    if (value < 0) return nullptr;
    *flags[k] = value != 0;
  }
  if (!optional_tensor(args[3], "grad_scale", step.grad_scale) || !optional_tensor(args[4], "found_inf", step.found_inf) ||
      !optional_tensor(args[5], "skip_flag", step.skip_flag)) {
    return nullptr;
  }
  std::exception_ptr error;
  Py_BEGIN_ALLOW_THREADS
  try {
    plan->run(step);
  } catch (...) {
    error = std::current_exception();
  }
  Py_END_ALLOW_THREADS
  if (error) {
    try {
      std::rethrow_exception(error);
    } catch (const std::exception& e) {
      set_python_error(e);
    }
    return nullptr;
  }
  Py_RETURN_NONE;
}

const bool registered = add_python_function({"sgd_cpu_plan", reinterpret_cast<PyCFunction>(sgd_cpu_plan), METH_FASTCALL,
                                             "A CPU SGD step plan (csrc/cpu/sgd_plan.cpp), or None"}) &&
                        add_python_function({"sgd_cpu_prepare", sgd_cpu_prepare, METH_O,
                                             "Read and check a plan's gradients; False: plan again"}) &&
                        add_python_function({"sgd_cpu_run", reinterpret_cast<PyCFunction>(sgd_cpu_run), METH_FASTCALL,
                                             "One SGD step over a prepared plan"});

}  // namespace
}  // namespace cpu_sgd
}  // namespace fastcore5
