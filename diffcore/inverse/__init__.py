"""Inverse problems: degradation operators, measurement noise, quality metrics, baselines and DPS.

Example (x: clean images [B, 3, 32, 32] in [-1, 1]; model and its GaussianDiffusion ``diffusion``)::

    op = make_operator("sr4", (3, 32, 32))
    y = GaussianNoise(0.05)(op(x), seed=0)
    result = dps_sample(model, diffusion.respaced(250), op, y, zeta=1.0, seed=0)
    psnr(result.sample, x), ssim(result.sample, x)
"""
from .base import LinearOperator
from .baselines import naive_inpaint_sample, pseudo_inverse_baseline
from .blur import BlurOperator, GaussianBlur, MotionBlur, gaussian_kernel, gaussian_window, motion_kernel
from .dps import DPSResult, dps_sample
from .masks import BoxInpainting, MaskOperator, Outpainting, RandomInpainting, box_mask, outpaint_mask, random_mask
from .noise import GaussianNoise, NoiseKind, NoiseModel, PoissonNoise, make_noise
from .operators import TASKS, Task, default_blur_arguments, make_operator
from .quality import psnr, ssim
from .radon import RadonTransform, fbp_filter, radon_matrix
from .resize import AveragePoolDownsample, BicubicDownsample, bicubic_matrix

__all__ = [
    "LinearOperator", "MaskOperator", "BoxInpainting", "RandomInpainting", "Outpainting", "AveragePoolDownsample",
    "BicubicDownsample", "BlurOperator", "GaussianBlur", "MotionBlur", "RadonTransform", "Task", "TASKS",
    "make_operator", "default_blur_arguments", "box_mask", "random_mask", "outpaint_mask", "gaussian_kernel",
    "gaussian_window",
    "motion_kernel", "bicubic_matrix", "radon_matrix", "fbp_filter", "GaussianNoise", "PoissonNoise",
    "NoiseModel", "NoiseKind", "make_noise", "psnr", "ssim", "dps_sample", "DPSResult", "naive_inpaint_sample",
    "pseudo_inverse_baseline",
]
