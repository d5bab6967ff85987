"""Spherical linear interpolation between latents (DDIM paper sec. 5.3, after White 2016).

x_T of a DDIM sampler is Gaussian, so its norm concentrates near sqrt(d); a linear blend of two latents has a
smaller norm and decodes to blurry images, slerp keeps the norm. Interpolate two x_T (for example from
:func:`ddim_invert` or from noise) and decode each with ``ddim_sample(..., x_T=path, eta=0)``.
"""
from __future__ import annotations

import torch

__all__ = ["slerp", "slerp_path"]


def slerp(z0: torch.Tensor, z1: torch.Tensor, alpha: "float | torch.Tensor", eps: float = 1e-7) -> torch.Tensor:
    """Per-sample slerp: sin((1-a) theta)/sin(theta) z0 + sin(a theta)/sin(theta) z1, theta the angle of z0, z1.

    Args: z0, z1 ``[B, ...]`` (same shape, dtype, device); alpha a float or ``[B]`` in [0, 1]. Falls back to
    linear interpolation where the latents are (anti)parallel within ``eps``. Returns ``[B, ...]``.
    """
    if not isinstance(z0, torch.Tensor) or not isinstance(z1, torch.Tensor) or z0.shape != z1.shape:
        raise ValueError(f"z1: expected a tensor shaped like z0 {tuple(getattr(z0, 'shape', ()))}, "
                         f"got {tuple(getattr(z1, 'shape', ())) if isinstance(z1, torch.Tensor) else type(z1)}")
    if z0.dim() < 1:
        raise ValueError("z0: expected a tensor with a batch dimension [B, ...], got a 0-d tensor")
    B = z0.shape[0]
    a = torch.as_tensor(alpha, dtype=torch.float64, device=z0.device)
    if a.dim() == 0:
        a = a.expand(B)
    if a.shape != (B,):
        raise ValueError(f"alpha: expected a float or a tensor of shape ({B},), got shape {tuple(a.shape)}")
    f0, f1 = z0.reshape(B, -1).double(), z1.reshape(B, -1).double()
    cos = (f0 * f1).sum(1) / (f0.norm(dim=1) * f1.norm(dim=1)).clamp(min=1e-30)
    theta = torch.arccos(cos.clamp(-1.0, 1.0))
    sin = torch.sin(theta)
    degenerate = sin.abs() < eps
    safe = torch.where(degenerate, torch.ones_like(sin), sin)
    w0 = torch.where(degenerate, 1.0 - a, torch.sin((1.0 - a) * theta) / safe)
    w1 = torch.where(degenerate, a, torch.sin(a * theta) / safe)
    out = w0[:, None] * f0 + w1[:, None] * f1
    return out.reshape(z0.shape).to(z0.dtype)


def slerp_path(z0: torch.Tensor, z1: torch.Tensor, num: int) -> torch.Tensor:
    """``num`` >= 2 latents from z0 to z1 (both ``[...]``, one latent each) at alpha = linspace(0, 1, num);
    returns ``[num, ...]``, ready as x_T for a batch."""
    if isinstance(num, bool) or not isinstance(num, int) or num < 2:
        raise ValueError(f"num: expected an int >= 2, got {num!r}")
    alphas = torch.linspace(0.0, 1.0, num, dtype=torch.float64)
    return slerp(z0.unsqueeze(0).expand(num, *z0.shape), z1.unsqueeze(0).expand(num, *z1.shape), alphas)
