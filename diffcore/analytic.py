"""Closed-form optimal models for Gaussian data: the oracle that tests of samplers, losses and bounds use.

For data x0 ~ N(mu, Sigma) in R^D and x_t = sqrt(a) x0 + sqrt(1 - a) eps (a = abar_t), everything is Gaussian:
x_t ~ N(sqrt(a) mu, M_t) with M_t = a Sigma + (1 - a) I, and the minimum-mean-squared-error predictions are
    eps*(x_t, t) = E[eps | x_t] = sqrt(1 - a) M_t^{-1} (x_t - sqrt(a) mu),
    x0*(x_t, t)  = E[x0 | x_t]  = mu + sqrt(a) Sigma M_t^{-1} (x_t - sqrt(a) mu),
    Var[x0 | x_t] = Sigma - a Sigma M_t^{-1} Sigma  (= (1 - a) Sigma M_t^{-1}),
and, for diagonal Sigma, the true reverse step q(x_s | x_t) is N(mu~(x0*, x_t), beta~ + c1^2 Var[x0 | x_t]), so a
learned-variance model that outputs this variance makes ancestral sampling exact at any step size. The
probability-flow ODE keeps the whitened coordinate fixed: x_s - sqrt(a_s) mu = M_s^{1/2} M_t^{-1/2}
(x_t - sqrt(a_t) mu) (all M_t share Sigma's eigenvectors). Data are ``[B, D]`` (channels = D).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .diffusion import GaussianDiffusion, Model
from .reference import formulas
from .types import PredictionType, VarianceType

__all__ = ["GaussianData"]


class GaussianData:
    """x0 ~ N(mean, cov) in R^D with the optimal predictions of a diffusion over schedule ``alphas_cumprod``.

    Args: mean ``[D]``, cov ``[D, D]`` symmetric positive definite; alphas_cumprod float64 ``[T]`` of the original
    (training) process, the one whose timesteps models receive. Computations are float64.
    """

    def __init__(self, mean: torch.Tensor, cov: torch.Tensor, alphas_cumprod: torch.Tensor):
        self.mean = torch.as_tensor(mean, dtype=torch.float64)
        self.cov = torch.as_tensor(cov, dtype=torch.float64)
        D = self.mean.numel()
        if self.mean.shape != (D,) or self.cov.shape != (D, D) or not torch.allclose(self.cov, self.cov.T):
            raise ValueError(f"cov: expected a symmetric [{D}, {D}] matrix for mean [{D}], got {tuple(self.cov.shape)}")
        self.eigenvalues, self.eigenvectors = torch.linalg.eigh(self.cov)
        if not bool((self.eigenvalues > 0).all()):
            raise ValueError("cov: expected a positive definite matrix")
        self.alphas_cumprod = alphas_cumprod.double().cpu()
        self.dim = D

    # -- helpers -------------------------------------------------------------------------------------------------
    def _spectral(self, x: torch.Tensor, fn) -> torch.Tensor:
        """Apply U diag(fn(lambda)) U^T to rows of x ``[B, D]``; fn maps eigenvalues ``[D]`` to ``[B, D]``."""
        U = self.eigenvectors
        return ((x @ U) * fn(self.eigenvalues)) @ U.T

    def _abar(self, t: torch.Tensor) -> torch.Tensor:
        return self.alphas_cumprod[t.cpu()][:, None]  # [B, 1]

    # -- the optimal predictions ----------------------------------------------------------------------------------
    def eps(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """E[eps | x_t] ``[B, D]`` float64 at original timesteps t ``[B]``."""
        a = self._abar(t)
        centered = x_t.double().cpu() - a.sqrt() * self.mean
        return self._spectral(centered, lambda lam: (1.0 - a).sqrt() / (a * lam + 1.0 - a))

    def x0(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """E[x0 | x_t] ``[B, D]`` float64."""
        a = self._abar(t)
        centered = x_t.double().cpu() - a.sqrt() * self.mean
        return self.mean + self._spectral(centered, lambda lam: a.sqrt() * lam / (a * lam + 1.0 - a))

    def x0_variance_diag(self, t: torch.Tensor) -> torch.Tensor:
        """The diagonal of Var[x0 | x_t] ``[B, D]`` (exact for diagonal cov)."""
        a = self._abar(t)
        U = self.eigenvectors
        lam = self.eigenvalues
        return ((U**2) @ (lam * (1.0 - a) / (a * lam + 1.0 - a)).T).T

    def model(self, diffusion: GaussianDiffusion) -> Model:
        """The optimal model for ``diffusion``'s prediction and variance types: ``model(x [B, D], t [B] original)``.

        For learned variances it outputs the exact reverse-step variance of ``diffusion``'s (possibly respaced)
        steps (exact for diagonal cov): log var for ``learned``, the interpolation v for ``learned_range``.
        """
        abar_run = diffusion.alphas_cumprod.double().cpu()
        posterior_variance = diffusion.schedule.posterior_variance.cpu()  # beta~, 0 at index 0
        timestep_map = None if diffusion.timestep_map is None else diffusion.timestep_map.cpu()

        def model_fn(x: torch.Tensor, t: torch.Tensor, **_: object) -> torch.Tensor:
            a = self._abar(t)
            if diffusion.prediction_type == PredictionType.EPS:
                out = self.eps(x, t)
            elif diffusion.prediction_type == PredictionType.X0:
                out = self.x0(x, t)
            else:
                out = formulas.v_target(self.x0(x, t), self.eps(x, t), a)
            if diffusion.variance_type.is_learned:
                index = t.cpu() if timestep_map is None else torch.searchsorted(timestep_map, t.cpu())
                tables = formulas.gather_tables(abar_run, index)
                c1 = tables.posterior_mean_coef1[:, None]
                true_var = posterior_variance[index][:, None] + c1**2 * self.x0_variance_diag(t)
                log_var = true_var.log()
                if diffusion.variance_type == VarianceType.LEARNED_RANGE:
                    low, high = tables.log_posterior_variance[:, None], tables.beta.log()[:, None]
                    log_var = 2.0 * (log_var - low) / (high - low) - 1.0
                out = torch.cat([out, log_var], dim=1)
            return out.to(device=x.device, dtype=x.dtype)

        return model_fn

    # -- distributions ------------------------------------------------------------------------------------------
    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """n draws of x0, ``[n, D]`` float64."""
        z = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        return self.mean + self._spectral(z, lambda lam: lam.sqrt().expand(n, -1))

    def log_prob(self, x0: torch.Tensor) -> torch.Tensor:
        """log N(x0; mean, cov) in nats, ``[B]``."""
        centered = x0.double().cpu() - self.mean
        white = (centered @ self.eigenvectors) / self.eigenvalues.sqrt()
        return -0.5 * (white**2).sum(1) - 0.5 * self.eigenvalues.log().sum() - 0.5 * self.dim * math.log(2 * math.pi)

    def ode_transport(self, x: torch.Tensor, abar_from: float, abar_to: float) -> torch.Tensor:
        """The exact probability-flow ODE map from noise level abar_from to abar_to (1 = data), ``[B, D]``."""
        a, b = float(abar_from), float(abar_to)
        centered = x.double().cpu() - math.sqrt(a) * self.mean
        ratio = lambda lam: ((b * lam + 1.0 - b) / (a * lam + 1.0 - a)).sqrt().expand(x.shape[0], -1)  # noqa: E731
        return math.sqrt(b) * self.mean + self._spectral(centered, ratio)
