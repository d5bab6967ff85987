"""Shared inputs and tolerances for the op tests (CPU in test_ops.py, CUDA in test_ops_cuda.py)."""
from __future__ import annotations

import torch

from diffcore import reference

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
T_STEPS = 40


def make_table(num_timesteps: int = T_STEPS, device="cpu") -> torch.Tensor:
    """alphas_cumprod of DDPM's linear schedule rescaled to num_timesteps steps (float64)."""
    scale = 1000.0 / num_timesteps
    betas = torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, 0).to(device)


def layout(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values as x in another memory layout: contiguous, channels_last or non-contiguous."""
    if kind == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if kind == "strided":  # every other column of a wider tensor
        wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
        wide[..., ::2] = x
        return wide[..., ::2]
    return x.contiguous()


def timesteps(batch: int, num_timesteps: int = T_STEPS, device="cpu", seed: int = 0) -> torch.Tensor:
    """Per-sample timesteps covering 0 and T-1."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, num_timesteps, (batch,), generator=g)
    if batch > 0:
        t[0] = 0
    if batch > 1:
        t[-1] = num_timesteps - 1
    return t.to(device)


def tolerance(dtype: torch.dtype) -> dict:
    """Absolute/relative tolerances for fused vs reference in the same dtype (both compute in fp32 / fp64)."""
    if dtype == torch.float64:
        return dict(atol=1e-10, rtol=1e-10)
    if dtype == torch.float32:
        return dict(atol=2e-5, rtol=2e-5)
    # both round the same fp32 value to half precision; allow one ulp of disagreement
    return dict(atol=1e-2, rtol=1e-2)


def random_images(shape, dtype, seed=0, scale=1.0) -> torch.Tensor:
    """Seeded standard-normal values (times ``scale``) drawn in float64, then cast to ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)


def loss_inputs(dtype, kind="contiguous", batch=6, shape=(3, 5, 4), variance_type="learned_range", seed=0):
    """[model_output, x0, x_t, noise, t, table] of a hybrid_loss call (x_t from the reference q_sample)."""
    table = make_table()
    t = timesteps(batch, seed=seed)
    x0 = random_images((batch, *shape), torch.float64, seed=seed).clamp(-1, 1)
    noise = random_images((batch, *shape), torch.float64, seed=seed + 1)
    x_t = reference.q_sample(x0, noise, t, table)
    model_output = random_images((batch, 2 * shape[0], *shape[1:]), torch.float64, seed=seed + 2, scale=0.5)
    if variance_type == "learned_range":
        model_output[:, shape[0]:] = model_output[:, shape[0]:].clamp(-1, 1)
    else:  # a plausible log variance
        model_output[:, shape[0]:] = model_output[:, shape[0]:] - 4.0
    return [layout(v.to(dtype), kind) for v in (model_output, x0, x_t, noise)] + [t, table]
