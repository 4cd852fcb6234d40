// The Python module object of rgpt4d._C. The ops register themselves with the dispatcher
// (TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL) when the library loads; the module itself is
// empty apart from build facts, so no pybind11 (and no <torch/extension.h>) is compiled.
#include <Python.h>

#ifdef RGPT4D_WITH_CUDA
#define RGPT4D_BUILT_WITH_CUDA 1
#else
#define RGPT4D_BUILT_WITH_CUDA 0
#endif

static struct PyModuleDef rgpt4d_c_module = {PyModuleDef_HEAD_INIT, "_C",
                                             "rgpt4d compiled ops (registered under torch.ops.rgpt4d)", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&rgpt4d_c_module);
  if (m == nullptr) return nullptr;
  PyModule_AddIntConstant(m, "built_with_cuda", RGPT4D_BUILT_WITH_CUDA);
#ifdef RGPT4D_BUILD_INFO
  PyModule_AddStringConstant(m, "build_info", RGPT4D_BUILD_INFO);
#endif
  return m;
}
