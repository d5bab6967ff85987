"""Exponential moving average of a model's weights (the EMA model is the one that samples)."""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn


class EMA:
    """Keeps ``ema_model``, a frozen copy of ``model`` whose floating-point parameters follow
    ``ema <- rate * ema + (1 - rate) * param`` at every :meth:`update`; buffers are copied as they are.

    After n updates from ``ema_0`` with parameters ``p_1..p_n``:
    ``ema_n = rate^n ema_0 + (1 - rate) sum_k rate^(n-k) p_k``.

    With ``warmup`` the decay of update n (n = 0, 1, ... updates before it) is ``min(rate, (1 + n) / (10 + n))``
    (diffusers' EMA warm-up): the first updates forget the initial weights quickly, so a short run's EMA is not
    dominated by them (with rate 0.999 and no warm-up, 0.999^2000 = 13% of the EMA is still the initialization
    after 2000 steps).

    Args:
        model: the model being trained (its current weights initialise the EMA).
        rate: the decay, in [0, 1] (0.9999 in improved-diffusion; smaller for short runs).
        warmup: ramp the decay up as above.
    """

    def __init__(self, model: nn.Module, rate: float = 0.9999, warmup: bool = False):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate: expected a decay in [0, 1], got {rate}")
        self.rate = float(rate)
        self.warmup = bool(warmup)
        self.num_updates = 0
        self._skipped: Optional[torch.Tensor] = None  # skipped updates not yet subtracted from num_updates
        self.ema_model = copy.deepcopy(model).eval()
        self.ema_model.requires_grad_(False)

    def _pairs(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        ema_params = [p for p in self.ema_model.parameters() if p.is_floating_point()]
        params = [p.detach() for p in model.parameters() if p.is_floating_point()]
        if len(ema_params) != len(params):
            raise ValueError(f"model: expected the architecture the EMA was built from ({len(ema_params)} float "
                             f"parameters), got one with {len(params)}")
        return ema_params, params

    def decay(self) -> float:
        """The decay the next :meth:`update` uses."""
        if not self.warmup:
            return self.rate
        n = self.num_updates
        return min(self.rate, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self, model: nn.Module, skip: Optional[torch.Tensor] = None) -> None:
        """Move the EMA weights towards ``model``'s (the same architecture; a DDP wrapper's ``.module``).

        ``skip``: an optional bool tensor ``[]`` on the weights' device; where True the update is a no-op (the
        weights, buffers and the update count used by the warm-up stay as they were), decided on the device
        without a host sync. A skipped update still counts in :attr:`num_updates` until :meth:`settle`."""
        ema_params, params = self._pairs(model)
        if skip is None:
            torch._foreach_lerp_(ema_params, params, 1.0 - self.decay())
            for ema_buffer, buffer in zip(self.ema_model.buffers(), model.buffers()):
                ema_buffer.copy_(buffer)
        else:
            keep = ~skip
            if self._skipped is None:
                self._skipped = torch.zeros((), dtype=torch.int64, device=skip.device)
            if self.warmup:  # the decay of the n-th applied update, n computed on the device (float64 as above)
                n = (self.num_updates - self._skipped).to(torch.float64)
                decay = torch.clamp((1.0 + n) / (10.0 + n), max=self.rate)
            else:
                decay = torch.tensor(self.rate, dtype=torch.float64, device=skip.device)
            weight = torch.where(keep, 1.0 - decay, 0.0)
            for dtype in {p.dtype for p in ema_params}:
                pairs = [(e, p) for e, p in zip(ema_params, params) if e.dtype == dtype]
                torch._foreach_lerp_([e for e, _ in pairs], [p for _, p in pairs], weight.to(dtype))
            for ema_buffer, buffer in zip(self.ema_model.buffers(), model.buffers()):
                ema_buffer.copy_(torch.where(keep, buffer, ema_buffer))
            self._skipped += skip.to(torch.int64)
        self.num_updates += 1

    def settle(self) -> None:
        """Subtract the skipped updates from :attr:`num_updates` (one host sync; done before saving)."""
        if self._skipped is not None:
            self.num_updates -= int(self._skipped)
            self._skipped = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The EMA model's state dict (load it into the model class to sample)."""
        return self.ema_model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor], num_updates: int = 0) -> None:
        """Restore EMA weights saved by :meth:`state_dict` (strict: keys and shapes must match)."""
        from ..checkpoint import load_state_strict

        load_state_strict(self.ema_model, state, what="ema")
        self.num_updates = int(num_updates)
        self._skipped = None
