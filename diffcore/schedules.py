"""Beta schedules and the float64 tables of a diffusion process.

Conventions are improved-diffusion's: timesteps t in {0..T-1}, alpha_t = 1 - beta_t,
abar_t = prod_{s<=t} alpha_s, abar_prev(t) = abar_{t-1} with abar_prev(0) = 1.

Schedules (:data:`ScheduleName`):

- ``"linear"``: DDPM's beta_t linear from 1e-4 to 0.02, scaled by 1000/T as improved-diffusion does, so that any
  T gives about the same abar_T.
- ``"cosine"``: Improved DDPM eq. 17, f(u) = cos((u + s)/(1 + s) pi/2)^2 with s = 0.008,
  beta_t = min(1 - f((t+1)/T) / f(t/T), 0.999).
- ``"scaled_linear"``: Stable Diffusion's sqrt(beta) linear from sqrt(0.00085) to sqrt(0.012) (no 1000/T scaling).
- ``"sigmoid"``: GeoDiff's / diffusers' beta = sigmoid(linspace(-6, 6, T)) (beta_end - beta_start) + beta_start,
  1e-4 to 0.02 (no 1000/T scaling).
- or betas given directly (:meth:`NoiseSchedule.from_betas`).

Any of them can be rescaled to zero terminal SNR (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample
Steps are Flawed", Algorithm 1): sqrt(abar) is shifted and scaled so that sqrt(abar_{T-1}) = 0 while sqrt(abar_0)
is kept. abar_{T-1} = 0 makes x_{T-1} pure noise; only v-prediction can be used with it (eps and x0 predictions
are singular at that step; :class:`diffcore.diffusion.GaussianDiffusion` says so).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Optional, get_args

import torch

ScheduleName = Literal["linear", "cosine", "scaled_linear", "sigmoid"]
SCHEDULE_NAMES: tuple[str, ...] = get_args(ScheduleName)
#: other libraries' names for the same schedules: diffusers' ``beta_schedule="squaredcos_cap_v2"`` is exactly
#: improved-diffusion's cosine (betas_for_alpha_bar with s = 0.008, max_beta = 0.999)
SCHEDULE_ALIASES: dict[str, str] = {"squaredcos_cap_v2": "cosine"}

COSINE_S = 0.008  #: the cosine schedule's offset s (Improved DDPM sec. 3.2)
COSINE_MAX_BETA = 0.999  #: the cosine schedule's clipping of beta_t

__all__ = [
    "ScheduleName", "SCHEDULE_NAMES", "SCHEDULE_ALIASES", "schedule_from_diffusers_config", "NoiseSchedule", "make_schedule", "named_betas",
    "linear_betas", "cosine_betas", "scaled_linear_betas", "sigmoid_betas", "rescale_zero_terminal_snr",
]


def _check_num_timesteps(num_timesteps: int) -> int:
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 1:
        raise ValueError(f"num_timesteps: expected an int >= 1, got {num_timesteps!r}")
    return num_timesteps


def linear_betas(num_timesteps: int, beta_start: Optional[float] = None,
                 beta_end: Optional[float] = None) -> torch.Tensor:
    """DDPM's linear betas, float64 ``[T]``; the defaults are 1e-4 and 0.02 times 1000/T (improved-diffusion)."""
    T = _check_num_timesteps(num_timesteps)
    scale = 1000.0 / T
    start = scale * 1e-4 if beta_start is None else float(beta_start)
    end = scale * 0.02 if beta_end is None else float(beta_end)
    if beta_end is None and end > 1.0:
        raise ValueError(f"num_timesteps: the linear schedule's 1000/T scaling gives beta_end = {end:g} > 1 for "
                         f"T = {T}; use T >= 20 or pass beta_end")
    return torch.linspace(start, end, T, dtype=torch.float64)


