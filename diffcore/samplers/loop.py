"""What every sampling loop shares (the samplers here, DPS and the inpainting baseline in :mod:`diffcore.inverse`):
the result type, seeds and initial noise, the loop's setup checked once, per-step timestep rows, progress, and the
per-step record (intermediates and the user's callback).

Noise convention (all samplers): one seed per call (given, or drawn once from ``generator``); x_T is Philox noise
at offset 0 and step k (0-based, in visiting order) draws its noise inside the op at offset k + 1. The Philox
counter includes the sample's image index, ``first_row + b`` for row b of a call (``first_row`` defaults to 0), so
an image is the same whatever the batch it runs in (a call on rows r .. r + k - 1 of x_T with ``first_row=r``
reproduces those rows of the whole batch, for every sampler, deterministic or not), and the same on CPU and CUDA
up to float rounding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch
from tqdm.auto import tqdm

from ..diffusion import GaussianDiffusion
from ..ops import check_first_row
from ..reference.philox import philox_normal_like

__all__ = ["SampleResult", "StepCallback", "check_generator", "draw_seed", "initial_noise", "prepare",
           "timestep_rows", "Intermediates", "steps_progress"]

#: ``callback(step, t, x, pred_x0)``, called after each step: ``step`` 0-based in visiting order, ``t`` the original
#: (model) timestep the step started from (an int), ``x`` the new state and ``pred_x0`` the model's x0 estimate at
#: that step, both ``[B, ...]`` (on the device, not copied: clone what you keep). Returning ``True`` stops the
#: loop after this step (the result then holds this x and the timesteps visited so far); any other return value
#: (None) continues. (DPS and the inpainting baseline still call the older ``callback(k, x, pred_x0)``.)
StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], Optional[bool]]


@dataclass(frozen=True)
class SampleResult:
    """A sampler's output.

    sample: ``[B, ...]`` the final state (x_0 for samplers, x_T for inversion), the dtype of x_T.
    timesteps: the original (model) timesteps visited, in visiting order.
    seed: the Philox seed used (None for deterministic runs that drew no noise).
    x_t, pred_x0: when intermediates were asked for, one ``[B, ...]`` tensor per step: the state after the step
    and the model's x0 prediction at that step; else None.
    """

    sample: torch.Tensor
    timesteps: tuple[int, ...]
    seed: Optional[int]
    x_t: Optional[tuple[torch.Tensor, ...]] = None
    pred_x0: Optional[tuple[torch.Tensor, ...]] = None


def check_generator(generator: Optional[torch.Generator]) -> None:
    """A TypeError naming ``generator`` unless it is a torch.Generator or None."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")


def draw_seed(seed: Optional[int], generator: Optional[torch.Generator]) -> int:
    """``seed`` checked (an int in [0, 2**63)), or one drawn from ``generator`` (torch's default CPU one if None).
    ``generator`` is checked either way (:func:`check_generator`)."""
    check_generator(generator)
    if seed is None:
        return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device if generator else "cpu"))
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed: expected an int in [0, 2**63) or None, got {seed!r}")
    return seed


def initial_noise(shape: Sequence[int], seed: int, first_row: int = 0, *, dtype: torch.dtype = torch.float32,
                  device: "torch.device | str" = "cpu") -> torch.Tensor:
    """x_T ~ N(0, I) of ``shape`` ``(B, ...)`` from Philox (``seed``, offset 0), row b being image ``first_row + b``
    of the seed (so ``initial_noise(shape, seed, r)`` is rows r .. r + B - 1 of a larger draw); identical on every
    device up to rounding."""
    return philox_normal_like(torch.empty(tuple(shape), dtype=dtype, device=device), seed, 0, first_row)


