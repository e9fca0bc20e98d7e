// The Python module autoft_fast._C. It exports nothing itself: importing it loads this shared
// library, whose static initialisers register the CPU (and, when built, CUDA) kernels with the
// PyTorch dispatcher under the schemas that autoft_fast/ops/library.py declares.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "Fused gated-embedding kernels (registered with torch.library on import).",
      -1,
      nullptr,
  };
  return PyModule_Create(&module_def);
}
}
