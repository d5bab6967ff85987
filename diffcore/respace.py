"""Timestep subsequences and the respaced diffusion process.

Two ways to choose which of the T original timesteps a short sampler visits:

- improved-diffusion's :func:`space_timesteps` strings: ``"250"`` (250 evenly spaced steps, first and last
  included), ``"10,15,20"`` (T split into 3 equal sections taking 10, 15 and 20 evenly spaced steps), and
  ``"ddim50"`` (the stride-k sequence 0, k, 2k, ... that has exactly 50 entries; an error if none has).
- DDIM's skip types (:func:`ddim_timesteps`, as in ermongroup/ddim's runners/diffusion.py):
  ``"uniform"``: range(0, T, T // S), which has S entries only when S divides T (more otherwise, as there);
  ``"quad"``: int(linspace(0, sqrt(0.8 T), S)^2), duplicates dropped (ermongroup keeps them; they are no-op steps).
  ``"even"`` is improved-diffusion's single-section spacing, exactly S steps from 0 to T-1.
  ``"quad_full"``: round((T-1) (i/(S-1))^2), i = 0..S-1, duplicates dropped: quadratic like "quad" but reaching
  T-1, where x_T is pure noise for every schedule ("quad" stops at 0.8 T, too early for the cosine schedule).

Every function returns the kept original timesteps as a sorted list of distinct ints. The respaced process
(:func:`respace_schedule`) keeps abar exactly at the kept timesteps: beta'_i = 1 - abar_{t_i} / abar_{t_(i-1)}
(abar before the first = 1), and a ``timestep_map`` (respaced index i -> original t_i) lets the model receive
the original timestep. Samplers take the previous timestep from this materialized sequence, never by arithmetic.
"""
from __future__ import annotations

from typing import Literal, Sequence, Union, get_args

import numpy
import torch

from .schedules import NoiseSchedule

SkipType = Literal["uniform", "quad", "even", "quad_full"]
SKIP_TYPES: tuple[str, ...] = get_args(SkipType)

#: What a sampler accepts as its steps: a count (with a skip type), an improved-diffusion string, or the
#: kept timesteps themselves.
StepsSpec = Union[int, str, Sequence[int]]

__all__ = ["SkipType", "SKIP_TYPES", "StepsSpec", "space_timesteps", "ddim_timesteps", "resolve_timesteps",
           "respace_schedule"]


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    return value


def _check_steps_count(steps: int, num_timesteps: int) -> int:
    _check_int("steps", steps, 1)
    if steps > num_timesteps:
        raise ValueError(f"steps: expected at most the process's {num_timesteps} timesteps, got {steps}")
    return steps


def space_timesteps(num_timesteps: int, section_counts: "str | Sequence[int]") -> list[int]:
    """improved-diffusion's ``space_timesteps``: the kept timesteps (sorted distinct ints in [0, T)).

    Args:
        num_timesteps: T of the original process.
        section_counts: ``"ddimN"``, a comma-separated string ``"a,b,c"`` or a list of ints: T is cut into
            len(section_counts) sections (the first T % len ones one step longer) and section i keeps
            section_counts[i] evenly spaced steps (its first and last included when the count is > 1).
    """
    T = _check_int("num_timesteps", num_timesteps, 1)
    spec = section_counts
    if isinstance(section_counts, str):
        text = section_counts.strip()
        if text.startswith("ddim"):
            try:
                desired = int(text[len("ddim"):])
            except ValueError:
                raise ValueError(f"section_counts: expected 'ddimN' with an int N, got {section_counts!r}") from None
            _check_steps_count(desired, T)
            for stride in range(1, T + 1):
                if len(range(0, T, stride)) == desired:
                    return list(range(0, T, stride))
            raise ValueError(f"section_counts: no stride gives exactly {desired} steps over {T} timesteps "
                             f"(for {section_counts!r}); use {str(desired)!r} for even spacing instead")
        try:
            counts = [int(part) for part in text.split(",")]
        except ValueError:
            raise ValueError(f"section_counts: expected 'ddimN', 'N' or comma-separated ints like '10,15,20', "
                             f"got {section_counts!r}") from None
    else:
        counts = list(section_counts)
        if not all(isinstance(c, int) and not isinstance(c, bool) for c in counts):
            raise ValueError(f"section_counts: expected a string or a list of ints, got {section_counts!r}")
    if not counts or any(c < 0 for c in counts) or sum(counts) < 1:
        raise ValueError(f"section_counts: expected non-negative counts summing to >= 1, got {spec!r}")
    if len(counts) > T:
        raise ValueError(f"section_counts: {len(counts)} sections cannot split {T} timesteps ({spec!r})")
    size_per, extra = divmod(T, len(counts))
    start = 0
    kept: list[int] = []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"section_counts: section {i} has {size} timesteps, cannot keep {count} ({spec!r} "
                             f"over {T} timesteps)")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return sorted(set(kept))


