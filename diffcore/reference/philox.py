"""Pure-torch Philox4x32-10 and the Box-Muller normals built on it.

This is the twin of ``philox4x32_10`` / ``philox_normal4`` in ``csrc/philox.h``: the same counter layout,
the same key schedule and the same Box-Muller transform (float32, or float64 for float64 outputs), so that the fused kernels (CPU and CUDA) and
this reference draw the same noise for the same ``(seed, offset)``.

Counter layout for element ``j`` (memory order inside its row) of row ``b`` of a tensor whose first row is image
``first_row`` of the seed's image numbering: ``ctr = (j // 4, first_row + b, offset mod 2**32, offset // 2**32)``,
key ``(seed mod 2**32, seed // 2**32)``; the four 32-bit outputs give four normals, and element ``j`` takes lane
``j % 4``. So the noise of an image depends on ``(seed, offset, image index)`` only, not on the batch it is drawn
in: rows ``r .. r + k - 1`` of a batch are the same as a batch of ``k`` drawn with ``first_row=r``. A seed numbers
:data:`MAX_IMAGES` images (the counter word is 32 bits): ``first_row + B > 2**32`` is refused.
"""
from __future__ import annotations

import math
import operator

import torch

from ..checks import Errors, python_errors

_MASK32 = 0xFFFFFFFF
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of the 64-bit product a * b for a < 2**32 and int64 tensors b < 2**32."""
    b_lo = b & 0xFFFF
    b_hi = b >> 16
    p_lo = a * b_lo  # < 2**48
    p_hi = a * b_hi  # < 2**48
    lo = ((p_hi & 0xFFFF) << 16) + p_lo
    hi = (p_hi + (p_lo >> 16)) >> 16
    return hi & _MASK32, lo & _MASK32


def philox4x32_10(counter: tuple[torch.Tensor, ...], seed: int) -> tuple[torch.Tensor, ...]:
    """Ten Philox rounds on int64 tensors holding uint32 values; returns the four output words."""
    c0, c1, c2, c3 = counter
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for round_index in range(10):
        if round_index > 0:
            k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


#: images per seed: the Philox counter word that numbers them is 32 bits
MAX_IMAGES = 2**32


def check_first_row(first_row: int, batch: int, *, errors: Errors = python_errors) -> int:
    """``first_row`` checked for a tensor of ``batch`` rows: an int (not a bool) with ``0 <= first_row`` and
    ``first_row + batch <= 2**32`` (its rows are images ``first_row .. first_row + batch - 1`` of the seed);
    returns it. ``errors``: the policy of :mod:`diffcore.checks` (the wrappers' or the fake ops')."""
    try:
        index = operator.index(first_row) if not isinstance(first_row, bool) else None
    except TypeError:
        index = None
    errors(index is not None, TypeError,
           lambda: f"first_row: expected an int >= 0, got {type(first_row).__name__} {first_row!r}")
    errors(0 <= index <= MAX_IMAGES - batch, ValueError,
           lambda: f"first_row: expected an int in [0, 2**32 - B] with B = {batch} rows (row b is image first_row + b "
                   f"of the seed, which numbers 2**32 images), got {first_row}")
    return index


def philox_normal(batch: int, row_numel: int, seed: int, offset: int, device=None,
                  dtype: torch.dtype = torch.float64, first_row: int = 0) -> torch.Tensor:
    """Standard normals of shape ``[batch, row_numel]``, element (b, j) as the fused kernels draw it for image
    ``first_row + b`` of the seed (``first_row`` >= 0, ``first_row + batch <= 2**32``).

    The Box-Muller transform runs in ``dtype`` (float32 for float32/16 outputs, float64 for float64), as in the
    kernels, so kernels and reference agree to a few ulps of that dtype.
    """
    if seed < 0 or offset < 0:
        raise ValueError(f"seed and offset must be >= 0, got seed={seed}, offset={offset}")
    first_row = check_first_row(first_row, batch)
    groups = (row_numel + 3) // 4
    g = torch.arange(groups, dtype=torch.int64, device=device).expand(batch, groups)
    b = torch.arange(first_row, first_row + batch, dtype=torch.int64, device=device)[:, None].expand(batch, groups)
    c2 = torch.full_like(g, offset & _MASK32)
    c3 = torch.full_like(g, (offset >> 32) & _MASK32)
    r0, r1, r2, r3 = philox4x32_10((g & _MASK32, b & _MASK32, c2, c3), seed)
    scale = 2.0**-32
    two_pi_scale = 2.0 * math.pi * 2.0**-32
    rad_a = torch.sqrt(-2.0 * torch.log((r0.to(dtype) + 1.0) * scale))
    rad_b = torch.sqrt(-2.0 * torch.log((r2.to(dtype) + 1.0) * scale))
    ang_a = two_pi_scale * r1.to(dtype)
    ang_b = two_pi_scale * r3.to(dtype)
    lanes = torch.stack(
        [rad_a * torch.cos(ang_a), rad_a * torch.sin(ang_a), rad_b * torch.cos(ang_b), rad_b * torch.sin(ang_b)],
        dim=-1,
    )
    return lanes.reshape(batch, groups * 4)[:, :row_numel]


def kernel_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The layout the fused kernels process ``x`` in: channels_last only for a 4-D tensor that is channels_last
    and not also contiguous; contiguous otherwise. The C++ bindings apply the same rule."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def philox_normal_like(x: torch.Tensor, seed: int, offset: int, first_row: int = 0) -> torch.Tensor:
    """Normals shaped and laid out like ``x`` ``[B, ...]`` (in the kernels' memory order), in float32 (float64 for
    float64 x); row b is image ``first_row + b`` of the seed (see :func:`philox_normal`)."""
    batch = x.shape[0]
    row = x[0].numel() if batch > 0 else 0
    memory_format = kernel_memory_format(x)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    flat = philox_normal(batch, row, seed, offset, device=x.device, dtype=dtype, first_row=first_row)
    out = torch.empty_like(x, memory_format=memory_format)
    if memory_format == torch.channels_last:
        n, c, h, w = x.shape
        out.copy_(flat.reshape(n, h, w, c).permute(0, 3, 1, 2))
    else:
        out.copy_(flat.reshape(x.shape))
    return out