def cosine_alpha_bar(u: torch.Tensor, s: float = COSINE_S) -> torch.Tensor:
    """Improved DDPM's f(u) = cos((u + s)/(1 + s) pi/2)^2 for u in [0, 1] (unnormalized alpha-bar)."""
    return torch.cos((u + s) / (1.0 + s) * (math.pi / 2.0)) ** 2


def cosine_betas(num_timesteps: int, s: float = COSINE_S, max_beta: float = COSINE_MAX_BETA) -> torch.Tensor:
    """Improved DDPM's cosine betas, float64 ``[T]``: min(1 - f((t+1)/T) / f(t/T), max_beta)."""
    T = _check_num_timesteps(num_timesteps)
    i = torch.arange(T, dtype=torch.float64)
    ratio = cosine_alpha_bar((i + 1.0) / T, s) / cosine_alpha_bar(i / T, s)
    return (1.0 - ratio).clamp(max=max_beta)


def scaled_linear_betas(num_timesteps: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """Stable Diffusion's betas, float64 ``[T]``: linspace(sqrt(beta_start), sqrt(beta_end), T)^2."""
    T = _check_num_timesteps(num_timesteps)
    return torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), T, dtype=torch.float64) ** 2


def sigmoid_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """GeoDiff's sigmoid betas, float64 ``[T]``: sigmoid(linspace(-6, 6, T)) (beta_end - beta_start) + beta_start."""
    T = _check_num_timesteps(num_timesteps)
    return torch.sigmoid(torch.linspace(-6.0, 6.0, T, dtype=torch.float64)) * (beta_end - beta_start) + beta_start


