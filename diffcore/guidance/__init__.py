"""Guidance for class-conditional sampling.

- Classifier-free guidance (Ho & Salimans 2022): :func:`classifier_free_guidance` wraps a class-conditional
  model (one batched pass for the conditional and unconditional halves); :func:`drop_labels` is the label
  dropout used in training.
- Classifier guidance (Dhariwal & Nichol 2021, Algorithm 2): :func:`classifier_guidance` shifts eps by
  -sqrt(1 - abar_t) s grad log p(y | x_t, t) of any differentiable classifier, e.g. a :class:`NoisyClassifier`
  trained with :func:`train_noisy_classifier`, saved by :func:`save_classifier` and read back by
  :func:`load_classifier` (``diffcore sample --classifier PATH``).

Both wrappers return callables with the samplers' model signature ``model(x, t, **model_kwargs)`` (see
:mod:`diffcore.samplers`; the wrapped model may return its output wrapped as diffusers' models do, the wrappers
return a tensor), so they plug into :func:`diffcore.samplers.ddim_sample`, :func:`~diffcore.samplers.ddpm_sample`
and the ODE solvers, and compose (classifier guidance of a classifier-free-guided model). Neither reads a tensor
value back to the host when called, so they keep the samplers' loops free of host-device syncs.
"""
from ._checks import Scale
from .classifier import Classifier, ClassifierGuidance, classifier_guidance, classifier_log_prob_grad
from .classifier_checkpoint import LoadedClassifier, check_classifier_fits, load_classifier, save_classifier
from .classifier_free import ClassifierFreeGuidance, classifier_free_guidance, drop_labels
from .noisy_classifier import NoisyClassifier, noisy_accuracy, train_noisy_classifier

__all__ = ["Scale", "Classifier", "ClassifierFreeGuidance", "classifier_free_guidance", "drop_labels",
           "ClassifierGuidance", "classifier_guidance", "classifier_log_prob_grad", "NoisyClassifier",
           "train_noisy_classifier", "LoadedClassifier", "save_classifier", "load_classifier",
           "check_classifier_fits", "noisy_accuracy"]
