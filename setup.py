"""Builds gatesim._C, the C++ (and, when available, CUDA) extension of gatesim.

Package metadata, dependencies and the `gatesim` command are in pyproject.toml; this file
only describes the extension. `pip install -e . --no-build-isolation` (what `make build`
runs) builds it in place.

CUDA sources under csrc/cuda/ are compiled when a CUDA toolkit and a CUDA build of
torch are present; GATESIM_CUDA=0/1 forces the choice. GATESIM_DEBUG=1 builds -O0 -g.
"""
import glob
import os

from setuptools import setup


def _locate_cuda_home() -> None:
    """torch finds CUDA_HOME from `which nvcc`; where nvcc is a wrapper script in
    /usr/local/bin (as on this project's machines) that gives /usr/local, which has no
    CUDA headers. Point it at a real toolkit instead, before torch looks."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    for root in sorted(glob.glob("/usr/local/cuda-*")) + ["/usr/local/cuda"]:
        if os.path.exists(os.path.join(root, "bin", "nvcc")) and \
                os.path.exists(os.path.join(root, "include", "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = root
            return


_locate_cuda_home()
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME, BuildExtension, CppExtension, CUDAExtension)

ROOT = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    flag = os.environ.get("GATESIM_CUDA")
    if flag is not None:
        return flag == "1"
    import torch

    return CUDA_HOME is not None and torch.version.cuda is not None


def cuda_extra_include_dirs() -> list:
    """Headers torch includes that a minimal CUDA toolkit may lack (cusparse.h, ...): the
    pip CUDA wheels that come with torch ship them under nvidia/cu*/include."""
    try:
        import nvidia  # namespace package of the nvidia-* wheels
    except ImportError:
        return []
    dirs = []
    for base in nvidia.__path__:
        dirs += sorted(glob.glob(os.path.join(base, "cu*", "include")))
    return dirs


def extension():
    debug = os.environ.get("GATESIM_DEBUG") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # No -ffast-math anywhere: TwoSum and the bit-level rounding rely on exact IEEE
    # arithmetic; -ffp-contract=off keeps compilers from fusing into FMAs.
    # -fno-trapping-math only lets GCC if-convert (and so vectorize) branches holding
    # conversions; it changes no value.
    cxx = ["-std=c++20", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math",
           *opt]
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc")]
    if want_cuda():
        # With a GPU torch builds for the visible one. Without (CI) it cannot detect the
        # architecture and would build for every one it knows: build for Hopper
        # (H100/H200, the machines this project measures on) unless TORCH_CUDA_ARCH_LIST
        # says otherwise (e.g. "8.0;9.0" to add A100). One architecture is enough for CI's
        # purpose, a compile error failing the build, at half the build time.
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        nvcc = ["-std=c++20", "--fmad=false", "-lineinfo", *opt]
        return CUDAExtension(
            "gatesim._C",
            sources,
            include_dirs=include_dirs + cuda_extra_include_dirs(),
            extra_compile_args={"cxx": cxx + ["-DGATESIM_WITH_CUDA"], "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension(
        "gatesim._C",
        sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )


class BuildExt(BuildExtension.with_options(use_ninja=True)):
    """torch's build_ext with a fixed object folder: pip's editable install would compile
    in a throwaway one, so every `make build` after a header edit rebuilt all sources;
    under build/temp ninja recompiles only what changed."""

    def finalize_options(self):
        super().finalize_options()
        self.build_temp = os.path.join(ROOT, "build", "temp")


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExt},
)
