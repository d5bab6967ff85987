"""The reverse-process plumbing shared by the DPS sampler and the naive inpainting baseline.

A process is given as two tables on the images' device: ``alphas_cumprod`` (float64 ``[S]``, alpha-bar of the
kept timesteps, i.e. of the respaced process, or of the full one) and ``timestep_map`` (int64 ``[S]``, the
original timestep fed to the model at each index; ``arange(S)`` for the full process). Steps go from index
S-1 down to 0 through :func:`diffcore.ops.ddpm_step` / :func:`diffcore.ops.ddim_step` on the respaced table.

Noise follows the convention of :mod:`diffcore.samplers`: counter-based (Philox), keyed by one ``seed``; x_T is
drawn at offset 0 and the k-th step (k = 0 for the first, at index S-1) at offset 1 + k; any extra noise a loop
needs at step k (the naive baseline's re-noised measurement) at offset 1 + S + k. So a run is reproducible from
its seed, the same on every device up to rounding, image b of a batch gets the same noise whatever the batch
size, and DPS with zeta = 0 reproduces ``ddpm_sample`` / ``ddim_sample`` of the same process and seed exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional, Sequence

import torch

from .. import ops
from ..samplers import draw_seed, initial_noise
from ..types import PredictionType, VarianceType, as_prediction_type, as_variance_type

Sampler = Literal["ddpm", "ddim"]
#: ``model(x, t, **model_kwargs) -> output``: x ``[B, C, H, W]``, t int64 ``[B]`` (original timesteps);
#: output ``[B, C, H, W]`` or ``[B, 2C, H, W]`` (prediction, then variance output, for learned variances).
Model = Callable[..., torch.Tensor]


def _check_sampler(sampler: str) -> None:
    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f"sampler: expected 'ddpm' or 'ddim', got {sampler!r}")


@dataclass(frozen=True)
class Process:
    """A checked reverse process: the tables on the sampling device plus the step settings."""

    alphas_cumprod: torch.Tensor  #: float64 [S]
    timestep_map: torch.Tensor  #: int64 [S]
    sampler: Sampler
    eta: float
    prediction_type: PredictionType
    variance_type: VarianceType
    clip_denoised: bool

    @property
    def num_steps(self) -> int:
        return int(self.alphas_cumprod.numel())

    def noise_offset(self, step: int, extra: bool = False) -> int:
        """Philox offset of step ``step`` (0 = first step); ``extra`` for a second draw in the same step."""
        return 1 + step + (self.num_steps if extra else 0)

    def step(self, x: torch.Tensor, output: torch.Tensor, index: torch.Tensor, seed: int, offset: int):
        """One reverse step from table index ``index`` (int64 ``[B]``); returns (x_prev, pred_x0)."""
        channels = x.shape[1]
        if self.sampler == "ddim":
            return ops.ddim_step(x, output[:, :channels], index, index - 1, self.alphas_cumprod, self.eta,
                                 prediction_type=self.prediction_type, clip_denoised=self.clip_denoised,
                                 seed=seed, offset=offset, check_values=False)
        if not self.variance_type.is_learned:
            output = output[:, :channels]
        return ops.ddpm_step(x, output, index, self.alphas_cumprod, prediction_type=self.prediction_type,
                             variance_type=self.variance_type, clip_denoised=self.clip_denoised, seed=seed,
                             offset=offset, check_values=False)


def make_process(alphas_cumprod: torch.Tensor, timestep_map: Optional[torch.Tensor], device: torch.device, *,
                 sampler: Sampler, eta: float, prediction_type, variance_type, clip_denoised: bool) -> Process:
    """Check the tables and settings and move the tables to ``device`` (once, before the loop)."""
    _check_sampler(sampler)
    if not isinstance(alphas_cumprod, torch.Tensor) or alphas_cumprod.dtype != torch.float64 \
            or alphas_cumprod.dim() != 1 or alphas_cumprod.numel() < 1:
        got = (f"{alphas_cumprod.dtype} tensor of shape {tuple(alphas_cumprod.shape)}"
               if isinstance(alphas_cumprod, torch.Tensor) else type(alphas_cumprod).__name__)
        raise TypeError(f"alphas_cumprod: expected a non-empty 1-D float64 tensor, got {got}")
    steps = alphas_cumprod.numel()
    if sampler == "ddpm" and steps < 2:
        raise ValueError("alphas_cumprod: the DDPM sampler needs at least 2 timesteps, got 1")
    if timestep_map is None:
        timestep_map = torch.arange(steps, dtype=torch.int64)
    if not isinstance(timestep_map, torch.Tensor) or timestep_map.dtype != torch.int64 \
            or tuple(timestep_map.shape) != (steps,):
        got = (f"{timestep_map.dtype} tensor of shape {tuple(timestep_map.shape)}"
               if isinstance(timestep_map, torch.Tensor) else type(timestep_map).__name__)
        raise TypeError(f"timestep_map: expected an int64 tensor of shape ({steps},) (one original timestep per "
                        f"entry of alphas_cumprod), got {got}")
    if not eta >= 0.0:
        raise ValueError(f"eta: expected a float >= 0, got {eta}")
    return Process(alphas_cumprod.to(device), timestep_map.to(device), sampler, float(eta),
                   as_prediction_type(prediction_type), as_variance_type(variance_type), bool(clip_denoised))


def start(shape: Sequence[int], like: torch.Tensor, seed: Optional[int], generator: Optional[torch.Generator],
          x_T: Optional[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(x_T, seed): the seed resolved as every sampler does (:func:`diffcore.samplers.draw_seed`) and x_T either
    given (checked against ``shape``) or Philox normals at offset 0 (:func:`diffcore.samplers.initial_noise`),
    in ``like``'s dtype and on its device."""
    seed = draw_seed(seed, generator)
    shape = tuple(shape)
    if x_T is not None:
        if not isinstance(x_T, torch.Tensor) or tuple(x_T.shape) != shape:
            got = tuple(x_T.shape) if isinstance(x_T, torch.Tensor) else type(x_T).__name__
            raise ValueError(f"x_T: expected shape {shape}, got {got}")
        return x_T.to(device=like.device, dtype=like.dtype), seed
    return initial_noise(shape, seed, dtype=like.dtype, device=like.device), seed


def call_model(model: Model, x: torch.Tensor, t: torch.Tensor, model_kwargs: Optional[dict[str, Any]],
               process: Process) -> torch.Tensor:
    """model(x, t, **model_kwargs), its shape checked (no sync) and cast to x's dtype (differentiably)."""
    output = model(x, t, **(model_kwargs or {}))
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"model: expected it to return a tensor, got {type(output).__name__}")
    channels = x.shape[1]
    learned = process.sampler == "ddpm" and process.variance_type.is_learned
    allowed = (2 * channels,) if learned else (channels, 2 * channels)
    if output.dim() != x.dim() or output.shape[0] != x.shape[0] or output.shape[2:] != x.shape[2:] \
            or output.shape[1] not in allowed:
        raise ValueError(f"model: expected an output of shape [B, {' or '.join(map(str, allowed))}, "
                         f"{', '.join(map(str, x.shape[2:]))}] for x of shape {tuple(x.shape)}, "
                         f"got {tuple(output.shape)}")
    return output.to(x.dtype)
