// The module stub of vaekern._C. Importing it runs the TORCH_LIBRARY_IMPL blocks of
// csrc/cpu and csrc/cuda, which add kernels to the schemas that vaekern/_ops.py defines
// in Python. There is no pybind11 and nothing else is exported.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
