"""What tests/test_triton.py and tests/test_triton_kernels.py both need first.

Without a GPU the kernels run on CPU tensors in Triton's interpreter, which
Triton picks when a function is decorated: ``TRITON_INTERPRET=1`` has to be
set before Triton is imported (tests/conftest.py does it for a pytest run) and
before the kernel module is decorated. ``import_triton()`` checks that, skips
the module where the interpreter cannot run here, and returns Triton.
``interpreted(module)`` returns the kernel module decorated for the
interpreter, reloading it if it was imported without.
"""
import importlib
import os
import sys

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _version(text):
    return tuple(int(part) for part in text.split(".")[:2])


def import_triton():
    if DEVICE == "cpu":
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            # Triton's own jit helpers (tl.zeros, tl.sum in recent releases) would stay
            # compiled-only and every kernel call would fail: a run that tests nothing.
            pytest.fail("Triton was imported in this process before TRITON_INTERPRET=1 was set, so its own jit "
                        "functions are not interpreted: run the tests with TRITON_INTERPRET=1", pytrace=False)
        os.environ["TRITON_INTERPRET"] = "1"
    triton = pytest.importorskip("triton")
    if DEVICE == "cpu":
        import numpy

        if _version(triton.__version__) < (3, 7) and _version(numpy.__version__) >= (2, 4):
            pytest.skip("the interpreter of Triton < 3.7 turns loop bounds into ints with int() on one-element "
                        "arrays, which NumPy >= 2.4 refuses; use Triton >= 3.7 or NumPy < 2.4",
                        allow_module_level=True)
    return triton


def interpreted(module):
    if DEVICE != "cpu":
        return module
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(module._fixnorm_apply_pass_kernel, InterpretedFunction):
        return module
    return importlib.reload(module)  # imported earlier without the interpreter: decorate again
