"""How diffcore runs on the machine at hand: CPU features, the precision to compute in, the thread count, and
``torch.compile`` with an on-disk cache and batch-size buckets.

- :func:`cpu_features` reads the x86 instruction-set flags that decide whether bf16 is fast or a trap: measured
  faster than fp32 with AMX (Intel, 1.6-1.85x) and on AMD CPUs with AVX512-BF16 (Zen 4: 1.5-1.66x), slower
  elsewhere (Intel AVX512-BF16 without AMX 0.88x, AVX-512 0.39x, AVX2 0.056x; bench/RESULTS.md).
  ``DIFFCORE_CPU_FEATURES`` overrides the detection (comma-separated subset of
  ``amx,avx512_bf16,avx512,avx2,amd``, or ``none``; ``amd`` marks an AMD CPU), to simulate another CPU in tests.
- :func:`resolve_precision` maps ``"fp32" | "bf16" | "fp16" | "auto"`` to a dtype for a device.
- :func:`default_threads` / :func:`set_threads`: the thread policy. torch's default is one thread per logical CPU;
  on a shared machine a busy core makes every OpenMP region wait for a descheduled thread (an op went from
  0.13 ms to 6.4 ms), so diffcore's CLI uses ``min(physical cores, CPUs this process may run on)`` unless
  ``--threads`` says otherwise.
- :func:`compile_model` wraps ``torch.compile`` with the FX-graph / inductor cache under
  ``~/.cache/diffcore/inductor`` (``DIFFCORE_CACHE_DIR`` or ``TORCHINDUCTOR_CACHE_DIR`` override it) and pads
  each batch up to a bucket (powers of two) so that a new batch size reuses a compiled graph. On this kind of CPU
  compile adds 1.16x to bf16 eager; inductor freezing adds nothing measurable on top (bench/RESULTS.md).
"""
from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import torch
from torch import nn

__all__ = ["CpuFeatures", "cpu_features", "Precision", "PRECISIONS", "DEFAULT_PRECISION", "SAMPLE_PRECISION", "resolve_precision",
           "precision_context",
           "default_threads", "set_threads", "cache_dir", "BucketedModel", "compile_model", "bucket_for",
           "DEFAULT_BUCKETS", "CPU_BATCH_SIZE", "default_batch_size", "batch_slices", "slice_rows", "training_bf16"]

FEATURES_ENV = "DIFFCORE_CPU_FEATURES"
_FEATURE_NAMES = ("amx", "avx512_bf16", "avx512", "avx2", "amd")

