"""Builds fixnorm_ext and its compiled part, fixnorm_ext._C (the fused ops).

    pip install --no-build-isolation -e .

builds against the torch already installed (hence no build isolation). The
CPU kernel is always built. The CUDA kernel is built whenever torch is a CUDA
build and nvcc is found; no GPU is needed for that. Environment:

    FIXNORM_BUILD_CUDA=0/1   force the CUDA kernel off / on (on: fail if it cannot be built)
    TORCH_CUDA_ARCH_LIST     GPU targets, default "9.0+PTX" (sm_90 code plus PTX for newer GPUs)
    CUDA_HOME / CUDA_PATH    the CUDA toolkit, when it is not at /usr/local/cuda or found through nvcc
"""
import glob
import os
import re
import shutil
import subprocess
import sys

import torch
import torch.utils.cpp_extension as cpp_extension
from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "9.0+PTX"
# The CUDA kernel takes its per-tensor pointers as one large kernel argument,
# which needs compute capability 7.0 or newer.
MIN_ARCH = 7.0


def sources(*parts):
    return [os.path.relpath(f, ROOT) for f in sorted(glob.glob(os.path.join(ROOT, *parts)))]


def _toolkit_of_nvcc(nvcc):
    """The toolkit folder an nvcc on PATH belongs to. nvcc may be a wrapper
    script outside the toolkit (e.g. /usr/local/bin/nvcc running
    /usr/local/cuda-13.0/bin/nvcc), so ask nvcc itself where its TOP is."""
    try:
        dry = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
        text = dry.stdout + dry.stderr
    except (OSError, subprocess.SubprocessError):
        text = ""
    match = re.search(r"^#\$ TOP=(.+)$", text, re.MULTILINE)
    if match:
        return os.path.realpath(match.group(1).strip())
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def find_cuda_home():
    """(toolkit folder, how it was found), or (None, why not)."""
    def has_nvcc(home):
        return home and os.path.isfile(os.path.join(home, "bin", "nvcc"))

    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home:
            if has_nvcc(home):
                return os.path.realpath(home), f"${var}"
            return None, f"${var}={home} has no bin/nvcc"
    if has_nvcc("/usr/local/cuda"):
        return os.path.realpath("/usr/local/cuda"), "the standard location /usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = _toolkit_of_nvcc(nvcc)
        if has_nvcc(home):
            return home, f"nvcc on PATH ({nvcc})"
        return None, f"nvcc on PATH ({nvcc}) does not lead to a toolkit folder (tried {home})"
    return None, "no nvcc: set CUDA_HOME, or put nvcc on PATH"


def _check_arch_list(arch_list):
    for entry in re.split(r"[ ;]+", arch_list.strip()):
        if not entry:
            continue
        number = entry.split("+")[0]
        try:
            value = float(number)
        except ValueError:
            continue  # a named target ("Hopper") is left to torch to translate
        if value < MIN_ARCH:
            sys.exit(f"fixnorm_ext: TORCH_CUDA_ARCH_LIST={arch_list!r} names compute capability {number}; "
                     f"the CUDA kernel needs {MIN_ARCH} or newer")


def want_cuda():
    """(build the CUDA kernel?, the toolkit, a line saying why)."""
    forced = os.environ.get("FIXNORM_BUILD_CUDA")
    if forced not in (None, "", "0", "1"):
        sys.exit(f"fixnorm_ext: FIXNORM_BUILD_CUDA must be 0 or 1, not {forced!r}")
    if forced == "0":
        return False, None, "FIXNORM_BUILD_CUDA=0"
    if torch.version.cuda is None:
        if forced == "1":
            sys.exit("fixnorm_ext: FIXNORM_BUILD_CUDA=1 but the installed torch is not a CUDA build")
        return False, None, "torch is not a CUDA build"
    home, how = find_cuda_home()
    if home is None:
        if forced == "1":
            sys.exit(f"fixnorm_ext: FIXNORM_BUILD_CUDA=1 but no CUDA toolkit was found: {how}")
        return False, None, how
    return True, home, f"toolkit {home}, found through {how}"


def extension():
    # -fopenmp: ATen's parallel_for is an inline OpenMP region; without the flag
    # the extension would silently run single-threaded.
    cxx = ["-O3", "-fopenmp"] if sys.platform != "win32" else ["/O2", "/openmp"]
    link = ["-fopenmp"] if sys.platform != "win32" else []
    srcs = sources("csrc", "*.cpp") + sources("csrc", "cpu", "*.cpp")
    build_cuda, home, why = want_cuda()
    print(f"fixnorm_ext: CUDA kernel {'on' if build_cuda else 'off'} ({why})", flush=True)
    if not build_cuda:
        return CppExtension("fixnorm_ext._C", srcs, extra_compile_args={"cxx": cxx}, extra_link_args=link,
                            py_limited_api=False)
    # torch decides CUDA_HOME when it is imported, and a wrapper nvcc misleads
    # it (it takes the folder above the wrapper); use the toolkit found here.
    os.environ["CUDA_HOME"] = home
    cpp_extension.CUDA_HOME = home
    arch_list = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    _check_arch_list(arch_list)
    print(f"fixnorm_ext: CUDA targets {arch_list}", flush=True)
    return CUDAExtension(
        "fixnorm_ext._C",
        srcs + sources("csrc", "cuda", "*.cu"),
        define_macros=[("FIXNORM_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
        extra_link_args=link,
        py_limited_api=False,
    )


if __name__ == "__main__":  # pip and `python setup.py` run it so; tests import the helpers above
    setup(
        name="fixnorm_ext",
        version="0.1.0",
        description="FixNorm (weight-norm control instead of weight decay) as a fused PyTorch optimizer",
        packages=find_packages(include=["fixnorm_ext", "fixnorm_ext.*", "kernels", "kernels.*"]),
        python_requires=">=3.9",
        install_requires=["torch>=2.4"],
        ext_modules=[extension()],
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )
