"""Enumerations shared by the ops, the diffusion process and the samplers, and the one parser of their names.

The integer values are part of the C++ op schemas (``csrc/kernel_args.h`` uses the same numbers). Names are
accepted in lower or upper case, and diffusers' names as aliases (``epsilon``, ``sample``, ``v_prediction``
for the prediction types), so a scheduler config's ``prediction_type`` can be passed as it is.
"""
from __future__ import annotations

import enum
from typing import Mapping, Optional, TypeVar


class PredictionType(enum.IntEnum):
    """What the model's (first C channels of) output predicts."""

    EPS = 0  #: the noise epsilon (DDPM); diffusers: ``"epsilon"``
    X0 = 1  #: the clean image x_0; diffusers: ``"sample"``
    V = 2  #: v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022); diffusers: ``"v_prediction"``


class VarianceType(enum.IntEnum):
    """How the reverse-process variance Sigma_theta(x_t, t) is chosen."""

    FIXED_SMALL = 0  #: posterior variance beta~_t (log clipped at t = 0)
    FIXED_LARGE = 1  #: beta_t, with entry 0 replaced by beta~_1
    LEARNED_RANGE = 2  #: I-DDPM: model emits v in [-1, 1]; log var = frac log beta + (1 - frac) log beta~
    LEARNED = 3  #: model emits log variance directly

    @property
    def is_learned(self) -> bool:
        """True for the types whose model emits a variance output (C more channels)."""
        return self in _LEARNED_VARIANCES


_LEARNED_VARIANCES = frozenset({VarianceType.LEARNED, VarianceType.LEARNED_RANGE})


#: diffusers' names of the prediction types (``DDPMScheduler`` / ``DDIMScheduler`` config ``prediction_type``)
PREDICTION_TYPE_ALIASES: Mapping[str, PredictionType] = {
    "epsilon": PredictionType.EPS, "sample": PredictionType.X0, "v_prediction": PredictionType.V}

E = TypeVar("E", bound=enum.IntEnum)


def as_prediction_type(value: "PredictionType | str | int") -> PredictionType:
    """Parse ``"eps" | "x0" | "v"`` or diffusers' ``"epsilon" | "sample" | "v_prediction"`` (or the enum / its
    int) into a :class:`PredictionType`."""
    return parse_enum(PredictionType, value, "prediction_type", PREDICTION_TYPE_ALIASES)


def as_variance_type(value: "VarianceType | str | int") -> VarianceType:
    """Parse ``"fixed_small" | "fixed_large" | "learned_range" | "learned"`` into a :class:`VarianceType`."""
    return parse_enum(VarianceType, value, "variance_type")


def parse_enum(enum_cls: type[E], value: "E | str | int", arg_name: str,
               aliases: Optional[Mapping[str, E]] = None) -> E:
    """``value`` as a member of ``enum_cls``: the member itself, its name (any case, surrounding spaces ignored),
    one of ``aliases`` (lower-case names) or its integer value; else a ValueError naming ``arg_name`` and the
    accepted names."""
    if isinstance(value, enum_cls):
        return value
    aliases = aliases or {}
    if isinstance(value, str):
        key = value.strip()
        if key.upper() in enum_cls.__members__:
            return enum_cls[key.upper()]
        if key.lower() in aliases:
            return aliases[key.lower()]
    elif isinstance(value, int) and not isinstance(value, bool):
        try:
            return enum_cls(value)
        except ValueError:
            pass
    choices = ", ".join(repr(name.lower()) for name in enum_cls.__members__)
    also = f" (or {', '.join(map(repr, aliases))})" if aliases else ""
    raise ValueError(f"{arg_name}: expected one of {choices}{also}, got {value!r}")
