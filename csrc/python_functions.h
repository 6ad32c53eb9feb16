// Plain Python functions of the module fastcore5._C, beside the torch ops the library registers:
// for calls that must cost less than the dispatcher (fastcore5.optim.SGD's cached CPU step plans,
// csrc/cpu/sgd_plan.cpp). Each source adds its own while the library loads, as TORCH_LIBRARY_IMPL
// does for ops; PyInit__C (registration.cpp) puts them in the module.
#pragma once

#include <Python.h>

namespace fastcore5 {

// Adds ``function`` (a static PyMethodDef) to fastcore5._C; returns true, for a static initialiser.
bool add_python_function(const PyMethodDef& function);

}  // namespace fastcore5
