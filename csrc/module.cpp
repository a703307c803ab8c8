// plait._C: a Python module with no Python API of its own. Importing it runs the
// static registrations below and in every kernel file (TORCH_LIBRARY_IMPL), which
// make the ops available as torch.ops.plait.*.
#include <Python.h>
#include <torch/library.h>

// Every op schema of plait is declared here, once. Kernels register per backend
// next to their implementation (csrc/<area>/*_cpu.cpp, *.cu).
TORCH_LIBRARY(plait, m) {
  // GF(2^8) multiply-accumulate over byte regions: dst[i] ^= coef * src[i], in the
  // field GF(2)[x] / (x^8 + x^4 + x^3 + x^2 + 1) (0x11d, as ISA-L and most RS codecs).
  m.def("gf256_mul_add_(Tensor(a!) dst, Tensor src, int coef) -> ()");
}

static struct PyModuleDef plait_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&plait_c_module); }
