// Schemas of the mnemo_fast operators. Backends register kernels in csrc/cpu and csrc/cuda.
#include <Python.h>
#include <torch/library.h>

#include <exception>

#ifdef MNEMO_FAST_WITH_CUDA
namespace mnemo_fast::cuda {
bool kernel_image_available(int device);  // csrc/cuda/perturb_shift.cu
}

namespace {
// cuda_kernel_image(device_index) -> bool: whether the CUDA kernels can run on that device.
PyObject* cuda_kernel_image(PyObject*, PyObject* arg) {
  const long device = PyLong_AsLong(arg);
  if (device == -1 && PyErr_Occurred()) return nullptr;
  try {
    return PyBool_FromLong(mnemo_fast::cuda::kernel_image_available(static_cast<int>(device)));
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

PyMethodDef methods[] = {
    {"cuda_kernel_image", cuda_kernel_image, METH_O,
     "cuda_kernel_image(device_index) -> bool: the library has a kernel image for that GPU"},
    {nullptr, nullptr, 0, nullptr}};
}  // namespace
#define MNEMO_FAST_METHODS methods
#else
#define MNEMO_FAST_METHODS nullptr
#endif

extern "C" {
// Importing mnemo_fast._C loads this library (which runs the registrations below). The
// operators live in torch.ops.mnemo_fast; the module itself only has cuda_kernel_image in a
// CUDA build.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                                          MNEMO_FAST_METHODS};
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
  m.def(
      "perturb_dampen_(Tensor(a!)[] params, Tensor[] forget, Tensor[] remain, float threshold, "
      "float lam) -> ()");
}
