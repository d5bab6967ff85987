"""Classifier guidance (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis", Algorithm 2):
a classifier p_phi(y | x_t, t) trained on noisy data steers a diffusion model through the score-based shift

    eps~(x_t, t) = eps(x_t, t) - sqrt(1 - abar_t) s grad_{x_t} log p_phi(y | x_t, t).

Since eps = -sqrt(1 - abar_t) grad log p_t(x_t), eps~ is the eps of p_t(x_t) p_phi(y | x_t)^s: with the exact
noisy classifier and s = 1 it is exactly the conditional model's eps, for every sampler that consumes eps (DDIM,
DDPM, the ODE solvers). Models predicting x0 or v are handled by converting the prediction to eps, shifting,
and converting back (``diffcore.reference.formulas``). On the DDPM sampler this moves the mean by
(beta_t / sqrt(alpha_t)) s grad, close to (not the same as) ADM's Algorithm 1 shift Sigma_t s grad.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from ..diffusion import model_output_tensor, split_model_output
from ..reference import formulas
from ..types import PredictionType, as_prediction_type
from ._checks import DeviceCache, Scale, check_labels, check_scale, scale_like, take_labels

__all__ = ["ClassifierGuidance", "classifier_guidance", "classifier_log_prob_grad"]

#: ``classifier(x_t [B, ...], t int64 [B]) -> logits [B, K]``
Classifier = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def classifier_log_prob_grad(classifier: Classifier, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *,
                             y_max: Optional[int] = None) -> torch.Tensor:
    """grad_x log softmax(classifier(x, t))[y] per sample, ``[B, ...]`` like x (detached, x's dtype).

    The log-probabilities of the batch are summed before differentiating, so each sample gets its own gradient
    as long as the classifier treats samples independently (GroupNorm, not BatchNorm in training mode).
    Runs with grad enabled even inside ``torch.no_grad`` (the samplers' context); y int64 ``[B]`` on x's device.
    ``y_max``: the largest label, known on the host, checked against the number of logits K (no device sync).
    Raises ValueError when no gradient reaches x (a classifier that ignores or detaches its input would otherwise
    make guidance a silent no-op).
    """
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        logits = classifier(x_in, t)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != x.shape[0]:
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"classifier output: expected logits [B, K] with B = {x.shape[0]}, got {got}")
        if y_max is not None and y_max >= logits.shape[1]:
            raise ValueError(f"y: expected labels in [0, {logits.shape[1] - 1}] (the classifier has "
                             f"{logits.shape[1]} classes), got a label {y_max}")
        log_probs = torch.log_softmax(logits, dim=1)
        selected = log_probs.gather(1, y[:, None]).sum()
        grad = None
        if selected.requires_grad:
            (grad,) = torch.autograd.grad(selected, x_in, allow_unused=True)
    if grad is None:  # guidance would silently do nothing
        raise ValueError("classifier: no gradient of its log-probabilities reaches x_t (the logits do not depend on "
                         "x, or the classifier detaches them / runs under torch.inference_mode); classifier "
                         "guidance needs a classifier differentiable in its input")
    return grad.detach().to(x.dtype)


class ClassifierGuidance:
    """A guided model with the samplers' signature ``guided(x, t, **model_kwargs) -> [B, C or 2C, ...]``.

    Build it with :func:`classifier_guidance`. Attributes: ``model``, ``classifier``, ``y`` (int64 ``[B]``, or None:
    the targets come with each call as ``model_kwargs[label_kwarg]``), ``scale``, ``alphas_cumprod``,
    ``prediction_type``, ``label_kwarg``.
    """

    def __init__(self, model: Any, classifier: Classifier, y: Optional[torch.Tensor], scale: Scale,
                 alphas_cumprod: torch.Tensor, prediction_type: "PredictionType | str" = PredictionType.EPS,
                 label_kwarg: str = "classifier_y"):
        for name, fn in (("model", model), ("classifier", classifier)):
            if not callable(fn):
                raise TypeError(f"{name}: expected a callable, got {type(fn).__name__}")
        if not isinstance(alphas_cumprod, torch.Tensor) or alphas_cumprod.dtype != torch.float64 \
                or alphas_cumprod.dim() != 1 or alphas_cumprod.numel() < 1:
            got = (f"{alphas_cumprod.dtype} tensor of shape {tuple(alphas_cumprod.shape)}"
                   if isinstance(alphas_cumprod, torch.Tensor) else type(alphas_cumprod).__name__)
            raise TypeError(f"alphas_cumprod: expected the 1-D float64 abar table of the original process, got {got}")
        self.model = model
        self.classifier = classifier
        num_classes = getattr(classifier, "num_classes", None)
        high = num_classes - 1 if isinstance(num_classes, int) else None
        what = f" (the classifier has {num_classes} classes)" if high is not None else ""
        self._high, self._what = high, what
        self.label_kwarg = label_kwarg
        self.y, self._y_max = (None, None) if y is None else check_labels(y, high=high, what=what)
        self.scale = check_scale(scale)
        if isinstance(self.scale, torch.Tensor) and self.y is not None and self.scale.shape != self.y.shape:
            raise ValueError(f"scale: expected a float or one scale per label ({self.y.shape[0]}), got "
                             f"{self.scale.shape[0]} scales")
        self.alphas_cumprod = alphas_cumprod
        self.prediction_type = as_prediction_type(prediction_type)
        self._labels = DeviceCache(self.y) if self.y is not None else None
        self._abar = DeviceCache(alphas_cumprod)
        self._scale_cache = DeviceCache(self.scale) if isinstance(self.scale, torch.Tensor) else None

    def __repr__(self) -> str:
        scale = self.scale if not isinstance(self.scale, torch.Tensor) else f"tensor[{self.scale.numel()}]"
        batch = "labels per call" if self.y is None else self.y.numel()
        return (f"ClassifierGuidance(model={type(self.model).__name__}, classifier="
                f"{type(self.classifier).__name__}, batch={batch}, scale={scale}, "
                f"prediction={self.prediction_type.name.lower()})")

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **model_kwargs: Any) -> torch.Tensor:
        """The guided output for x ``[B, C, ...]`` and original timesteps t int64 ``[B]``; ``model_kwargs`` go to
        the model only, except the targets ``model_kwargs[label_kwarg]`` (int64 ``[B]``) of a wrapper built with
        ``y=None``, which go to the classifier only. Returns the model's output ``[B, C or 2C, ...]`` with the
        prediction channels shifted (variance channels unchanged), in the output's dtype, detached."""
        if not isinstance(x, torch.Tensor) or x.dim() < 1:
            raise TypeError(f"x: expected a tensor [B, ...], got {type(x).__name__}")
        batch = x.shape[0]
        y, model_kwargs = take_labels(self.y, self._labels, model_kwargs, batch,
                                      self.label_kwarg, x.device, high=self._high, what=self._what,
                                      role="are the classifier's targets, set by the guidance wrapper (its y)")
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.shape != (batch,):
            got = f"{t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"t: expected int64 timesteps [{batch}], got {got}")
        out = model_output_tensor(self.model(x, t, **model_kwargs))
        prediction, variance = split_model_output(out, x)
        grad = classifier_log_prob_grad(self.classifier, x, t, y, y_max=self._y_max)
        dtype = prediction.dtype
        abar = formulas.per_sample(self._abar.get(x.device)[t].double(), prediction)  # float64 coefficients
        shift = ((1.0 - abar).sqrt() * scale_like(self.scale, self._scale_cache, prediction) * grad).to(dtype)
        x_t = x.to(dtype)
        if self.prediction_type == PredictionType.EPS:
            guided = prediction - shift
        else:
            _, eps = formulas.predict_x0_eps(prediction, x_t, abar, self.prediction_type, False)
            eps = eps - shift
            x0 = formulas.x0_from_eps(x_t, eps, abar)
            guided = x0 if self.prediction_type == PredictionType.X0 else formulas.v_target(x0, eps, abar)
        guided = guided.to(dtype).detach()
        return guided if variance is None else torch.cat([guided, variance.detach()], dim=1)


def classifier_guidance(model: Any, classifier: Classifier, y: Optional[torch.Tensor], scale: Scale,
                        alphas_cumprod: torch.Tensor, *,
                        prediction_type: "PredictionType | str" = PredictionType.EPS,
                        label_kwarg: str = "classifier_y") -> ClassifierGuidance:
    """Wrap a (conditional or unconditional) model for classifier-guided sampling.

    ``guided = classifier_guidance(model, classifier, y, 2.0, diffusion.alphas_cumprod)`` then
    ``ddim_sample(guided, diffusion, shape)`` or ``ddpm_sample(...)``.

    Args:
        model: ``model(x [B, C, ...], t int64 [B], **model_kwargs) -> [B, C or 2C, ...]``.
        classifier: ``classifier(x_t [B, C, ...], t int64 [B]) -> logits [B, K]``, differentiable in x_t, e.g. a
            :class:`~diffcore.guidance.NoisyClassifier` (whose ``num_classes`` is then checked against y).
        y: int64 ``[B]`` target classes (B = the sampler's batch); None: the targets come with each call as
            ``model_kwargs[label_kwarg]`` (int64 ``[B]``, never passed to the model), e.g.
            ``diffcore.sample(guided, n, model_kwargs={"classifier_y": targets [n]}, batch_size=k)``, which gives
            every batch its rows of them (values checked per call when on the CPU).
        scale: s >= 0 (float, or a float tensor ``[B]``); s = 0 returns the model's output unchanged.
        alphas_cumprod: float64 ``[T]`` abar of the process whose timesteps the model and the classifier
            receive: the original (training) process, also when sampling on a respaced one.
        prediction_type: what the model's first C channels predict (``"eps" | "x0" | "v"``).
        label_kwarg: the keyword of the per-call targets when ``y`` is None (default ``"classifier_y"``, apart from
            a conditional model's own ``y``).
    Returns: a :class:`ClassifierGuidance` callable with the samplers' model signature. Each call evaluates the
        model once (without grad) and the classifier once forward and backward.
    """
    return ClassifierGuidance(model, classifier, y, scale, alphas_cumprod, prediction_type, label_kwarg)
