"""Builds diffcore and its extension diffcore._C (CPU kernels always; CUDA kernels when possible).

CUDA is built when the installed torch is a CUDA build and nvcc is found (CUDA_HOME), or when FORCE_CUDA=1;
DIFFCORE_NO_CUDA=1 turns it off. The arch list comes from TORCH_CUDA_ARCH_LIST (default "8.0;9.0": A100 and
H100). Build with `pip install -e . --no-build-isolation` after installing torch (never let pip resolve torch).

The CPU kernels (csrc/cpu/kernels_cpu.cpp) are compiled once per instruction set: a portable baseline and, on
x86-64, AVX2 (-march=x86-64-v3), AVX-512 (-march=x86-64-v4) and AVX-512 with BF16 conversions (x86-64-v4
+ -mavx512bf16: Zen 4, Cooper Lake, Sapphire Rapids and later); the extension picks one at run time
(csrc/cpu/ops_cpu.cpp). Everything else is compiled for the portable baseline, so one wheel runs on any x86-64 CPU.
Next to the extension the build writes diffcore/_build_info.json, the torch version it was compiled against.
"""
from __future__ import annotations

import os
import platform
import re
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "diffcore" / "__init__.py").read_text()).group(1)
DEFAULT_CUDA_ARCHS = "8.0;9.0"
CPU_SOURCES = ["csrc/module.cpp", "csrc/ops.cpp", "csrc/cpu/ops_cpu.cpp"]
CPU_KERNELS = "csrc/cpu/kernels_cpu.cpp"  # compiled once per entry of _cpu_isas()
# -ffp-contract=off everywhere: no FMA contraction, so results stay close to the reference's on every ISA
COMMON_CXX_FLAGS = ["-O3", "-std=c++17", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"]
CUDA_SOURCES = ["csrc/cuda/kernels.cu", "csrc/cuda/ops_cuda.cpp"]
BUILD_INFO_FILE = "_build_info.json"  # next to the .so: the torch it was built for (read by diffcore/extension.py)


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
    cxx_flags = COMMON_CXX_FLAGS + ["-fopenmp"]
    macros += [(f"DIFFCORE_CPU_HAVE_{name.upper()}", None) for name, _ in _cpu_isas() if name != "baseline"]
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


def _cpu_isas() -> list[tuple[str, list[str]]]:
    """(name, extra flags) of each CPU kernel variant: the baseline everywhere, AVX2, AVX-512 and AVX-512 + BF16
    on x86-64."""
    isas = [("baseline", [])]
    if platform.machine().lower() in ("x86_64", "amd64"):
        avx512 = ["-march=x86-64-v4", "-mprefer-vector-width=512"]
        isas += [("avx2", ["-march=x86-64-v3"]), ("avx512", avx512), ("avx512_bf16", avx512 + ["-mavx512bf16"])]
    return isas


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    class Build(BuildExtension):
        """Compiles csrc/cpu/kernels_cpu.cpp once per instruction set (its own flags, namespace and object
        folder), then links those objects into diffcore._C with the other sources."""

        def build_extension(self, ext):
            for name, flags in _cpu_isas():
                macros = [("DIFFCORE_CPU_ISA_NS", f"isa_{name}"), ("DIFFCORE_CPU_ISA_NAME", f'"{name}"')]
                ext.extra_objects += self.compiler.compile(
                    [CPU_KERNELS], output_dir=os.path.join(self.build_temp, f"isa_{name}"), macros=macros,
                    include_dirs=ext.include_dirs, extra_postargs=COMMON_CXX_FLAGS + ["-fPIC"] + flags)
            super().build_extension(ext)
            _write_build_info(Path(self.get_ext_fullpath(ext.name)).with_name(BUILD_INFO_FILE))

        def copy_extensions_to_source(self):  # --inplace and editable installs: the record goes with the .so
            super().copy_extensions_to_source()
            for regular, inplace in self._build_info_mapping():
                self.copy_file(regular, inplace, level=self.verbose)

        def get_outputs(self):
            return super().get_outputs() + ([] if self.inplace else [str(self._build_info_path(ext))
                                                                      for ext in self.extensions])

        def get_output_mapping(self):
            return {**super().get_output_mapping(), **dict(self._build_info_mapping())}

        def _build_info_path(self, ext) -> Path:
            return Path(self.build_lib, self.get_ext_filename(self.get_ext_fullname(ext.name))).with_name(
                BUILD_INFO_FILE)

        def _build_info_mapping(self):
            """(record in build_lib, record next to the in-place .so) per extension; none unless in place."""
            if not self.inplace:
                return []
            build_py = self.get_finalized_command("build_py")
            return [(str(self._build_info_path(ext)), str(Path(build_py.get_package_dir(
                        self.get_ext_fullname(ext.name).rpartition(".")[0]), BUILD_INFO_FILE)))
                    for ext in self.extensions]

    return Build.with_options(use_ninja=True)


def _write_build_info(path: Path) -> None:
    """Record the torch this extension is compiled against next to it (diffcore/extension.py reads it: an
    extension built for another torch cannot be imported to ask). Written to a temporary file, then renamed."""
    import json

    import torch

    record = {"version": VERSION, "torch_version": str(torch.__version__), "torch_cuda": torch.version.cuda}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)


setup(
    version=VERSION,
    packages=find_packages(include=["diffcore", "diffcore.*"]),
    package_data={"diffcore": ["assets/*", "pretrained/*/*", "py.typed"]},
    ext_modules=_extensions(),
    cmdclass={"build_ext": _build_ext()},
)
