// Schemas of the mnemo_fast operators. Backends register kernels in csrc/cpu and csrc/cuda.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing mnemo_fast._C only has to load this library (which runs the registrations
// below); there is no Python-level API, so the module is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(mnemo_fast, m) {
  m.def("sum_sq_grad_linear(Tensor grad_output, Tensor input) -> Tensor");
  m.def(
      "sum_sq_grad_conv2d(Tensor grad_output, Tensor input, int[] kernel_size, int[] stride, "
      "int[] padding, int[] dilation, int groups) -> Tensor");
  m.def("perturb_max_ratio(Tensor[] forget, Tensor[] remain) -> Tensor");
  m.def(
      "perturb_shift_(Tensor(a!)[] params, Tensor[] forget, Tensor[] remain, Tensor max_ratio, "
      "float lambda1, float lambda2, float sign) -> ()");
  m.def(
      "perturb_gaussian_(Tensor(a!)[] params, Tensor[] forget, Tensor[] remain, "
      "Tensor max_ratio, float lambda1, float lambda2, float tau, Generator? generator) -> ()");
}
