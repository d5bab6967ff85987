"""Enumerations shared by the ops, the diffusion process and the samplers.

The integer values are part of the C++ op schemas (``csrc/diffcore_math.h`` uses the same numbers).
"""
from __future__ import annotations

import enum


class PredictionType(enum.IntEnum):
    """What the model's (first C channels of) output predicts."""

    EPS = 0  #: the noise epsilon (DDPM)
    X0 = 1  #: the clean image x_0
    V = 2  #: v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022)


class VarianceType(enum.IntEnum):
    """How the reverse-process variance Sigma_theta(x_t, t) is chosen."""

    FIXED_SMALL = 0  #: posterior variance beta~_t (log clipped at t = 0)
    FIXED_LARGE = 1  #: beta_t, with entry 0 replaced by beta~_1
    LEARNED_RANGE = 2  #: I-DDPM: model emits v in [-1, 1]; log var = frac log beta + (1 - frac) log beta~
    LEARNED = 3  #: model emits log variance directly

    @property
    def is_learned(self) -> bool:
        return self in (VarianceType.LEARNED, VarianceType.LEARNED_RANGE)


def as_prediction_type(value: "PredictionType | str | int") -> PredictionType:
    """Parse ``"eps" | "x0" | "v"`` (or the enum / its int) into a :class:`PredictionType`."""
    return _parse(PredictionType, value, "prediction_type")


def as_variance_type(value: "VarianceType | str | int") -> VarianceType:
    """Parse ``"fixed_small" | "fixed_large" | "learned_range" | "learned"`` into a :class:`VarianceType`."""
    return _parse(VarianceType, value, "variance_type")


def _parse(enum_cls, value, arg_name: str):
    if isinstance(value, enum_cls):
        return value
    if isinstance(value, str):
        key = value.strip().upper()
        if key in enum_cls.__members__:
            return enum_cls[key]
    elif isinstance(value, int) and not isinstance(value, bool):
        try:
            return enum_cls(value)
        except ValueError:
            pass
    choices = ", ".join(repr(m.lower()) for m in enum_cls.__members__)
    raise ValueError(f"{arg_name}: expected one of {choices}, got {value!r}")
