"""Samplers of training timesteps: uniform, and Improved DDPM's loss-second-moment importance sampling.

Both return per-sample timesteps ``t`` (int64 ``[B]``) and importance weights ``w`` (float32 ``[B]``) such that
``mean(w * loss(t))`` is an unbiased estimate of the uniform-t average loss: ``w = 1 / (T p(t))``.

:class:`LossSecondMomentSampler` (Nichol & Dhariwal 2021, section 3.3; improved-diffusion's
``LossSecondMomentResampler``) keeps the last ``history`` losses seen at every t; once every t has a full history
it samples ``p(t) ∝ sqrt(E[L_t^2])``, mixed with a uniform share: ``p = (1 - u) q + u / T``. Until then it samples
uniformly (weights 1). It is updated with the per-sample losses of each global batch in batch order, so all DDP
ranks that see the same global batch hold the same state.
"""
from __future__ import annotations

from typing import Literal, Optional

import numpy as np
import torch

TimestepSamplerName = Literal["uniform", "loss-second-moment"]


class UniformSampler:
    """t uniform on {0..T-1}; weights are all 1."""

    name: TimestepSamplerName = "uniform"

    def __init__(self, num_timesteps: int):
        if not isinstance(num_timesteps, int) or num_timesteps < 1:
            raise ValueError(f"num_timesteps: expected a positive int, got {num_timesteps!r}")
        self.num_timesteps = num_timesteps

    def probabilities(self) -> torch.Tensor:
        """p(t) for t = 0..T-1, float64 ``[T]`` summing to 1."""
        return torch.full((self.num_timesteps,), 1.0 / self.num_timesteps, dtype=torch.float64)

    def sample(self, batch_size: int, generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``(t int64 [batch_size], weights float32 [batch_size])`` on the CPU from ``generator``."""
        probs = self.probabilities()
        if self.uniform_now():
            t = torch.randint(0, self.num_timesteps, (batch_size,), generator=generator)
            return t, torch.ones(batch_size, dtype=torch.float32)
        t = torch.multinomial(probs, batch_size, replacement=True, generator=generator)
        weights = 1.0 / (self.num_timesteps * probs[t])
        return t, weights.to(torch.float32)

    def uniform_now(self) -> bool:
        """True while sampling is uniform (always, for this class)."""
        return True

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Record the per-sample losses of a batch (no-op for the uniform sampler)."""

    def state_dict(self) -> dict:
        """Checkpointable state."""
        return {"name": self.name, "num_timesteps": self.num_timesteps}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output (the name and T must match)."""
        if state.get("name") != self.name or int(state.get("num_timesteps", -1)) != self.num_timesteps:
            raise ValueError(f"timestep sampler state: saved for {state.get('name')!r} with T="
                             f"{state.get('num_timesteps')}, this is {self.name!r} with T={self.num_timesteps}")


class LossSecondMomentSampler(UniformSampler):
    """I-DDPM importance sampling: ``p(t) ∝ sqrt(mean of the last `history` losses^2 at t)``, mixed with a uniform
    share ``uniform_prob``; uniform (weights 1) until every t has ``history`` losses recorded.

    Args:
        num_timesteps: T.
        history: losses remembered per t (10 in the paper).
        uniform_prob: the uniform share u of the mixture (0.001 in the paper).
    """

    name: TimestepSamplerName = "loss-second-moment"

    def __init__(self, num_timesteps: int, history: int = 10, uniform_prob: float = 0.001):
        super().__init__(num_timesteps)
        if not isinstance(history, int) or history < 1:
            raise ValueError(f"history: expected a positive int, got {history!r}")
        if not 0.0 <= uniform_prob <= 1.0:
            raise ValueError(f"uniform_prob: expected a probability in [0, 1], got {uniform_prob}")
        self.history, self.uniform_prob = history, float(uniform_prob)
        self.losses = np.zeros((num_timesteps, history), dtype=np.float64)
        self.counts = np.zeros(num_timesteps, dtype=np.int64)

    def uniform_now(self) -> bool:
        """True until every timestep has its full loss history (the warm-up)."""
        return not bool((self.counts == self.history).all())

    def probabilities(self) -> torch.Tensor:
        """p(t), float64 ``[T]``: uniform during warm-up, else ``(1 - u) sqrt(E L^2) / sum + u / T``."""
        if self.uniform_now():
            return super().probabilities()
        rms = np.sqrt(np.mean(self.losses**2, axis=-1))
        total = rms.sum()
        if not np.isfinite(total) or total <= 0:
            return super().probabilities()
        probs = rms / total * (1.0 - self.uniform_prob) + self.uniform_prob / self.num_timesteps
        return torch.from_numpy(probs)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Append each sample's loss to the history of its t, in batch order (the oldest entry drops out of a full
        history). ``t`` int64 ``[B]``, ``losses`` float ``[B]`` (any device; copied to the CPU: a host sync)."""
        t_np = t.detach().cpu().numpy()
        loss_np = losses.detach().to(torch.float64).cpu().numpy()
        if t_np.shape != loss_np.shape:
            raise ValueError(f"losses: expected one loss per timestep, shape {t_np.shape}, got {loss_np.shape}")
        for step, loss in zip(t_np, loss_np):
            if self.counts[step] == self.history:
                self.losses[step, :-1] = self.losses[step, 1:]
                self.losses[step, -1] = loss
            else:
                self.losses[step, self.counts[step]] = loss
                self.counts[step] += 1

    def state_dict(self) -> dict:
        return {**super().state_dict(), "history": self.history, "uniform_prob": self.uniform_prob,
                "losses": torch.from_numpy(self.losses.copy()), "counts": torch.from_numpy(self.counts.copy())}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if int(state["history"]) != self.history:
            raise ValueError(f"timestep sampler state: history {state['history']} saved, {self.history} configured")
        self.losses = state["losses"].to(torch.float64).numpy().copy()
        self.counts = state["counts"].to(torch.int64).numpy().copy()


def make_timestep_sampler(name: TimestepSamplerName, num_timesteps: int) -> UniformSampler:
    """``"uniform"`` -> :class:`UniformSampler`; ``"loss-second-moment"`` -> :class:`LossSecondMomentSampler`
    with the paper's settings (history 10, uniform share 0.001)."""
    if name == "uniform":
        return UniformSampler(num_timesteps)
    if name == "loss-second-moment":
        return LossSecondMomentSampler(num_timesteps)
    raise ValueError(f"timestep_sampler: expected 'uniform' or 'loss-second-moment', got {name!r}")
