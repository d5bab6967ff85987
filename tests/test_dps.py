"""DPS and the naive inpainting baseline on a Gaussian prior whose exact eps and posterior are known."""
from __future__ import annotations

import pytest
import torch

import diffcore.inverse as inv
from diffcore.diffusion import GaussianDiffusion
from diffcore.schedules import NoiseSchedule

torch.set_num_threads(1)
DT = torch.float64
H = W = 8
D = H * W
T = 1000
STEPS = 100
BETAS = torch.linspace(1e-4, 0.02, T, dtype=DT)
ABAR = torch.cumprod(1.0 - BETAS, 0)
TMAP = torch.linspace(0, T - 1, STEPS, dtype=DT).round().long()  # respaced: 100 of 1000 steps
FULL = GaussianDiffusion(NoiseSchedule.from_betas(BETAS))
SPACED = FULL.respaced(TMAP.tolist())


def spaced(kept=TMAP, **types):
    """The process of BETAS respaced to the timesteps ``kept``, with the given prediction / variance types."""
    return GaussianDiffusion(NoiseSchedule.from_betas(BETAS), **types).respaced(kept.tolist())


class GaussianPrior(torch.nn.Module):
    """Data x0 ~ N(mu, Sigma) on 1x8x8 images; eps*(x_t, t) = sqrt(1 - a) (a Sigma + (1 - a) I)^{-1} (x_t - sqrt(a) mu),
    the exact noise predictor of the process with alpha-bar table ABAR (t = original timesteps)."""

    def __init__(self, learned_variance=False):
        super().__init__()
        coords = torch.stack(torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij"), -1).reshape(-1, 2)
        dist2 = ((coords[:, None] - coords[None]) ** 2).sum(-1).double()
        self.sigma = 0.25 * torch.exp(-dist2 / 8.0) + 0.01 * torch.eye(D, dtype=DT)
        self.evals, self.evecs = torch.linalg.eigh(self.sigma)
        self.mu = 0.3 * torch.sin(coords[:, 0].double() / 2.0)
        self.learned_variance = learned_variance
        self.weight = torch.nn.Parameter(torch.ones((), dtype=DT))  # must receive no gradient from sampling
        self.seen = []

    def forward(self, x, t):
        self.seen.append(t.clone())
        a = ABAR[t].to(x.dtype)[:, None]
        z = (x.reshape(x.shape[0], -1) - a.sqrt() * self.mu) @ self.evecs
        eps = ((1 - a).sqrt() * (z / (a * self.evals + 1 - a)) @ self.evecs.T).reshape(x.shape) * self.weight
        if self.learned_variance:  # v = -1: log variance = log beta~ (fixed_small)
            return torch.cat([eps, -torch.ones_like(eps)], dim=1)
        return eps

    def posterior_mean(self, a_matrix, y, sigma_y):
        """E[x0 | y] for y = A x0 + N(0, sigma_y^2 I)."""
        m = a_matrix.shape[0]
        gain = self.sigma @ a_matrix.T @ torch.linalg.inv(a_matrix @ self.sigma @ a_matrix.T
                                                          + sigma_y**2 * torch.eye(m, dtype=DT))
        return self.mu + gain @ (y.reshape(-1) - a_matrix @ self.mu)


def _problem(task, batch=192, sigma_y=0.05, **kwargs):
    prior = GaussianPrior()
    op = inv.make_operator(task, (1, H, W), **kwargs)
    a_matrix = op(torch.eye(D, dtype=DT).reshape(D, 1, H, W)).reshape(D, -1).T
    g = torch.Generator().manual_seed(0)
    x_true = prior.mu + (prior.evecs * prior.evals.sqrt()) @ torch.randn(D, generator=g, dtype=DT)
    y1 = inv.GaussianNoise(sigma_y)(op(x_true.reshape(1, 1, H, W)), seed=1)
    post = prior.posterior_mean(a_matrix, y1, sigma_y)
    y = y1.expand(batch, *y1.shape[1:]).contiguous()
    return prior, op, y, post


def _distance_of_mean(samples, target):
    return (samples.reshape(samples.shape[0], -1).mean(0) - target).norm().item()


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("task", ["sr2", "deblur-gauss"])
def test_dps_moves_samples_to_the_posterior_mean(task, sampler):
    kwargs = {"kernel_size": 5, "sigma": 1.0} if task == "deblur-gauss" else {}
    prior, op, y, post = _problem(task, **kwargs)
    prior_gap = (prior.mu - post).norm().item()
    guided = inv.dps_sample(prior, SPACED, op, y, zeta=0.5, sampler=sampler, seed=2, progress=False)
    unguided = inv.dps_sample(prior, SPACED, op, y, zeta=0.0, sampler=sampler, seed=2, progress=False)
    assert _distance_of_mean(guided.sample, post) < 0.2 * prior_gap  # measured 0.04-0.13
    assert _distance_of_mean(unguided.sample, post) > 0.9 * prior_gap
    # unguided samples follow the prior: their mean is mu up to sampling error (sd of the mean ~ 0.5/sqrt(192))
    assert _distance_of_mean(unguided.sample, prior.mu) < 0.35 * prior_gap
    # the residual shrinks along the guided trajectory and stays large without guidance
    final = guided.residual_norms[-1].mean()
    assert final < 0.25 * guided.residual_norms[0].mean() and final < 0.25 * unguided.residual_norms[-1].mean()


def test_dps_and_naive_inpainting():
    prior, op, y, post = _problem("inpaint-box")
    prior_gap = (prior.mu - post).norm().item()
    guided = inv.dps_sample(prior, SPACED, op, y, zeta=1.0, seed=3, progress=False)
    unguided = inv.dps_sample(prior, SPACED, op, y, zeta=0.0, seed=3, progress=False)
    naive = inv.naive_inpaint_sample(prior, SPACED, op, y, seed=3, progress=False)
    assert _distance_of_mean(guided.sample, post) < 0.2 * prior_gap
    assert _distance_of_mean(unguided.sample, post) > 0.9 * prior_gap
    m = op.mask.expand_as(naive)
    assert naive[m].equal(y[m])  # replacement: the observed pixels are the measurement
    # with a correlated prior, replacement also pulls the missing pixels toward the posterior mean
    assert _distance_of_mean(naive, post) < 0.5 * prior_gap


def test_one_dps_step_in_closed_form():
    """With one DDIM step to t = 0 (x_prev = x0_hat), x0_hat is affine in x (x0_hat = M x + b) and the DPS update
    is x0_hat - zeta M^T A^T (A x0_hat - y) / ||A x0_hat - y||, written out with dense matrices."""
    prior = GaussianPrior()
    op = inv.make_operator("sr2", (1, H, W))
    a_matrix = op(torch.eye(D, dtype=DT).reshape(D, 1, H, W)).reshape(D, -1).T
    t = 600
    a = ABAR[t]
    cov_t = a * prior.sigma + (1 - a) * torch.eye(D, dtype=DT)
    m_matrix = torch.eye(D, dtype=DT) / a.sqrt() - (1 / a - 1).sqrt() * (1 - a).sqrt() * torch.linalg.inv(cov_t)
    b = (1 / a - 1).sqrt() * (1 - a).sqrt() * torch.linalg.solve(cov_t, a.sqrt() * prior.mu)
    x = torch.randn(3, 1, H, W, generator=torch.Generator().manual_seed(5), dtype=DT)
    y = torch.randn(3, 1, H // 2, W // 2, generator=torch.Generator().manual_seed(6), dtype=DT)
    out = inv.dps_sample(prior, FULL.respaced([t]), op, y, zeta=0.7, sampler="ddim", x_T=x, seed=0,
                         progress=False)
    for i in range(3):
        x0 = m_matrix @ x[i].reshape(-1) + b
        r = a_matrix @ x0 - y[i].reshape(-1)
        expected = x0 - 0.7 * m_matrix.T @ a_matrix.T @ r / r.norm()
        assert torch.allclose(out.sample[i].reshape(-1), expected, atol=1e-10)
        assert out.residual_norms[0, i].item() == pytest.approx(r.norm().item(), rel=1e-12)


def test_images_of_a_batch_do_not_interact():
    prior, op, y, _ = _problem("sr2", batch=3)
    y = y + 0.1 * torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=DT)
    both = inv.dps_sample(prior, spaced(TMAP[:30]), op, y, zeta=0.5, seed=4, progress=False)
    first = inv.dps_sample(prior, spaced(TMAP[:30]), op, y[:1], zeta=0.5, seed=4, progress=False)
    assert torch.allclose(both.sample[:1], first.sample, atol=1e-12)  # not coupled through a batch norm
    again = inv.dps_sample(prior, spaced(TMAP[:30]), op, y, zeta=0.5, seed=4, progress=False)
    other = inv.dps_sample(prior, spaced(TMAP[:30]), op, y, zeta=0.5, seed=5, progress=False)
    assert again.sample.equal(both.sample) and not other.sample.equal(both.sample)


def test_model_sees_original_timesteps_and_keeps_no_graph():
    prior, op, y, _ = _problem("sr4", batch=2)
    result = inv.dps_sample(prior, SPACED, op, y, zeta=0.5, seed=0, progress=False)
    assert torch.equal(torch.stack([t[0] for t in prior.seen]), TMAP.flip(0))
    assert prior.weight.grad is None  # gradients go to x_t only
    assert not result.sample.requires_grad and result.sample.grad_fn is None
    assert result.residual_norms.shape == (STEPS, 2) and not result.residual_norms.requires_grad


def test_learned_variance_output_uses_the_variance_channels():
    _, op, y, _ = _problem("sr2", batch=2)
    fixed = inv.dps_sample(GaussianPrior(), SPACED, op, y, zeta=0.5, seed=8, progress=False)
    learned = inv.dps_sample(GaussianPrior(learned_variance=True), spaced(variance_type="learned_range"), op, y,
                             zeta=0.5, seed=8, progress=False)
    assert torch.allclose(fixed.sample, learned.sample, atol=1e-12)  # v = -1 is the fixed_small variance
    large = inv.dps_sample(GaussianPrior(), spaced(variance_type="fixed_large"), op, y, zeta=0.5, seed=8,
                           progress=False)
    assert not torch.allclose(fixed.sample, large.sample, atol=1e-3)


def test_poisson_weighted_dps_fits_the_counts():
    prior, op, _, _ = _problem("sr2", batch=1)
    noise = inv.PoissonNoise(rate=200.0, low=-2.0, high=2.0)
    x_true = prior.mu.reshape(1, 1, H, W)
    y = noise(op(x_true), seed=3).expand(64, -1, -1, -1).contiguous()
    guided = inv.dps_sample(prior, SPACED, op, y, zeta=0.3, noise_model=noise, seed=1, progress=False)
    unguided = inv.dps_sample(prior, SPACED, op, y, zeta=0.0, noise_model=noise, seed=1, progress=False)
    fit = noise.residual_norm(y, op(guided.sample)).mean()
    assert fit < 0.25 * noise.residual_norm(y, op(unguided.sample)).mean()


def test_dps_argument_errors():
    prior, op, y, _ = _problem("sr2", batch=2)
    with pytest.raises(TypeError, match="diffusion: expected a GaussianDiffusion"):
        inv.dps_sample(prior, SPACED.alphas_cumprod, op, y, progress=False)  # the tables of the old interface
    with pytest.raises(ValueError, match="steps: expected at most"):
        inv.dps_sample(prior, SPACED, op, y, steps=STEPS + 1, progress=False)
    with pytest.raises(ValueError, match="zeta"):
        inv.dps_sample(prior, SPACED, op, y, zeta=-1.0, progress=False)
    with pytest.raises(ValueError, match="zeta"):
        inv.dps_sample(prior, SPACED, op, y, zeta=float("inf"), progress=False)
    with pytest.raises(ValueError, match="sampler: expected one of 'ddpm', 'ddim', got 'euler'"):
        inv.dps_sample(prior, SPACED, op, y, sampler="euler", progress=False)
    with pytest.raises(ValueError, match="eta: expected a float >= 0"):
        inv.dps_sample(prior, SPACED, op, y, sampler="ddim", eta=-0.5, progress=False)
    with pytest.raises(ValueError, match=r"model output: expected shape \(2, 1, 8, 8\) for variance_type="):
        inv.dps_sample(lambda x, t: torch.zeros(2, 3, H, W, dtype=DT), SPACED, op, y, progress=False)
    with pytest.raises(ValueError, match="^y:"):
        inv.dps_sample(prior, SPACED, op, y[0], progress=False)  # no batch dimension
    with pytest.raises(TypeError, match="operator"):
        inv.naive_inpaint_sample(prior, SPACED, op, y, progress=False)
    with pytest.raises(TypeError, match="callback"):
        inv.dps_sample(prior, SPACED, op, y, callback="print", progress=False)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_unguided_dps_is_the_unconditional_sampler(sampler):
    """zeta = 0 reproduces diffcore.samplers on the same process and seed bit for bit: the same reverse step and
    the same noise convention."""
    from diffcore.samplers import ddim_sample, ddpm_sample

    prior, op, y, _ = _problem("sr2", batch=3)
    if sampler == "ddpm":
        ref = ddpm_sample(prior, FULL, (3, 1, H, W), steps=40, seed=11, dtype=DT, progress=False)
        process = FULL.respaced(40)
    else:
        ref = ddim_sample(prior, FULL, (3, 1, H, W), steps=40, eta=0.5, seed=11, dtype=DT, progress=False)
        process = FULL.respaced(list(ref.timesteps[::-1]))
    ours = inv.dps_sample(prior, process, op, y, zeta=0.0, sampler=sampler, eta=0.5, seed=11, progress=False)
    assert torch.equal(ours.sample, ref.sample)
    # steps= respaces as ddpm_sample does
    by_steps = inv.dps_sample(prior, FULL, op, y, steps=40, zeta=0.0, sampler="ddpm", seed=11, progress=False)
    if sampler == "ddpm":
        assert torch.equal(by_steps.sample, ref.sample)


def test_callback_sees_every_step_and_the_naive_baseline_keeps_the_noise_convention():
    """The callback gets (step, t, x, pred_x0) after each step, t the model's timestep, and stops the loop by
    returning True; the naive baseline with an all-False mask is the plain DDPM sampler (its replacement does
    nothing), so its noise is the samplers' noise."""
    from diffcore.samplers import ddpm_sample

    prior, op, y, _ = _problem("sr2", batch=2)
    seen = []
    process = spaced(TMAP[:12])
    result = inv.dps_sample(prior, process, op, y, zeta=0.5, seed=3, progress=False,
                            callback=lambda k, t, x, x0: seen.append((k, t, x.clone(), x0.clone())))
    assert [k for k, *_ in seen] == list(range(12))
    assert [t for _, t, *_ in seen] == list(process.original_timesteps[::-1])
    assert torch.equal(seen[-1][2], result.sample) and torch.equal(seen[-1][3], result.pred_x0)
    stopped = inv.dps_sample(prior, process, op, y, zeta=0.5, seed=3, progress=False,
                             callback=lambda k, t, x, x0: k == 4)
    assert torch.equal(stopped.sample, seen[4][2]) and stopped.residual_norms.shape[0] == 5
    nothing = inv.MaskOperator((1, H, W), torch.zeros(H, W, dtype=torch.bool))
    naive = inv.naive_inpaint_sample(prior, process, nothing, torch.zeros(2, 1, H, W, dtype=DT), seed=3,
                                     progress=False)
    assert torch.equal(naive, ddpm_sample(prior, process, (2, 1, H, W), seed=3, dtype=DT, progress=False).sample)