Precision = Literal["fp32", "bf16", "fp16", "auto"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16", "auto")
#: the precision of ``diffcore.sample`` and ``diffcore sample`` when none is given: ``"auto"``, bf16 where the
#: hardware runs it fast (GPUs, CPUs with AMX or AMD AVX512-BF16), fp32 elsewhere. On the packaged model its FID was
#: within noise of fp32's for DDIM-50 (+0.64) and for the default sampler (respaced ancestral, 50 steps, clipped:
#: 52.1 vs 51.1; disjoint real sets scatter by 3.7) and it sampled 1.5-1.8x faster here (bench/RESULTS.md). The
#: price: a seed gives the same images only on machines that resolve to the same precision; ``"fp32"`` gives the same
#: images on every machine up to float rounding.
SAMPLE_PRECISION: Precision = "auto"
#: the precision of restoration (DPS differentiates through the model) and evaluation (bits/dim, FID) when none is
#: given: fp32, the precision their numbers were measured and checked in.
DEFAULT_PRECISION: Precision = "fp32"
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

#: batch buckets of :func:`compile_model`: a batch of n runs padded to the smallest bucket >= n
DEFAULT_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class CpuFeatures:
    """What the CPU offers for low-precision math: ``amx`` (AMX-BF16 tiles: bf16 convs/matmuls fast),
    ``avx512_bf16`` (bf16 dot products in AVX-512, no tiles), ``avx512`` (AVX-512F), ``avx2``, ``amd`` (an AMD
    CPU); ``source`` says where the answer came from (``"env"``, ``"cpuinfo"`` or ``"torch"``)."""

    amx: bool
    avx512_bf16: bool
    avx512: bool
    avx2: bool
    amd: bool
    source: str

    @property
    def bf16_fast(self) -> bool:
        """True where bf16 was measured faster than fp32: with AMX, or AVX512-BF16 on an AMD CPU (Zen 4+)."""
        return self.amx or (self.avx512_bf16 and self.amd)


def _from_env(value: str) -> CpuFeatures:
    names = {part.strip().lower() for part in value.split(",") if part.strip()}
    names.discard("none")
    unknown = names - set(_FEATURE_NAMES)
    if unknown:
        raise ValueError(f"{FEATURES_ENV}: expected a comma-separated subset of {', '.join(_FEATURE_NAMES)} (or "
                         f"'none'), got {value!r}")
    return CpuFeatures(**{name: name in names for name in _FEATURE_NAMES}, source="env")


def _cpuinfo_flags() -> tuple[Optional[set[str]], str]:
    """(the first CPU's flags, its vendor_id) from /proc/cpuinfo; (None, "") when unreadable."""
    flags, vendor = None, ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("vendor_id") and not vendor:
                    vendor = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        return None, ""
    return flags, vendor


def cpu_features() -> CpuFeatures:
    """The CPU's features: from ``DIFFCORE_CPU_FEATURES`` when set, else /proc/cpuinfo's flags, else torch's
    ``torch.backends.cpu.get_cpu_capability()`` (``"AVX512"`` / ``"AVX2"`` / ``"DEFAULT"``; no AMX info)."""
    env = os.environ.get(FEATURES_ENV)
    if env is not None:
        return _from_env(env)
    flags, vendor = _cpuinfo_flags()
    if flags is not None:
        return CpuFeatures(amx="amx_bf16" in flags and "amx_tile" in flags, avx512_bf16="avx512_bf16" in flags,
                           avx512="avx512f" in flags, avx2="avx2" in flags, amd=vendor == "AuthenticAMD",
                           source="cpuinfo")
    capability = torch.backends.cpu.get_cpu_capability()
    return CpuFeatures(amx=False, avx512_bf16=False, avx512=capability.startswith("AVX512"),
                       avx2=capability == "AVX2" or capability.startswith("AVX512"), amd=False, source="torch")


def _cuda_bf16(device: torch.device) -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def resolve_precision(precision: str, device: "torch.device | str") -> torch.dtype:
    """The compute dtype of ``precision`` on ``device``.

    ``"fp32"`` -> float32 anywhere; ``"bf16"`` -> bfloat16 on a CPU (with a warning where
    :attr:`CpuFeatures.bf16_fast` is False: it ran 0.06-0.9x of fp32 there) or on a GPU with bf16 support;
    ``"fp16"`` -> float16 on CUDA only; ``"auto"`` -> bfloat16 on a bf16-capable GPU (else float16) and on a CPU
    where bf16 is fast (AMX, or AVX512-BF16 on AMD), else float32. Any other value is a ValueError.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    device = torch.device(device)
    if precision == "fp32":
        return torch.float32
    if device.type == "cuda":
        if precision == "fp16":
            return torch.float16
        if _cuda_bf16(device):
            return torch.bfloat16
        if precision == "bf16":
            raise ValueError(f"precision: 'bf16' needs a GPU with bf16 support; {device} has none (use 'fp16' "
                             f"or 'fp32')")
        return torch.float16
    if device.type != "cpu":
        if precision == "auto":
            return torch.float32
        raise ValueError(f"precision: {precision!r} is supported on cpu and cuda devices, got device {device}")
    if precision == "fp16":
        raise ValueError("precision: 'fp16' runs on GPUs only; on a CPU use 'fp32' (or 'bf16' with AMX)")
    if cpu_features().bf16_fast:
        return torch.bfloat16
    if precision == "bf16":
        warnings.warn("precision='bf16' on a CPU without AMX or AMD AVX512-BF16: bf16 ran 0.06-0.9x of fp32 on "
                      "such CPUs; 'auto' or 'fp32' is faster here", RuntimeWarning, stacklevel=2)
        return torch.bfloat16
    return torch.float32


def precision_context(dtype: torch.dtype, device: "torch.device | str") -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``dtype`` on ``device`` for float16/bfloat16, a no-op for float32 (the model's
    weights stay float32; GroupNorm and the timestep embedding of diffcore's U-Net stay float32 under it)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def _physical_cores() -> Optional[int]:
    """Distinct (physical id, core id) pairs in /proc/cpuinfo, or None when unreadable."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    cores = set()
    for block in text.split("\n\n"):
        fields = dict(line.split(":", 1) for line in block.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        if "core id" in fields:
            cores.add((fields.get("physical id", "0"), fields["core id"]))
    return len(cores) or None


THREADS_ENV = "DIFFCORE_THREADS"  #: environment variable overriding :func:`default_threads` (e.g. 1 on a shared box)


def available_cpus() -> int:
    """The CPUs this process may run on: its affinity mask where the OS has one, else ``os.cpu_count()``; >= 1."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_threads() -> int:
    """The thread count diffcore's CLI uses by default: ``$DIFFCORE_THREADS`` when set, else ``min(physical cores,
    CPUs this process may run on)`` (hyper-threads and CPUs outside the affinity mask add waiting, not speed), at
    least 1."""
    value = os.environ.get(THREADS_ENV, "").strip()
    if value:
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"{THREADS_ENV}: expected an int >= 1, got {value!r}")
        return int(value)
    available = available_cpus()
    physical = _physical_cores() or available
    return max(1, min(physical, available))


def set_threads(threads: Optional[int] = None, *, name: str = "threads") -> int:
    """Set torch's intra-op thread count to ``threads`` (default :func:`default_threads`); returns the count.
    Pass 1 on a machine shared with other jobs (an OpenMP region waits for its slowest thread).

    ``threads`` must be an int in 1 .. the CPUs this process may use (its affinity mask, else ``os.cpu_count()``):
    more only slows down, and a huge count crashes torch's OpenMP. Anything else is a ValueError naming ``name``
    (e.g. ``"--threads"``), or ``$DIFFCORE_THREADS`` when the default came from it."""
    if threads is None:
        threads, name = default_threads(), (f"${THREADS_ENV}" if os.environ.get(THREADS_ENV, "").strip() else name)
    available = available_cpus()
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= available:
        raise ValueError(f"{name}: expected 1..{available} (an int, at most the CPUs this process may use), got "
                         f"{threads!r}")
    torch.set_num_threads(threads)
    return threads


def cache_dir() -> Path:
    """Where compiled graphs are cached: ``$TORCHINDUCTOR_CACHE_DIR`` when set, else ``$DIFFCORE_CACHE_DIR/inductor``,
    else ``~/.cache/diffcore/inductor``."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    root = os.environ.get("DIFFCORE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "diffcore")
    return Path(root) / "inductor"


