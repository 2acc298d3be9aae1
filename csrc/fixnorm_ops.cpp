// The op schema, defined once. Each device registers its implementation in
// its own file (cpu/, cuda/) with TORCH_LIBRARY_IMPL.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(fixnorm_ext, m) {
  // One FixNorm step (DESIGN.md section 2) for every tensor of every
  // parameter group. momentum_buffers holds the buffers of the tensors whose
  // group has momentum, addressed by meta's buffer column. See fixnorm_meta.h
  // for the hparams / meta / targets tables and the plan (empty on the CPU;
  // the CUDA kernel's work list, kept on the device between steps).
  // sums (optional, float64 [segments of every tensor, 4], filled by the
  // step): per segment, the updated weights' sum of squares before any
  // rescaling, the old weights' sum of squares, <w_old, delta> and
  // ||delta||^2 (track_stats' angles; the squares of sharded tensors). The
  // CPU kernel fills it; the CUDA kernel refuses it for now.
  m.def(
      "fixnorm_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
      "Tensor hparams, Tensor meta, Tensor targets, Tensor[] plan, Tensor? grad_scale=None, "
      "Tensor? found_inf=None, Tensor(c!)? sums=None) -> ()");
}

// An importable (empty) Python module: importing fixnorm_ext._C loads this
// library, which runs the registrations above.
// WITH_CUDA says whether the CUDA kernel was compiled in.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* mod = PyModule_Create(&module);
#ifdef FIXNORM_WITH_CUDA
  const bool with_cuda = true;
#else
  const bool with_cuda = false;
#endif
  if (mod != nullptr && PyModule_AddObject(mod, "WITH_CUDA", PyBool_FromLong(with_cuda)) != 0) {
    Py_DECREF(mod);
    return nullptr;
  }
  return mod;
}
