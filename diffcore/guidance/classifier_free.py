"""Classifier-free guidance (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance"): one class-conditional
model trained with label dropout predicts both eps(x_t, y) and eps(x_t, null); sampling uses

    eps~ = eps(x_t, null) + s (eps(x_t, y) - eps(x_t, null)),

with s = 1 + w in the paper's notation (s = 1: the conditional model, s = 0: the unconditional one, s > 1:
sharper, more class-typical samples at some cost in diversity). Both halves come from ONE forward pass on the
batch [x; x] with labels [y; null]. The combination is affine with weights summing to 1, so applying it to an
x0- or v-prediction gives the same sampler update as applying it to eps (x0 and v are affine in eps at fixed
x_t): the wrapper works for every prediction type. With a learned variance (2C output channels) the variance
channels are the conditional half's (GLIDE's choice).
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from ..diffusion import model_output_tensor, split_model_output
from ._checks import DeviceCache, Scale, check_labels, check_scale, scale_like, take_labels

__all__ = ["ClassifierFreeGuidance", "classifier_free_guidance", "drop_labels"]


class ClassifierFreeGuidance:
    """A guided model with the samplers' signature ``guided(x, t, **model_kwargs) -> [B, C or 2C, ...]``.

    Build it with :func:`classifier_free_guidance`. Attributes: ``model``, ``y`` (int64 ``[B]``, or None: the labels
    come with each call as ``model_kwargs[label_kwarg]``), ``scale`` (float, or float64 CPU tensor ``[B]``),
    ``null_class``, ``label_kwarg``.
    """

    def __init__(self, model: Any, y: Optional[torch.Tensor], scale: Scale, null_class: int,
                 label_kwarg: str = "y"):
        if not callable(model):
            raise TypeError(f"model: expected a callable model(x, t, {label_kwarg}=labels), got "
                            f"{type(model).__name__}")
        if isinstance(null_class, bool) or not isinstance(null_class, int) or null_class < 1:
            raise ValueError(f"null_class: expected an int >= 1 (the label of the null class; the real classes "
                             f"are 0..null_class-1), got {null_class!r}")
        self.model = model
        self.null_class = null_class
        self.label_kwarg = label_kwarg
        self._what = f" ({null_class} = the null class)"
        self.y = None if y is None else check_labels(y, high=null_class, what=self._what)[0]
        self.scale = check_scale(scale)
        if isinstance(self.scale, torch.Tensor) and self.y is not None and self.scale.shape != self.y.shape:
            raise ValueError(f"scale: expected a float or one scale per label ({self.y.shape[0]}), got "
                             f"{self.scale.shape[0]} scales")
        self._scale_cache = DeviceCache(self.scale) if isinstance(self.scale, torch.Tensor) else None
        #: scale 1 everywhere: the guided model is the conditional model, so one unbatched pass suffices
        self.conditional_only = (not isinstance(self.scale, torch.Tensor)) and self.scale == 1.0
        self._labels = DeviceCache(self.y) if self.y is not None else None
        self._both = DeviceCache(torch.cat([self.y, torch.full_like(self.y, null_class)])) if self.y is not None \
            else None

    def __repr__(self) -> str:
        scale = self.scale if not isinstance(self.scale, torch.Tensor) else f"tensor[{self.scale.numel()}]"
        batch = "labels per call" if self.y is None else self.y.numel()
        return (f"ClassifierFreeGuidance(model={type(self.model).__name__}, batch={batch}, "
                f"scale={scale}, null_class={self.null_class})")

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **model_kwargs: Any) -> torch.Tensor:
        """The guided output for x ``[B, C, ...]`` and t ``[B]`` (timesteps as the model takes them).

        Built with ``y=None``, the wrapper takes this call's labels, int64 ``[B]``, from
        ``model_kwargs[label_kwarg]`` (so :func:`diffcore.sample` cuts them into its batches). Other
        ``model_kwargs`` are passed on; a tensor among them whose first dimension is B is repeated for the
        two halves (per-sample conditioning such as a low-resolution image), anything else is passed as is.
        Returns ``[B, C, ...]`` or ``[B, 2C, ...]`` like the model's output, in its dtype.
        """
        if not isinstance(x, torch.Tensor) or x.dim() < 1:
            raise TypeError(f"x: expected a tensor [B, ...], got {type(x).__name__}")
        batch = x.shape[0]
        y, model_kwargs = take_labels(self.y, self._labels, model_kwargs, batch,
                                      self.label_kwarg, x.device, high=self.null_class, what=self._what,
                                      role="is set by the guidance wrapper (its labels y)")
        if self.conditional_only:
            return model_output_tensor(self.model(x, t, **{self.label_kwarg: y}, **model_kwargs))
        both = torch.cat([y, torch.full_like(y, self.null_class)]) if self.y is None else self._both.get(x.device)
        doubled = {key: torch.cat([value, value]) if _per_sample(value, batch) else value
                   for key, value in model_kwargs.items()}
        out = model_output_tensor(self.model(torch.cat([x, x]), torch.cat([t, t]),
                                             **{self.label_kwarg: both}, **doubled))
        if not isinstance(out, torch.Tensor) or out.dim() < 1 or out.shape[0] != 2 * batch:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"model output: expected a tensor with batch {2 * batch} (conditional and "
                             f"unconditional halves), got {got}")
        cond, cond_var = split_model_output(out[:batch], x)
        uncond, _ = split_model_output(out[batch:], x)
        scale = scale_like(self.scale, self._scale_cache, cond)
        # lerp is exact at its ends: scale 1 gives cond and scale 0 uncond bit for bit
        guided = torch.lerp(uncond, cond, scale)
        return guided if cond_var is None else torch.cat([guided, cond_var], dim=1)


def _per_sample(value: Any, batch: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == batch


def classifier_free_guidance(model: Any, y: Optional[torch.Tensor], scale: Scale,
                             null_class: Optional[int] = None, *, label_kwarg: str = "y") -> ClassifierFreeGuidance:
    """Wrap a class-conditional model for classifier-free guided sampling.

    ``guided = classifier_free_guidance(model, y, 3.0, null_class=K)`` then
    ``ddim_sample(guided, diffusion, (B, C, H, W))`` (or ``ddpm_sample``, or any sampler taking
    ``model(x, t, **model_kwargs)``).

    Args:
        model: ``model(x [2B, C, ...], t [2B], y=labels int64 [2B], **kwargs) -> [2B, C or 2C, ...]``, e.g. a
            :class:`diffcore.unet.UNet` built with ``num_classes=K``.
        y: int64 ``[B]`` target labels in ``[0, null_class]`` (``null_class`` itself makes that sample
            unconditional); B must be the sampler's batch. None: the labels come with each call as
            ``model_kwargs[label_kwarg]`` (int64 ``[B]``), e.g. ``diffcore.sample(guided, n, model_kwargs={"y":
            labels [n]}, batch_size=k)``, which gives every batch its rows of them (values checked per call when
            on the CPU).
        scale: the guidance scale s >= 0 (float, or a float tensor ``[B]`` for one scale per sample):
            eps~ = eps_uncond + s (eps_cond - eps_uncond). s = 1 (as a float) calls the model once on the
            conditional batch only; any other scale makes one pass on the doubled batch.
        null_class: the label of the null (unconditional) class; default ``model.null_class`` (the UNet's
            ``num_classes``).
        label_kwarg: the keyword under which the model takes labels.
    Returns: a :class:`ClassifierFreeGuidance` callable with the samplers' model signature.
    Raises: ValueError / TypeError naming the argument (negative or non-finite scale, labels out of range or not
        int64, no null class); at call time when y's length differs from x's batch.
    """
    if null_class is None:
        null_class = getattr(model, "null_class", None)
        if null_class is None:
            raise ValueError("null_class: expected the null-class label (the model has no null_class attribute, "
                             "or it is None: is the model class-conditional?)")
    return ClassifierFreeGuidance(model, y, scale, null_class, label_kwarg)


def drop_labels(y: torch.Tensor, p: float, null_class: int,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Label dropout for classifier-free guidance training: each label becomes ``null_class`` with probability p.

    Args:
        y: int64 ``[B]`` labels (values in ``[0, null_class]``, checked on CPU only to avoid a device sync).
        p: dropout probability in [0, 1] (Ho & Salimans use 0.1 or 0.2).
        null_class: the null label (the UNet's ``num_classes``).
        generator: draws the ``[B]`` uniforms ``u`` (on the generator's device, default CPU); label b is dropped
            when ``u[b] < p``. Same generator state, same mask.
    Returns: a new int64 tensor ``[B]`` on y's device; y is not modified.
    """
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"p: expected a probability in [0, 1], got {p!r}")
    if isinstance(null_class, bool) or not isinstance(null_class, int) or null_class < 1:
        raise ValueError(f"null_class: expected an int >= 1, got {null_class!r}")
    if not isinstance(y, torch.Tensor) or y.dtype != torch.int64 or y.dim() != 1:
        got = f"{y.dtype} tensor of shape {tuple(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
        raise TypeError(f"y: expected an int64 tensor [B] of class labels, got {got}")
    if y.device.type == "cpu":
        check_labels(y, high=null_class, what=f" ({null_class} = the null class)")
    device = generator.device if generator is not None else torch.device("cpu")
    drop = torch.rand(y.shape, generator=generator, device=device) < p
    return torch.where(drop.to(y.device), torch.full_like(y, null_class), y)
