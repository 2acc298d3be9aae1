"""Builds fixnorm_ext and its compiled part, fixnorm_ext._C (the fused C++ ops).

    pip install --no-build-isolation -e .

builds against the torch already installed (hence no build isolation).
"""
import glob
import os
import sys

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def cpu_extension():
    sources = [os.path.relpath(f, ROOT) for f in sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))]
    sources += [os.path.relpath(f, ROOT) for f in sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))]
    # -fopenmp: ATen's parallel_for is an inline OpenMP region; without the flag
    # the extension would silently run single-threaded.
    cxx = ["-O3", "-fopenmp"] if sys.platform != "win32" else ["/O2", "/openmp"]
    link = ["-fopenmp"] if sys.platform != "win32" else []
    return CppExtension(
        "fixnorm_ext._C",
        sources,
        extra_compile_args={"cxx": cxx},
        extra_link_args=link,
        py_limited_api=False,
    )


setup(
    name="fixnorm_ext",
    version="0.1.0",
    description="FixNorm (weight-norm control instead of weight decay) as a fused PyTorch optimizer",
    packages=find_packages(include=["fixnorm_ext", "fixnorm_ext.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4"],
    ext_modules=[cpu_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