def bucket_for(n: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> int:
    """The smallest bucket >= n, or n itself when n exceeds every bucket."""
    for b in sorted(buckets):
        if b >= n:
            return b
    return n


def _pad_rows(value: Any, n: int, padded: int) -> Any:
    """A tensor whose first dimension is n, padded to ``padded`` rows by repeating its last row; others as is."""
    if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == n and padded > n:
        return torch.cat([value, value[-1:].expand(padded - n, *value.shape[1:])], dim=0)
    return value


class BucketedModel(nn.Module):
    """``model(x, t, **kwargs)`` with the batch padded up to a bucket (by repeating the last sample, so every
    input stays in range) and the output trimmed back to the batch. For a model whose output row b depends only
    on input row b (diffcore's U-Net in eval mode: GroupNorm and attention are per sample), the first n rows
    equal the unpadded call's. ``[B, ...] -> [B, ...]``."""

    def __init__(self, model: nn.Module, compiled: Any, buckets: Sequence[int] = DEFAULT_BUCKETS):
        super().__init__()
        if not buckets or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in buckets):
            raise ValueError(f"buckets: expected positive ints, got {tuple(buckets)!r}")
        self.model = model
        self.compiled = compiled
        self.buckets = tuple(sorted(set(buckets)))
        for name in ("config", "image_shape", "null_class"):
            if hasattr(model, name):
                try:
                    setattr(self, name, getattr(model, name))
                except AttributeError:
                    pass

    def forward(self, x: torch.Tensor, t: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        n = x.shape[0]
        padded = bucket_for(n, self.buckets)
        if padded == n:
            return self.compiled(x, t, *args, **kwargs)
        out = self.compiled(_pad_rows(x, n, padded), _pad_rows(t, n, padded),
                            *(_pad_rows(a, n, padded) for a in args),
                            **{k: _pad_rows(v, n, padded) for k, v in kwargs.items()})
        return out[:n]


def compile_model(model: nn.Module, *, buckets: Optional[Sequence[int]] = DEFAULT_BUCKETS,
                  cache: "str | os.PathLike | None" = None, backend: str = "inductor", mode: Optional[str] = None,
                  options: Optional[dict] = None) -> nn.Module:
    """``torch.compile(model)`` with compiled graphs cached on disk and batch sizes bucketed.

    Args:
        model: ``model(x [B, ...], t [B], **kwargs)``, e.g. diffcore's U-Net (not modified).
        buckets: batch sizes to compile for (a batch runs padded to the next one; the output is trimmed); None
            compiles each batch size as it comes.
        cache: the cache folder (default :func:`cache_dir`); it is created, and set as ``TORCHINDUCTOR_CACHE_DIR``
            for this process unless that is set already, with torch's FX graph cache on. The first call per batch
            bucket compiles (tens of seconds to minutes on a CPU); later processes load from the cache.
        backend, mode: passed to ``torch.compile`` (``backend="eager"`` checks the bucketing without compiling).
        options: inductor options for ``torch.compile`` (merged over ``mode``'s, e.g. ``{"cpp_wrapper": True}``).
            Weights stay graph inputs, so a compiled model sees later changes to them. Inductor ``freezing`` is not
            used: it made the packaged U-Net's bf16 forward only 1.02x faster than plain compile (bench/RESULTS.md),
            and with ``torch._inductor.config.freezing`` set (process-wide) a compiled graph keeps the weights
            it was compiled with even after they change in place, also when the model is compiled again.

    Returns: an ``nn.Module`` called like ``model``. The graphs are static in the batch size (``dynamic=False``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if options is not None and not isinstance(options, dict):
        raise TypeError(f"options: expected a dict of inductor options or None, got {type(options).__name__}")
    folder = Path(cache) if cache is not None else cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(folder))
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    merged = dict(options or {})
    if merged and mode is not None:  # torch.compile takes mode or options, not both
        from torch._inductor import list_mode_options

        merged = {**list_mode_options(mode), **merged}
        mode = None
    compiled = torch.compile(model, backend=backend, mode=mode, dynamic=False, options=merged or None)
    if buckets is None:
        return compiled
    return BucketedModel(model, compiled, buckets)


#: batch size :func:`diffcore.sample` splits n into on a CPU when ``batch_size`` is None: per image and step, batch
#: 64 was the cheapest measured for the packaged model (batch 1: 2.6x, 8: 1.2x, 128: 1.1x, 256: 1.5x the cost, and
#: 256 needs 805 MiB against 449 MiB; issue 14)
CPU_BATCH_SIZE = 64


def default_batch_size(n: int, device: "torch.device | str") -> int:
    """How many of ``n`` images to run at once by default: :data:`CPU_BATCH_SIZE` on a CPU, all n elsewhere."""
    return min(n, CPU_BATCH_SIZE) if torch.device(device).type == "cpu" else n


def batch_slices(n: int, batch_size: int) -> list[slice]:
    """``range(n)`` cut into consecutive slices of at most ``batch_size`` (>= 1)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1 or None, got {batch_size!r}")
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def slice_rows(kwargs: Optional[dict], rows: slice, n: int) -> Optional[dict]:
    """``kwargs`` with every tensor whose first dimension is ``n`` cut to ``rows`` (e.g. class labels ``[n]``)."""
    if not kwargs:
        return kwargs
    return {k: v[rows] if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == n else v
            for k, v in kwargs.items()}


def training_bf16(requested: bool, device: "torch.device | str") -> bool:
    """Whether a trainer asked for bf16 (``requested``) runs its forward under bf16 autocast on ``device``: on CUDA,
    and on CPUs where bf16 is fast (:attr:`CpuFeatures.bf16_fast`; a training step there measured 1.33x, gradient
    cosine 0.9999 vs fp32). Where it is requested but not used, a warning says why (bf16 would be slower)."""
    device = torch.device(device)
    if not requested:
        return False
    if device.type == "cuda" or (device.type == "cpu" and cpu_features().bf16_fast):
        return True
    warnings.warn(f"bf16: training in float32 on {device}: bf16 autocast is used on CUDA and on CPUs with AMX or AMD "
                  f"AVX512-BF16, where it is faster; this CPU has {cpu_features()}", RuntimeWarning, stacklevel=2)
    return False