def prepare(diffusion: GaussianDiffusion, shape: Optional[Sequence[int]], x_T: Optional[torch.Tensor],
            *, dtype: torch.dtype, device, seed: Optional[int], generator: Optional[torch.Generator],
            needs_noise: bool, first_row: int = 0) -> tuple[GaussianDiffusion, torch.Tensor, Optional[int]]:
    """Resolve (diffusion on the device, starting state, seed) for a sampler call: the loop's arguments are
    checked here, once, never per step.

    Exactly one of ``shape`` (then x_T is drawn in ``dtype`` on ``device``, row b as image ``first_row + b``) and
    ``x_T`` is needed; a seed is drawn when noise is needed. ``first_row`` is checked against the batch size.
    """
    if not isinstance(diffusion, GaussianDiffusion):
        raise TypeError(f"diffusion: expected a GaussianDiffusion, got {type(diffusion).__name__}")
    if x_T is None and shape is None:
        raise ValueError("shape: expected the output shape (B, C, ...) when x_T is not given, got None")
    if x_T is not None:
        if not isinstance(x_T, torch.Tensor) or not x_T.is_floating_point() or x_T.dim() < 1:
            raise TypeError(f"x_T: expected a floating-point tensor [B, ...], got {x_T!r:.80}")
        if shape is not None and tuple(shape) != tuple(x_T.shape):
            raise ValueError(f"shape: expected {tuple(x_T.shape)} (that of x_T) or None, got {tuple(shape)}")
        device = x_T.device
    else:
        shape = tuple(int(s) for s in shape)
        if len(shape) < 1 or any(s < 0 for s in shape):
            raise ValueError(f"shape: expected (B, ...) with non-negative sizes, got {shape}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype: expected a floating-point torch.dtype for x_T, got {dtype!r}")
        device = torch.device(device) if device is not None else diffusion.device
    first_row = check_first_row(first_row, x_T.shape[0] if x_T is not None else shape[0])
    diffusion = diffusion.to(device)
    if needs_noise or x_T is None:
        seed = draw_seed(seed, generator)
    else:  # deterministic from x_T: the seed (if any) and generator are checked, nothing is drawn
        check_generator(generator)
        seed = None if seed is None else draw_seed(seed, None)
    x = x_T if x_T is not None else initial_noise(shape, seed, first_row, dtype=dtype, device=device)
    return diffusion, x, seed


def timestep_rows(values: Sequence[int], batch: int, device) -> torch.Tensor:
    """int64 ``[S, B]``: row k holds ``values[k]`` for every sample (contiguous rows; built once per call)."""
    column = torch.tensor(list(values), dtype=torch.int64)
    return column[:, None].expand(len(values), batch).contiguous().to(device)


class Intermediates:
    """The per-step record of a loop: calls ``callback`` after each step and, when enabled, keeps (x_t, pred_x0)
    of every step; ``return_intermediates`` is this record with a callback that keeps everything.

    ``timesteps``: the model's (original) timesteps in visiting order; the callback is ``callback(step, t, x,
    pred_x0)`` (:data:`StepCallback`) and stops the loop by returning True.
    """

    def __init__(self, enabled: bool, callback: Optional[Callable[..., Optional[bool]]],
                 timesteps: Sequence[int]):
        if callback is not None and not callable(callback):
            raise TypeError(f"callback: expected a callable callback(step, t, x, pred_x0) or None, got "
                            f"{type(callback).__name__}")
        self.enabled = enabled
        self.callback = callback
        self.timesteps = tuple(int(t) for t in timesteps)
        self.steps = 0  #: steps recorded so far
        self.x_t: list[torch.Tensor] = []
        self.pred_x0: list[torch.Tensor] = []

    def add(self, x_t: torch.Tensor, pred_x0: torch.Tensor) -> bool:
        """Record one step; True when the callback asked to stop."""
        if self.enabled:
            self.x_t.append(x_t)
            self.pred_x0.append(pred_x0)
        stop = False
        if self.callback is not None:
            stop = self.callback(self.steps, self.timesteps[self.steps], x_t, pred_x0) is True
        self.steps += 1
        return stop

    def result(self, sample: torch.Tensor, timesteps: Iterable[int], seed: Optional[int]) -> SampleResult:
        """The :class:`SampleResult` of the steps taken (``timesteps`` cut to them when the loop stopped early)."""
        visited = tuple(timesteps)[:self.steps]
        if not self.enabled:
            return SampleResult(sample, visited, seed)
        return SampleResult(sample, visited, seed, tuple(self.x_t), tuple(self.pred_x0))


def steps_progress(num_steps: int, progress: bool, desc: str) -> Iterator[int]:
    """range(num_steps) with a tqdm bar unless ``progress`` is False."""
    return iter(tqdm(range(num_steps), disable=not progress, desc=desc, leave=False))
