"""Host emulation of the CUDA kernels' per-thread code: build, ctypes mirror of csrc/kernel_args.h, and runners.

``tests/cuda_emu/emulator.cpp`` includes ``csrc/cuda/kernel_ops.cuh`` (what a CUDA thread does, the dispatch, the
tile shapes, the vectorized / scalar paths) and runs it on the host with the host C++ compiler; only the CUDA
headers are needed (for ``__half`` / ``__nv_bfloat16``), no nvcc and no GPU. The library is built once per
source hash into the temp folder. :func:`library` returns None when no compiler or no CUDA headers are found.

Tensors are handed over as rows (kernel_args.h): a 2-D view ``[B, inner]`` whose rows are dense
(``stride(1) == 1``) and whose row stride may be anything.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from ctypes import POINTER, Structure, byref, c_bool, c_double, c_int, c_int64, c_size_t, c_uint64, c_void_p
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [ROOT / "tests/cuda_emu/emulator.cpp", ROOT / "csrc/cuda/kernel_ops.cuh",
           *sorted((ROOT / "csrc").glob("*.h"))]  # the torch-free headers kernel_ops.cuh includes (and ops.h)
DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
VEC = {torch.float32: 4, torch.float64: 4, torch.float16: 8, torch.bfloat16: 8}  # elements per 16-byte item


class Rows(Structure):
    _fields_ = [("data", c_void_p), ("batch_stride", c_int64)]


class Noise(Structure):
    _fields_ = [("given", Rows), ("seed", c_uint64), ("offset", c_uint64), ("first_row", c_uint64)]


class QSampleArgs(Structure):
    _fields_ = [("dtype", c_int), ("batch", c_int64), ("inner", c_int64), ("x0", Rows), ("noise", Rows),
                ("t", c_void_p), ("alphas_cumprod", c_void_p), ("num_timesteps", c_int64), ("out", Rows)]


class DdimStepArgs(Structure):
    _fields_ = [("dtype", c_int), ("batch", c_int64), ("inner", c_int64), ("x", Rows), ("model_output", Rows),
                ("t", c_void_p), ("t_prev", c_void_p), ("alphas_cumprod", c_void_p), ("num_timesteps", c_int64),
                ("eta", c_double), ("prediction_type", c_int), ("clip_denoised", c_bool), ("noise", Noise),
                ("x_prev", Rows), ("pred_x0", Rows)]


class DdpmStepArgs(Structure):
    _fields_ = [("dtype", c_int), ("batch", c_int64), ("inner", c_int64), ("x", Rows), ("prediction", Rows),
                ("variance", Rows), ("t", c_void_p), ("alphas_cumprod", c_void_p), ("num_timesteps", c_int64),
                ("prediction_type", c_int), ("variance_type", c_int), ("clip_denoised", c_bool), ("noise", Noise),
                ("x_prev", Rows), ("pred_x0", Rows)]


class HybridLossArgs(Structure):
    _fields_ = [("dtype", c_int), ("batch", c_int64), ("inner", c_int64), ("prediction", Rows),
                ("variance", Rows), ("x0", Rows), ("x_t", Rows), ("noise", Rows), ("t", c_void_p),
                ("alphas_cumprod", c_void_p), ("num_timesteps", c_int64), ("prediction_type", c_int),
                ("variance_type", c_int), ("mse", c_void_p), ("vb", c_void_p), ("grad_mse", c_void_p),
                ("grad_vb", c_void_p), ("grad_prediction", Rows), ("grad_variance", Rows)]


def _cuda_include() -> Optional[Path]:
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parents[1]))
    for candidate in candidates:
        if candidate and (Path(candidate) / "include" / "cuda_fp16.h").exists():
            return Path(candidate) / "include"
    return None


def _compiler() -> Optional[str]:
    for name in [os.environ.get("CXX"), "g++", "c++", "clang++"]:
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def unavailable_reason() -> Optional[str]:
    """Why the emulator cannot be built here (None when it can)."""
    if _cuda_include() is None:
        return "no CUDA headers (cuda_fp16.h) found; set CUDA_HOME"
    if _compiler() is None:
        return "no host C++ compiler found"
    return None


@functools.lru_cache(maxsize=None)
def library() -> Optional[ctypes.CDLL]:
    """The emulator library, built on first use (about 20 s) and cached by source hash; None if unavailable.

    Raises RuntimeError with the compiler's output when the build fails (a bug in the kernel sources).
    """
    if unavailable_reason() is not None:
        return None
    include, cxx = _cuda_include(), _compiler()
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES) + str(include).encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / "diffcore_cuda_emu"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"emulator-{digest}.so"
    if not target.exists():
        tmp = folder / f"emulator-{digest}.{os.getpid()}.tmp.so"
        cmd = [cxx, "-std=c++17", "-O1", "-fPIC", "-shared", "-fno-strict-aliasing", "-Wall", "-I", str(ROOT / "csrc"),
               "-I", str(include), str(SOURCES[0]), "-o", str(tmp)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise RuntimeError(f"building the CUDA emulator failed:\n{' '.join(cmd)}\n{done.stderr[-6000:]}")
        os.replace(tmp, target)  # atomic: a concurrent build writes the same bytes
    lib = ctypes.CDLL(str(target))
    for name, argtypes in [("emu_q_sample", [POINTER(QSampleArgs)]), ("emu_ddim_step", [POINTER(DdimStepArgs)]),
                           ("emu_ddpm_step", [POINTER(DdpmStepArgs)]),
                           ("emu_hybrid_loss_forward", [POINTER(HybridLossArgs), c_void_p]),
                           ("emu_hybrid_loss_backward", [POINTER(HybridLossArgs)])]:
        getattr(lib, name).argtypes = argtypes
        getattr(lib, name).restype = c_int
    lib.emu_hybrid_workspace_bytes.argtypes = [POINTER(HybridLossArgs)]
    lib.emu_hybrid_workspace_bytes.restype = c_size_t
    lib.emu_last_vectorized.restype = c_int
    lib.emu_sizeof.argtypes = [c_int]
    lib.emu_sizeof.restype = c_size_t
    lib.emu_tile_shape.argtypes = [c_int64, c_int64, c_int, POINTER(c_int64)]
    lib.emu_tile_shape.restype = None
    return lib


def layout_mismatches(lib: ctypes.CDLL) -> list[str]:
    """Differences between the ctypes mirror and the C++ structs (sizes and a few offsets); empty when they agree."""
    expected = [QSampleArgs, DdimStepArgs, DdpmStepArgs, HybridLossArgs]
    got = [ctypes.sizeof(s) for s in expected] + [DdimStepArgs.noise.offset, DdpmStepArgs.x_prev.offset,
                                                 HybridLossArgs.grad_prediction.offset, QSampleArgs.out.offset]
    names = ["sizeof QSampleArgs", "sizeof DdimStepArgs", "sizeof DdpmStepArgs", "sizeof HybridLossArgs",
             "offsetof DdimStepArgs.noise", "offsetof DdpmStepArgs.x_prev",
             "offsetof HybridLossArgs.grad_prediction", "offsetof QSampleArgs.out"]
    return [f"{n}: C++ {lib.emu_sizeof(i)}, ctypes {g}" for i, (n, g) in enumerate(zip(names, got))
            if lib.emu_sizeof(i) != g]


def tile_shape(lib: ctypes.CDLL, batch: int, inner: int, vec: int) -> tuple[int, int, int]:
    """(threads per block, tiles per row, tiles) the kernels use."""
    out = (c_int64 * 3)()
    lib.emu_tile_shape(batch, inner, vec, out)
    return out[0], out[1], out[2]


# ---- placing values in memory the way the kernels may meet them ----

PLACEMENTS = ["dense", "padded", "offset"]


def place(values: torch.Tensor, kind: str) -> torch.Tensor:
    """A ``[B, inner]`` view holding ``values`` with dense rows: ``dense`` (contiguous), ``padded`` (row stride
    inner + one 16-byte item: still aligned when inner is a multiple of the item) or ``offset`` (one element past
    an aligned address: never aligned, the scalar path)."""
    batch, inner = values.shape
    if kind == "dense":
        return values.clone()
    if kind == "padded":
        buf = torch.zeros(batch, inner + VEC[values.dtype], dtype=values.dtype)
        buf[:, :inner] = values
        return buf[:, :inner]
    if kind == "offset":
        buf = torch.zeros(batch * inner + 1, dtype=values.dtype)
        view = buf[1:].view(batch, inner)
        view.copy_(values)
        return view
    raise ValueError(f"kind: expected one of {PLACEMENTS}, got {kind!r}")


def rows(view: torch.Tensor) -> Rows:
    """Rows of a 2-D view with dense rows (the binding's rows_of: stride 0 for a single row)."""
    assert view.dim() == 2 and (view.shape[1] <= 1 or view.stride(1) == 1), view.stride()
    return Rows(view.data_ptr(), view.stride(0) if view.shape[0] > 1 else 0)


def expect_vectorized(dtype: torch.dtype, inner: int, kind: str) -> bool:
    """Whether the kernels should take the vectorized path for this placement of every tensor."""
    return kind != "offset" and inner % VEC[dtype] == 0


def check(rc: int) -> None:
    if rc != 0:
        raise RuntimeError(f"emulated launcher returned cudaError {rc}")


def run(lib: ctypes.CDLL, name: str, args: Structure, *extra) -> int:
    """Calls emu_<name>(&args, *extra); returns the launcher's cudaError_t value."""
    return getattr(lib, f"emu_{name}")(byref(args), *extra)