def named_betas(name: ScheduleName, num_timesteps: int, **kwargs) -> torch.Tensor:
    """The betas (float64 ``[T]``) of a named schedule; ``kwargs`` go to the schedule's function
    (``beta_start`` / ``beta_end`` for the linear-type ones, ``s`` / ``max_beta`` for cosine)."""
    builders = {"linear": linear_betas, "cosine": cosine_betas, "scaled_linear": scaled_linear_betas,
                "sigmoid": sigmoid_betas}
    name = SCHEDULE_ALIASES.get(name, name)
    if name not in builders:
        raise ValueError(f"schedule: expected one of {', '.join(map(repr, SCHEDULE_NAMES))} (or "
                         f"{', '.join(map(repr, SCHEDULE_ALIASES))}), got {name!r}")
    try:
        return builders[name](num_timesteps, **kwargs)
    except TypeError as error:  # an option that this schedule does not take
        raise TypeError(f"schedule {name!r}: {error}") from None


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024, Algorithm 1: betas (float64 ``[T]``, T >= 2) whose abar_{T-1} is exactly 0.

    sqrt(abar) is mapped affinely so that its first value is kept and its last becomes 0; the last beta is 1.
    """
    betas = betas.to(torch.float64)
    if betas.numel() < 2:
        raise ValueError(f"betas: zero terminal SNR rescaling needs at least 2 timesteps, got {betas.numel()}")
    sqrt_abar = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * (first / (first - last))
    abar = sqrt_abar**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


def _abar_prev(abar: torch.Tensor) -> torch.Tensor:
    return torch.cat([abar.new_ones(1), abar[:-1]])


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """The tables of a T-step Gaussian diffusion process, float64 ``[T]`` each, all on one device.

    Build with :func:`make_schedule`, :meth:`from_betas` or :meth:`from_alphas_cumprod`; move once with
    :meth:`to`. ``alphas_cumprod`` is what the ops gather from; every other table is derived from the two
    stored ones on access (cheap, and never done inside a sampling loop).
    """

    betas: torch.Tensor  #: beta_t, float64 [T], in (0, 1] (1 only at the last step: zero terminal SNR)
    #: abar_t = prod_{s<=t} (1 - beta_s), float64 [T], decreasing in (0, 1) (the last may be 0)
    alphas_cumprod: torch.Tensor
    name: str = "custom"  #: the schedule's name, for display

    def __post_init__(self) -> None:
        for field in ("betas", "alphas_cumprod"):
            value = getattr(self, field)
            if not isinstance(value, torch.Tensor) or value.dtype != torch.float64 or value.dim() != 1:
                got = f"{value.dtype} tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) \
                    else type(value).__name__
                raise TypeError(f"{field}: expected a 1-D float64 tensor, got {got}")
        if self.betas.numel() < 1 or self.betas.shape != self.alphas_cumprod.shape:
            raise ValueError(f"betas and alphas_cumprod: expected the same length >= 1, got "
                             f"{self.betas.numel()} and {self.alphas_cumprod.numel()}")
        if self.betas.device != self.alphas_cumprod.device:
            raise ValueError(f"alphas_cumprod: expected a tensor on {self.betas.device} (where betas is), "
                             f"got one on {self.alphas_cumprod.device}")
        if self.betas.device.type == "cpu":  # values are checked where they are built (on the host), not after a move
            _check_betas(self.betas)

    @classmethod
    def from_betas(cls, betas: "torch.Tensor | list[float]", name: str = "custom") -> "NoiseSchedule":
        """A schedule from betas (``[T]``, any float dtype or a list; computed in float64)."""
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.dim() != 1:
            raise ValueError(f"betas: expected a 1-D tensor, got shape {tuple(betas.shape)}")
        _check_betas(betas)
        return cls(betas=betas, alphas_cumprod=torch.cumprod(1.0 - betas, dim=0), name=name)

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: torch.Tensor, name: str = "custom") -> "NoiseSchedule":
        """A schedule whose abar table is exactly ``alphas_cumprod`` (float64 ``[T]``); beta_t = 1 - abar_t/abar_{t-1}.

        Used by respacing, so that the respaced abar are the original ones bit for bit.
        """
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        if abar.dim() != 1 or abar.numel() < 1:
            raise ValueError(f"alphas_cumprod: expected a 1-D tensor with >= 1 entry, got shape {tuple(abar.shape)}")
        if not bool(((abar >= 0) & (abar < 1)).all()) or not bool((abar[1:] < abar[:-1]).all()):
            raise ValueError("alphas_cumprod: expected strictly decreasing values in [0, 1)")
        return cls(betas=1.0 - abar / _abar_prev(abar), alphas_cumprod=abar, name=name)

    # -- derived tables ------------------------------------------------------------------------------------
    @property
    def num_timesteps(self) -> int:
        """T, the number of timesteps."""
        return self.betas.numel()

    @property
    def device(self) -> torch.device:
        return self.betas.device

    @property
    def alphas(self) -> torch.Tensor:
        """alpha_t = 1 - beta_t, float64 ``[T]``."""
        return 1.0 - self.betas

    @property
    def alphas_cumprod_prev(self) -> torch.Tensor:
        """abar_{t-1} with abar_{-1} = 1, float64 ``[T]``."""
        return _abar_prev(self.alphas_cumprod)

    @property
    def posterior_variance(self) -> torch.Tensor:
        """beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t), float64 ``[T]`` (entry 0 is 0, unclipped)."""
        return self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

    @property
    def snr(self) -> torch.Tensor:
        """Signal-to-noise ratio abar_t / (1 - abar_t), float64 ``[T]``."""
        return self.alphas_cumprod / (1.0 - self.alphas_cumprod)

    @property
    def has_zero_terminal_snr(self) -> bool:
        """True when abar_{T-1} == 0 (x_{T-1} is pure noise)."""
        return bool(self.alphas_cumprod[-1] == 0)

    def to(self, device: "torch.device | str") -> "NoiseSchedule":
        """The same schedule with its tables on ``device`` (self when they are there already)."""
        device = torch.device(device)
        if self.betas.device == device or (device.index is None and self.betas.device.type == device.type):
            return self
        return dataclasses.replace(self, betas=self.betas.to(device), alphas_cumprod=self.alphas_cumprod.to(device))

    def __repr__(self) -> str:
        return (f"NoiseSchedule(name={self.name!r}, T={self.num_timesteps}, "
                f"abar_0={float(self.alphas_cumprod[0]):.6g}, "
                f"abar_T-1={float(self.alphas_cumprod[-1]):.6g}, device={self.device})")


def _check_betas(betas: torch.Tensor) -> None:
    if betas.numel() < 1:
        raise ValueError("betas: expected at least 1 timestep, got 0")
    if not bool(torch.isfinite(betas).all()) or not bool(((betas > 0) & (betas <= 1)).all()):
        raise ValueError(f"betas: expected values in (0, 1], got values in "
                         f"[{float(betas.min())}, {float(betas.max())}]")
    if betas.numel() > 1 and bool((betas[:-1] >= 1).any()):
        raise ValueError("betas: beta = 1 is only allowed at the last timestep (zero terminal SNR)")


def make_schedule(name: "ScheduleName | NoiseSchedule" = "linear", num_timesteps: int = 1000, *,
                  rescale_to_zero_terminal_snr: bool = False, device: "torch.device | str | None" = None,
                  **kwargs) -> NoiseSchedule:
    """Build a :class:`NoiseSchedule` by name (see the module docstring) with float64 tables.

    Args:
        name: ``"linear" | "cosine" | "scaled_linear" | "sigmoid"`` (or an alias, :data:`SCHEDULE_ALIASES`).
        num_timesteps: T >= 1.
        rescale_to_zero_terminal_snr: apply Lin et al.'s rescaling so abar_{T-1} = 0.
        device: where the tables live (moved once).
        kwargs: schedule options (``beta_start``, ``beta_end``; cosine: ``s``, ``max_beta``).
    """
    if isinstance(name, NoiseSchedule):
        return name.to(device) if device is not None else name
    name = SCHEDULE_ALIASES.get(name, name)
    betas = named_betas(name, num_timesteps, **kwargs)
    label = name
    if rescale_to_zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
        label = f"{name}+zero_snr"
    schedule = NoiseSchedule.from_betas(betas, name=label)
    return schedule.to(device) if device is not None else schedule


#: diffusers' ``beta_schedule`` names -> diffcore's
DIFFUSERS_BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine",
                            "sigmoid": "sigmoid"}


def schedule_from_diffusers_config(config: "Mapping[str, Any]") -> NoiseSchedule:
    """The :class:`NoiseSchedule` of a diffusers scheduler config (``num_train_timesteps``, ``beta_schedule`` with
    ``beta_start``/``beta_end``, or ``trained_betas``; then ``rescale_betas_zero_snr``), betas in float64 (diffusers
    uses float32: relative differences ~1e-7). ``linear`` is linspace(beta_start, beta_end, T) as given (no 1000/T
    scaling). Errors name the config field (ValueError)."""
    T = config.get("num_train_timesteps", 1000)
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"scheduler config num_train_timesteps: expected an int >= 1, got {T!r}")
    trained = config.get("trained_betas")
    if trained is not None:
        betas = torch.as_tensor(trained, dtype=torch.float64)
        if betas.shape != (T,):
            raise ValueError(f"scheduler config trained_betas: expected {T} values (num_train_timesteps), got "
                             f"shape {tuple(betas.shape)}")
        label = "custom"
    else:
        name = config.get("beta_schedule", "linear")
        if name not in DIFFUSERS_BETA_SCHEDULES:
            raise ValueError(f"scheduler config beta_schedule: expected one of "
                             f"{', '.join(map(repr, DIFFUSERS_BETA_SCHEDULES))} or trained_betas, got {name!r}")
        label = DIFFUSERS_BETA_SCHEDULES[name]
        if label == "cosine":
            betas = named_betas("cosine", T)
        else:
            betas = named_betas(label, T, beta_start=float(config.get("beta_start", 0.0001)),  # type: ignore[arg-type]
                                beta_end=float(config.get("beta_end", 0.02)))
    if config.get("rescale_betas_zero_snr", False):
        betas, label = rescale_zero_terminal_snr(betas), f"{label}+zero_snr"
    return NoiseSchedule.from_betas(betas, name=label)
