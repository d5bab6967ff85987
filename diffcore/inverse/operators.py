"""The degradation operators by task name: :func:`make_operator` and the :data:`Task` names.

| task | operator | measurement | pseudo-inverse |
|---|---|---|---|
| inpaint-box | :class:`BoxInpainting` (missing centred box, half of each side) | image with zeros | observed pixels |
| inpaint-random | :class:`RandomInpainting` (92% of pixels missing, seeded) | image with zeros | observed pixels |
| outpaint | :class:`Outpainting` (only a centred half-side box known) | image with zeros | observed pixels |
| sr2, sr4 | :class:`AveragePoolDownsample` | [C, H/f, W/f] | nearest up-sampling |
| sr4-bicubic | :class:`BicubicDownsample` (PIL's antialiased bicubic) | [C, H/4, W/4] | Moore-Penrose |
| deblur-gauss | :class:`GaussianBlur` | [C, H, W] | damped least squares (CG) |
| deblur-motion | :class:`MotionBlur` (seeded random camera path) | [C, H, W] | damped least squares (CG) |
| ct | :class:`RadonTransform` (60 views in [0, pi)) | [C, n_angles, n_detectors] | filtered back-projection |

Image-size-dependent defaults for the blurs: DPS's 61-pixel kernels (sigma 3 for the Gaussian) are for
256 x 256 images; for a side s < 256 the motion kernel is the odd size nearest 61 s / 256 (at least 5: 7 pixels
for 28 x 28, 9 for 32 x 32) and the Gaussian has sigma = max(1, 3 s / 256) on an odd kernel >= 8 sigma + 1
(9 pixels for 28..85-pixel images): a blur a third of DPS's relative width would hardly degrade small images.
"""
from __future__ import annotations

import inspect
from typing import Literal, Sequence, get_args

from .base import LinearOperator, check_image_shape
from .blur import BlurOperator, GaussianBlur, MotionBlur, gaussian_kernel, motion_kernel
from .masks import BoxInpainting, MaskOperator, Outpainting, RandomInpainting
from .radon import RadonTransform
from .resize import AveragePoolDownsample, BicubicDownsample

__all__ = ["Task", "TASKS", "make_operator", "default_blur_arguments", "LinearOperator", "MaskOperator",
           "BoxInpainting", "RandomInpainting", "Outpainting", "AveragePoolDownsample", "BicubicDownsample",
           "BlurOperator", "GaussianBlur", "MotionBlur", "RadonTransform", "gaussian_kernel", "motion_kernel"]

Task = Literal["inpaint-box", "inpaint-random", "outpaint", "sr2", "sr4", "sr4-bicubic", "deblur-gauss",
               "deblur-motion", "ct"]
TASKS: tuple[str, ...] = get_args(Task)

_BUILDERS = {
    "inpaint-box": (BoxInpainting, {}),
    "inpaint-random": (RandomInpainting, {}),
    "outpaint": (Outpainting, {}),
    "sr2": (AveragePoolDownsample, {"factor": 2}),
    "sr4": (AveragePoolDownsample, {"factor": 4}),
    "sr4-bicubic": (BicubicDownsample, {"factor": 4}),
    "deblur-gauss": (GaussianBlur, {}),
    "deblur-motion": (MotionBlur, {}),
    "ct": (RadonTransform, {}),
}


def _odd_at_least(value: float, low: int) -> int:
    k = max(low, int(round(value)))
    return k if k % 2 == 1 else k + 1


def default_blur_arguments(task: Literal["deblur-gauss", "deblur-motion"], image_shape: Sequence[int]) -> dict:
    """The kernel arguments :func:`make_operator` uses for a blur task when none are given (see module doc)."""
    side = min(check_image_shape("image_shape", image_shape)[1:])
    largest = side if side % 2 == 1 else side - 1
    if task == "deblur-motion":
        k = 61 if side >= 256 else _odd_at_least(61 * side / 256, 5)
        return {"kernel_size": min(k, largest)}
    sigma = 3.0 if side >= 256 else max(1.0, 3.0 * side / 256)
    k = 61 if side >= 256 else _odd_at_least(8 * sigma + 1, 3)
    return {"kernel_size": min(k, largest), "sigma": sigma}


def make_operator(task: Task, image_shape: Sequence[int], **kwargs) -> LinearOperator:
    """Build the degradation operator of ``task`` for images of shape ``image_shape`` = (C, H, W).

    ``kwargs`` go to the operator's class (see the table in the module docstring): e.g. ``box``/``position``/
    ``seed`` for inpaint-box, ``missing``/``seed`` for inpaint-random, ``known`` for outpaint, ``kernel_size``/
    ``sigma``/``padding`` for deblur-gauss, ``kernel_size``/``intensity``/``seed``/``padding`` for
    deblur-motion, ``n_angles``/``n_detectors``/``step`` for ct. Raises ValueError for an unknown task, a bad
    image shape (e.g. not divisible by the SR factor), a kernel larger than the image; TypeError for an
    argument the task does not take.
    """
    if task not in _BUILDERS:
        raise ValueError(f"task: expected one of {', '.join(TASKS)}, got {task!r}")
    shape = check_image_shape("image_shape", image_shape)
    cls, fixed = _BUILDERS[task]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "image_shape")]
    for key in kwargs:
        if key not in accepted or key in fixed:
            allowed = [p for p in accepted if p not in fixed]
            raise TypeError(f"{key}: not an argument of task {task!r} (it accepts {', '.join(allowed) or 'none'})")
    arguments = dict(fixed)
    if task in ("deblur-gauss", "deblur-motion"):
        arguments.update(default_blur_arguments(task, shape))
    arguments.update(kwargs)
    return cls(shape, **arguments)
