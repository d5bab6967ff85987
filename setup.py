"""Builds diffcore and its extension diffcore._C (CPU kernels always; CUDA kernels when possible).

CUDA is built when the installed torch is a CUDA build and nvcc is found (CUDA_HOME), or when FORCE_CUDA=1;
DIFFCORE_NO_CUDA=1 turns it off. The arch list comes from TORCH_CUDA_ARCH_LIST (default "8.0;9.0": A100 and
H100). Build with `pip install -e . --no-build-isolation` after installing torch (never let pip resolve torch).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "diffcore" / "__init__.py").read_text()).group(1)
DEFAULT_CUDA_ARCHS = "8.0;9.0"
CPU_SOURCES = ["csrc/module.cpp", "csrc/ops.cpp", "csrc/cpu/kernels_cpu.cpp"]
CUDA_SOURCES = ["csrc/cuda/kernels.cu", "csrc/cuda/ops_cuda.cpp"]


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _want_cuda() -> bool:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if _flag("DIFFCORE_NO_CUDA"):
        return False
    if _flag("FORCE_CUDA"):
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def _extensions():
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    with_cuda = _want_cuda()
    archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS) if with_cuda else ""
    macros = [
        ("DIFFCORE_VERSION", f'"{VERSION}"'),
        ("DIFFCORE_TORCH_VERSION", f'"{torch.__version__}"'),
        ("DIFFCORE_CUDA_ARCHS", f'"{archs}"'),
    ]
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno", "-fno-trapping-math",
                 "-ffp-contract=off"]  # no FMA contraction: results stay close to the reference's
    # The CPU kernels are built for this machine's instruction set (AVX2/AVX-512 where present): set
    # DIFFCORE_CPU_ARCH=x86-64 (or another -march value) to build a portable extension for other machines.
    cpu_arch = os.environ.get("DIFFCORE_CPU_ARCH", "native")
    if cpu_arch:
        cxx_flags.append(f"-march={cpu_arch}")
    include_dirs = [str(ROOT / "csrc")]
    if with_cuda:
        macros.append(("DIFFCORE_WITH_CUDA", None))
        extension = CUDAExtension(
            "diffcore._C", CPU_SOURCES + CUDA_SOURCES, include_dirs=include_dirs, define_macros=macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        extension = CppExtension(
            "diffcore._C", CPU_SOURCES, include_dirs=include_dirs, define_macros=macros,
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"],
        )
    print(f"diffcore: building diffcore._C with CPU kernels"
          + (f" and CUDA kernels for TORCH_CUDA_ARCH_LIST={archs}" if with_cuda else " only (no CUDA)"))
    return [extension]


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


setup(
    version=VERSION,
    packages=find_packages(include=["diffcore", "diffcore.*"]),
    package_data={"diffcore": ["assets/*", "pretrained/*/*"]},
    ext_modules=_extensions(),
    cmdclass={"build_ext": _build_ext()},
)
