// The op schema, defined once. Each device registers its implementation in
// its own file (cpu/, cuda/) with TORCH_LIBRARY_IMPL.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(fixnorm_ext, m) {
  // One FixNorm step (DESIGN.md section 2) for every tensor of every
  // parameter group. momentum_buffers holds the buffers of the tensors whose
  // group has momentum, addressed by meta's buffer column. See fixnorm_meta.h
  // for the hparams / meta / targets tables.
  m.def(
      "fixnorm_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
      "Tensor hparams, Tensor meta, Tensor targets, Tensor? grad_scale=None, "
      "Tensor? found_inf=None) -> ()");
}

// An importable (empty) Python module: importing fixnorm_ext._C loads this
// library, which runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