def ddim_timesteps(num_timesteps: int, steps: int, skip_type: SkipType = "uniform") -> list[int]:
    """DDIM's timestep subsequence (sorted distinct ints in [0, T)).

    ``"uniform"``: range(0, T, T // steps) (ermongroup/ddim; more than ``steps`` entries when steps does not
    divide T); ``"quad"``: int(linspace(0, sqrt(0.8 T), steps)^2) without duplicates; ``"even"``:
    :func:`space_timesteps` (T, [steps]); ``"quad_full"``: round((T - 1) (i / (steps - 1))^2) without duplicates.
    """
    T = _check_int("num_timesteps", num_timesteps, 1)
    _check_steps_count(steps, T)
    if skip_type == "uniform":
        return list(range(0, T, T // steps))
    if skip_type == "quad":
        grid = numpy.linspace(0, numpy.sqrt(T * 0.8), steps) ** 2  # numpy, as ermongroup/ddim, for equal floors
        return sorted({int(v) for v in grid})
    if skip_type == "even":
        return space_timesteps(T, [steps])
    if skip_type == "quad_full":
        if steps == 1:
            return [T - 1]
        return sorted({round((T - 1) * (i / (steps - 1)) ** 2) for i in range(steps)})
    raise ValueError(f"skip_type: expected one of {', '.join(map(repr, SKIP_TYPES))}, got {skip_type!r}")


def resolve_timesteps(num_timesteps: int, steps: StepsSpec, skip_type: SkipType = "uniform") -> list[int]:
    """The kept timesteps for any :data:`StepsSpec`: an int count (with ``skip_type``), an improved-diffusion
    string (:func:`space_timesteps`), or the timesteps themselves (checked: distinct ints in [0, T))."""
    T = _check_int("num_timesteps", num_timesteps, 1)
    if isinstance(steps, bool):
        raise ValueError(f"steps: expected an int, a string or a sequence of ints, got {steps!r}")
    if isinstance(steps, int):
        return ddim_timesteps(T, steps, skip_type)
    if isinstance(steps, str):
        return space_timesteps(T, steps)
    if isinstance(steps, torch.Tensor):
        steps = steps.tolist()
    try:
        kept = [int(s) for s in steps]
    except (TypeError, ValueError):
        raise ValueError(f"steps: expected an int, a string or a sequence of ints, got {steps!r}") from None
    if not kept or any(s < 0 or s >= T for s in kept) or len(set(kept)) != len(kept):
        raise ValueError(f"steps: expected distinct timesteps in [0, {T}), got {kept}")
    return sorted(kept)


def respace_schedule(schedule: NoiseSchedule, use_timesteps: Sequence[int]) -> tuple[NoiseSchedule, torch.Tensor]:
    """The process that visits only ``use_timesteps``; returns (respaced schedule, timestep_map).

    The respaced abar are the original ones at the kept timesteps (bit for bit), so
    beta'_i = 1 - abar_{t_i} / abar_{t_(i-1)}. ``timestep_map`` is int64 ``[T']`` on the schedule's device:
    respaced index i -> original timestep t_i.
    """
    kept = resolve_timesteps(schedule.num_timesteps, list(use_timesteps))
    index = torch.tensor(kept, dtype=torch.int64, device=schedule.device)
    respaced = NoiseSchedule.from_alphas_cumprod(schedule.alphas_cumprod[index], name=f"{schedule.name}[{len(kept)}]")
    return respaced, index
