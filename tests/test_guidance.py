"""Guidance against known answers: a two-class Gaussian mixture whose conditional and unconditional eps and whose
noisy classifier p(y | x_t) are exact in closed form; the single batched CFG pass against separate passes (toy
model and a U-Net); label dropout rates; the noise-aware classifier; bad inputs."""
from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import MultivariateNormal

from diffcore.analytic import GaussianData
from diffcore.diffusion import GaussianDiffusion
from diffcore.guidance import (NoisyClassifier, classifier_free_guidance, classifier_guidance, drop_labels,
                               train_noisy_classifier)
from diffcore.reference import formulas
from diffcore.samplers import ddim_sample, ddpm_sample
from diffcore.schedules import make_schedule
from diffcore.types import PredictionType
from diffcore.unet import UNet, UNetConfig

torch.set_num_threads(1)
F64 = torch.float64


@pytest.fixture(scope="module")
def linear():
    return make_schedule("linear", 1000)


class Mixture:
    """x0 ~ sum_k pi_k N(mu_k, S_k) in R^2; x_t | class k ~ N(sqrt(a) mu_k, a S_k + (1 - a) I).

    Exact answers: the conditional eps of class k is the Gaussian one (diffcore.analytic); the unconditional eps is
    sum_k p(k | x_t) eps_k (the score of a mixture is the posterior-weighted sum of the component scores); the noisy
    classifier's logits are log pi_k + log N(x_t; sqrt(a) mu_k, a S_k + (1 - a) I) (Bayes).
    """

    def __init__(self, abar: torch.Tensor):
        self.weights = torch.tensor([0.3, 0.7], dtype=F64)
        self.means = [torch.tensor([-1.0, 0.5], dtype=F64), torch.tensor([1.0, -0.3], dtype=F64)]
        self.covs = [torch.tensor([[0.3, 0.1], [0.1, 0.2]], dtype=F64),
                     torch.diag(torch.tensor([0.25, 0.35], dtype=F64))]
        self.components = [GaussianData(m, c, abar) for m, c in zip(self.means, self.covs)]
        self.abar = abar.double().cpu()
        self.null_class = 2

    def logits(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """log pi_k + log p_t(x_t | k), ``[B, 2]``, differentiable in x (float64)."""
        a = self.abar[t.cpu()][:, None, None].to(x.device)
        eye = torch.eye(2, dtype=F64)
        cols = [self.weights[k].log() + MultivariateNormal(a[:, :, 0].sqrt() * mu, a * cov + (1 - a) * eye,
                                                           validate_args=False).log_prob(x.double())
                for k, (mu, cov) in enumerate(zip(self.means, self.covs))]
        return torch.stack(cols, dim=1)

    def eps_cond(self, x, t, k):
        return self.components[k].eps(x, t)

    def eps_uncond(self, x, t):
        w = torch.softmax(self.logits(x.detach(), t), dim=1)
        return w[:, :1] * self.eps_cond(x, t, 0) + w[:, 1:] * self.eps_cond(x, t, 1)

    def unconditional_model(self, x, t):
        return self.eps_uncond(x, t).to(x.dtype)

    def conditional_model(self, x, t, y):
        """Class-conditional eps with label 2 = null (unconditional)."""
        y = y[:, None]
        out = torch.where(y == 0, self.eps_cond(x, t, 0), self.eps_cond(x, t, 1))
        return torch.where(y == self.null_class, self.eps_uncond(x, t), out).to(x.dtype)

    def clean_posterior(self, x0):
        """p(k | x0) under the clean mixture, ``[B, 2]``."""
        logp = torch.stack([self.weights[k].log() + MultivariateNormal(self.means[k], self.covs[k]).log_prob(x0)
                            for k in range(2)], dim=1)
        return torch.softmax(logp, dim=1)


@pytest.fixture(scope="module")
def mixture(linear):
    return Mixture(linear.alphas_cumprod)


def assert_matches_gaussian(x, mean, cov, k=4.5):
    """Sample mean and covariance within k standard errors of (mean, cov)."""
    n = x.shape[0]
    se_mean = (cov.diagonal() / n).sqrt()
    assert ((x.mean(0) - mean).abs() < k * se_mean).all(), (x.mean(0), mean, se_mean)
    se_cov = ((torch.outer(cov.diagonal(), cov.diagonal()) + cov**2) / n).sqrt()
    assert ((torch.cov(x.T) - cov).abs() < k * se_cov).all(), (torch.cov(x.T), cov, se_cov)


def random_points(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = 1.5 * torch.randn(n, 2, dtype=F64, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    t[:4] = torch.tensor([0, 1, 500, 999])
    y = torch.randint(0, 2, (n,), generator=g)
    return x, t, y


# ----------------------------------------------------------------------------------- the mixture oracle itself
def test_mixture_oracle_eps_is_the_score(mixture):
    """eps*(x_t) = -sqrt(1 - abar) grad log p_t(x_t), with log p_t = logsumexp of the classifier's logits."""
    x, t, _ = random_points(64, 0)
    x = x.requires_grad_(True)
    (grad,) = torch.autograd.grad(torch.logsumexp(mixture.logits(x, t), 1).sum(), x)
    a = mixture.abar[t][:, None]
    torch.testing.assert_close(mixture.eps_uncond(x.detach(), t), -(1 - a).sqrt() * grad, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------- classifier-free guidance
def counting(model):
    calls = []

    def wrapped(x, t, **kwargs):
        calls.append(x.shape[0])
        return model(x, t, **kwargs)
    return wrapped, calls


def toy_conditional(x, t, y):
    """Elementwise per sample, so a batched pass is bit-identical to separate passes."""
    w = (y.to(x.dtype) + 1.0).reshape(-1, *([1] * (x.dim() - 1)))
    return torch.tanh(x * w) + 1e-3 * t.to(x.dtype).reshape(w.shape) - 0.1 * w


def test_cfg_scale_one_zero_and_the_single_batched_pass():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 4, 4, generator=g)
    t = torch.randint(0, 1000, (5,), generator=g)
    y = torch.tensor([0, 1, 2, 0, 3])
    null = torch.full_like(y, 4)
    cond, uncond = toy_conditional(x, t, y), toy_conditional(x, t, null)

    model, calls = counting(toy_conditional)
    assert torch.equal(classifier_free_guidance(model, y, 1.0, 4)(x, t), cond)
    assert calls == [5]  # scale 1: only the conditional pass
    calls.clear()
    assert torch.equal(classifier_free_guidance(model, y, 0.0, 4)(x, t), uncond)
    assert calls == [10]  # one pass on the doubled batch
    calls.clear()
    out = classifier_free_guidance(model, y, 3.5, 4)(x, t)
    assert calls == [10]
    torch.testing.assert_close(out, uncond + 3.5 * (cond - uncond), rtol=1e-6, atol=1e-6)
    # per-sample scales: rows with 1 and 0 are exactly the conditional and unconditional rows
    scales = torch.tensor([1.0, 0.0, 2.0, 1.0, 0.5])
    out = classifier_free_guidance(model, y, scales, 4)(x, t)
    assert torch.equal(out[[0, 3]], cond[[0, 3]]) and torch.equal(out[1], uncond[1])
    torch.testing.assert_close(out[2], uncond[2] + 2.0 * (cond[2] - uncond[2]))
    torch.testing.assert_close(out[4], 0.5 * (cond[4] + uncond[4]))


def test_guidance_wrappers_unwrap_diffusers_style_outputs(mixture):
    """An inner model returning its output wrapped (diffusers' UNet2DOutput-like .sample, a tuple, a dict) gives
    the wrappers' tensor output bit for bit as the plain model does."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 4, 4, generator=g)
    t = torch.randint(0, 1000, (4,), generator=g)
    y = torch.tensor([0, 1, 2, 0])
    wraps = (lambda o: type("UNet2DOutput", (), {"sample": o})(), lambda o: (o,), lambda o: {"sample": o})
    for scale in (1.0, 2.5):
        plain = classifier_free_guidance(toy_conditional, y, scale, 3)(x, t)
        for wrap in wraps:
            out = classifier_free_guidance(lambda x, t, y: wrap(toy_conditional(x, t, y)), y, scale, 3)(x, t)
            assert isinstance(out, torch.Tensor) and torch.equal(out, plain)
    xs, ts, labels = random_points(6, 4)
    plain = classifier_guidance(mixture.unconditional_model, mixture.logits, labels, 1.5, mixture.abar)(xs, ts)
    for wrap in wraps:
        inner = lambda x, t: wrap(mixture.unconditional_model(x, t))  # noqa: E731
        out = classifier_guidance(inner, mixture.logits, labels, 1.5, mixture.abar)(xs, ts)
        assert torch.equal(out, plain)


def test_cfg_repeats_per_sample_model_kwargs():
    seen = {}

    def model(x, t, y, low_res, flag):
        seen.update(low_res=low_res, flag=flag)
        return x * low_res
    x, low_res = torch.randn(3, 2), torch.randn(3, 2)
    out = classifier_free_guidance(model, torch.tensor([0, 1, 0]), 2.0, 2)(x, torch.zeros(3, dtype=torch.int64),
                                                                           low_res=low_res, flag="keep")
    assert torch.equal(seen["low_res"], torch.cat([low_res, low_res])) and seen["flag"] == "keep"
    torch.testing.assert_close(out, x * low_res)


def tiny_unet(learn_sigma: bool) -> UNet:
    torch.manual_seed(0)
    cfg = UNetConfig(in_channels=2, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                     attention_resolutions=(4,), image_size=8, dropout=0.0, learn_sigma=learn_sigma,
                     num_heads=2, num_classes=3, norm_groups=8)
    model = UNet(cfg).eval()
    with torch.no_grad():  # a fresh U-Net outputs exactly 0 (zero-initialized output layers): randomize
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_cfg_on_a_unet_one_pass_equals_two_passes(learn_sigma):
    model = tiny_unet(learn_sigma)
    batches = []
    model.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 8, 8, generator=g)
    t = torch.tensor([5, 500, 999])
    y = torch.tensor([0, 2, 1])
    with torch.no_grad():
        cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, 3))
        batches.clear()
        out = classifier_free_guidance(model, y, 2.5)(x, t)  # null_class from the model
    assert batches == [6]
    assert out.shape == cond.shape and uncond.abs().max() > 0.1 and (cond - uncond).abs().max() > 0.01
    torch.testing.assert_close(out[:, :2], uncond[:, :2] + 2.5 * (cond[:, :2] - uncond[:, :2]), rtol=1e-5, atol=1e-5)
    if learn_sigma:  # the variance channels come from the conditional half
        torch.testing.assert_close(out[:, 2:], cond[:, 2:], rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # exactly: the halves of one doubled pass, combined
        both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 3)]))
    assert torch.equal(out[:, :2], torch.lerp(both[3:, :2], both[:3, :2], 2.5))
    assert torch.equal(out[:, 2:], both[:3, 2:])
    # and it runs inside the samplers (which check the 2C-channel output against the variance type)
    diffusion = GaussianDiffusion(make_schedule("cosine", 50), "eps", "learned_range" if learn_sigma else "fixed_small")
    guided = classifier_free_guidance(model, y, 2.5)
    for result in (ddim_sample(guided, diffusion, (3, 2, 8, 8), steps=4, seed=0, progress=False),
                   ddpm_sample(guided, diffusion, (3, 2, 8, 8), steps=4, seed=0, progress=False)):
        assert result.sample.shape == (3, 2, 8, 8) and torch.isfinite(result.sample).all()


def test_cfg_scale_above_one_lowers_class_overlap(linear, mixture):
    """Samples of class 0 at scale 1 follow N(mu_0, S_0) (the exact conditional model); their overlap with
    class 1 (mean clean posterior p(1 | x0)) matches the same quantity on exact draws; scale 3 lowers it."""
    d = GaussianDiffusion(linear, "eps")
    n = 4000
    y = torch.zeros(n, dtype=torch.int64)
    samples = {s: ddim_sample(classifier_free_guidance(mixture.conditional_model, y, s, 2), d, (n, 2), steps=100,
                              seed=7, dtype=F64, progress=False).sample for s in (1.0, 3.0)}
    assert_matches_gaussian(samples[1.0], mixture.means[0], mixture.covs[0])
    overlap = {s: float(mixture.clean_posterior(x)[:, 1].mean()) for s, x in samples.items()}
    exact_draws = mixture.components[0].sample(200_000, torch.Generator().manual_seed(3))
    expected = mixture.clean_posterior(exact_draws)[:, 1]
    assert abs(overlap[1.0] - float(expected.mean())) < 4.5 * float(expected.std()) / math.sqrt(n)
    assert overlap[3.0] < 0.5 * overlap[1.0], overlap
    direction = mixture.means[1] - mixture.means[0]
    assert float((samples[3.0] @ direction).mean()) < float((samples[1.0] @ direction).mean()) - 0.1


# -------------------------------------------------------------------------------------- classifier guidance
def test_classifier_guidance_with_the_exact_classifier_gives_the_conditional_eps(mixture):
    x, t, y = random_points(256, 1)
    guided = classifier_guidance(mixture.unconditional_model, mixture.logits, y, 1.0, mixture.abar)
    expected = torch.where(y[:, None] == 0, mixture.eps_cond(x, t, 0), mixture.eps_cond(x, t, 1))
    torch.testing.assert_close(guided(x, t), expected, rtol=1e-9, atol=1e-10)
    # the shift is not small: the unconditional eps is far from the answer
    assert (mixture.unconditional_model(x, t) - expected).abs().max() > 0.1
    # scale 0 leaves the model's output unchanged
    torch.testing.assert_close(classifier_guidance(mixture.unconditional_model, mixture.logits, y, 0.0,
                                                   mixture.abar)(x, t), mixture.unconditional_model(x, t))


@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_classifier_guidance_for_x0_and_v_predictions_with_learned_variance(mixture, prediction):
    """A model predicting x0 or v (plus 2 variance channels) is guided to the conditional x0 or v."""
    ptype = PredictionType.X0 if prediction == "x0" else PredictionType.V
    x, t, y = random_points(128, 2)
    a = mixture.abar[t][:, None]

    def as_prediction(eps):
        x0 = formulas.x0_from_eps(x, eps, a)
        return x0 if ptype == PredictionType.X0 else formulas.v_target(x0, eps, a)

    def model(x_in, t_in):
        return torch.cat([as_prediction(mixture.eps_uncond(x_in, t_in)), torch.sin(x_in)], dim=1)
    guided = classifier_guidance(model, mixture.logits, y, 1.0, mixture.abar, prediction_type=prediction)(x, t)
    eps_y = torch.where(y[:, None] == 0, mixture.eps_cond(x, t, 0), mixture.eps_cond(x, t, 1))
    torch.testing.assert_close(guided[:, :2], as_prediction(eps_y), rtol=1e-8, atol=1e-9)
    assert torch.equal(guided[:, 2:], torch.sin(x))


@pytest.mark.parametrize("scale", [0.0, 0.5, 1.0, 3.0])
def test_cfg_with_exact_models_equals_classifier_guidance_with_the_exact_classifier(mixture, scale):
    """eps_c - eps_u = -sqrt(1 - abar) grad log p(y | x_t), so both guidances agree at every scale."""
    x, t, y = random_points(128, 3)
    cfg = classifier_free_guidance(mixture.conditional_model, y, scale, 2)(x, t)
    cg = classifier_guidance(mixture.unconditional_model, mixture.logits, y, scale, mixture.abar)(x, t)
    torch.testing.assert_close(cfg, cg, rtol=1e-8, atol=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_classifier_guided_sampling_recovers_each_class(linear, mixture, sampler):
    """Guiding the exact unconditional model with the exact classifier at scale 1 samples p(x0 | y)."""
    d = GaussianDiffusion(linear, "eps")
    n = 3000
    y = torch.arange(2 * n) % 2
    guided = classifier_guidance(mixture.unconditional_model, mixture.logits, y, 1.0, linear.alphas_cumprod)
    if sampler == "ddim":
        x = ddim_sample(guided, d, (2 * n, 2), steps=250, skip_type="even", seed=11, dtype=F64, progress=False).sample
    else:
        x = ddpm_sample(guided, d, (2 * n, 2), seed=12, dtype=F64, progress=False).sample
    for k in range(2):
        assert_matches_gaussian(x[y == k], mixture.means[k], mixture.covs[k])


def test_no_host_device_sync_when_called(monkeypatch):
    """The wrappers read no tensor value back to the host when called (only at construction)."""
    weight = torch.randn(2, 3, dtype=F64)
    guided = [classifier_free_guidance(lambda x, t, y: x * (y[:, None] + 1), torch.tensor([0, 1, 1, 0]), 2.0, 2),
              classifier_guidance(lambda x, t: 0.5 * x, lambda x, t: torch.sin(x @ weight), torch.tensor([0, 2, 1, 1]),
                                  torch.tensor([1.0, 2.0, 0.0, 0.5]), make_schedule("linear", 100).alphas_cumprod)]

    def forbid(*args, **kwargs):
        raise AssertionError("a tensor value was read on the host")
    x, t = torch.randn(4, 2, dtype=F64), torch.tensor([0, 10, 50, 99])
    expected = [g(x, t) for g in guided]
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbid)
    outs = [g(x, t) for g in guided]
    monkeypatch.undo()
    for out, ref in zip(outs, expected):
        assert torch.equal(out, ref)
    torch.testing.assert_close(expected[0], x * torch.tensor([-1.0, 1.0, 1.0, -1.0], dtype=F64)[:, None])


# ------------------------------------------------------------------------------------------- label dropout
def test_drop_labels_rate_and_determinism():
    n = 200_000
    y = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(0))
    for p in (0.1, 0.5):
        dropped = drop_labels(y, p, 10, torch.Generator().manual_seed(1))
        is_null = dropped == 10
        assert abs(float(is_null.double().mean()) - p) < 4.5 * math.sqrt(p * (1 - p) / n)
        assert torch.equal(dropped[~is_null], y[~is_null])  # the others are untouched
        assert torch.equal(dropped, drop_labels(y, p, 10, torch.Generator().manual_seed(1)))
    assert torch.equal(drop_labels(y, 0.0, 10), y)
    assert bool((drop_labels(y, 1.0, 10) == 10).all())
    assert drop_labels(y[:0], 0.5, 10).shape == (0,)


# ------------------------------------------------------------------------------------ noise-aware classifier
def stripes(n, generator):
    """8x8 images: class 0 bright on top and dark below, class 1 the reverse, plus pixel noise."""
    labels = torch.randint(0, 2, (n,), generator=generator)
    sign = (1 - 2 * labels).float().reshape(n, 1, 1, 1)
    rows = torch.cat([torch.full((4,), 0.6), torch.full((4,), -0.6)]).reshape(1, 1, 8, 1)
    return sign * rows.expand(n, 1, 8, 8) + 0.2 * torch.randn(n, 1, 8, 8, generator=generator), labels


@pytest.mark.slow  # multi-second end-to-end test: CI runs it with -m slow
def test_noisy_classifier_trains_and_guides():
    torch.manual_seed(0)
    schedule = make_schedule("cosine", 100)
    cfg = UNetConfig(in_channels=1, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                     attention_resolutions=(), image_size=8, dropout=0.0, num_classes=2, norm_groups=8)
    classifier = NoisyClassifier(cfg)
    g = torch.Generator().manual_seed(0)
    images, labels = stripes(2048, g)
    losses = train_noisy_classifier(classifier, images, labels, schedule.alphas_cumprod, steps=150, batch_size=64,
                                    lr=2e-3, weight_decay=0.0, seed=0, progress=False)
    assert losses.shape == (150,) and losses[-20:].mean() < 0.5 * losses[:20].mean()
    test_images, test_labels = stripes(512, g)
    t = torch.full((512,), 50)
    x_t = schedule.alphas_cumprod[50].sqrt().float() * test_images + \
        (1 - schedule.alphas_cumprod[50]).sqrt().float() * torch.randn(test_images.shape, generator=g)
    with torch.no_grad():
        accuracy = float((classifier(x_t, t).argmax(1) == test_labels).float().mean())
    assert accuracy > 0.9, accuracy
    # guiding a model that knows nothing of the classes (data ~ N(0, I): eps = sqrt(1 - abar) x) toward each class
    d = GaussianDiffusion(schedule, "eps")
    abar = schedule.alphas_cumprod

    def model(x, t_in):
        return (1 - formulas.per_sample(abar[t_in], x)).sqrt().to(x.dtype) * x
    y = torch.arange(64) % 2
    out = ddim_sample(classifier_guidance(model, classifier, y, 5.0, abar), d, (64, 1, 8, 8), steps=20, seed=1,
                      progress=False).sample
    top_minus_bottom = out[:, 0, :4].mean((1, 2)) - out[:, 0, 4:].mean((1, 2))
    assert float(((top_minus_bottom > 0) == (y == 0)).float().mean()) > 0.9


# ---------------------------------------------------------------------------------------------- bad inputs
def test_bad_inputs_give_clear_errors(mixture):
    y = torch.tensor([0, 1])
    model = mixture.conditional_model
    with pytest.raises(ValueError, match="scale: expected a finite float >= 0"):
        classifier_free_guidance(model, y, -0.5, 2)
    with pytest.raises(ValueError, match="scale: expected a finite float >= 0"):
        classifier_free_guidance(model, y, float("nan"), 2)
    with pytest.raises(ValueError, match="scale: expected finite values >= 0"):
        classifier_guidance(mixture.unconditional_model, mixture.logits, y, torch.tensor([1.0, -1.0]), mixture.abar)
    with pytest.raises(ValueError, match="scale: expected a float or one scale per label"):
        classifier_free_guidance(model, y, torch.ones(3), 2)
    with pytest.raises(TypeError, match="scale"):
        classifier_free_guidance(model, y, "3", 2)
    with pytest.raises(ValueError, match=r"y: expected labels in \[0, 2\] \(2 = the null class\), got values in "
                                         r"\[0, 3\]"):
        classifier_free_guidance(model, torch.tensor([0, 3]), 2.0, 2)
    with pytest.raises(ValueError, match="y: expected labels"):
        classifier_free_guidance(model, torch.tensor([-1, 0]), 2.0, 2)
    with pytest.raises(TypeError, match="y: expected an int64 tensor"):
        classifier_free_guidance(model, torch.tensor([0.0, 1.0]), 2.0, 2)
    with pytest.raises(ValueError, match="null_class: expected the null-class label"):
        classifier_free_guidance(model, y, 2.0)
    x, t = torch.randn(3, 2, dtype=F64), torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match=r"y: expected 3 labels \(one per sample of x\), got 2"):
        classifier_free_guidance(model, y, 2.0, 2)(x, t)
    with pytest.raises(ValueError, match="y: expected 3 labels"):
        classifier_guidance(mixture.unconditional_model, mixture.logits, y, 1.0, mixture.abar)(x, t)
    with pytest.raises(ValueError, match="model_kwargs: 'y' is set by the guidance wrapper"):
        classifier_free_guidance(model, y, 2.0, 2)(x[:2], t[:2], y=y)
    with pytest.raises(ValueError, match=r"model output: expected shape \(2, 2\) or \(2, 4\)"):
        classifier_free_guidance(lambda x, t, y: x[:, :1], y, 2.0, 2)(x[:2], t[:2])
    # classifier guidance: labels beyond the classifier's classes, known at construction or from the logits
    with pytest.raises(ValueError, match=r"y: expected labels in \[0, 1\] \(the classifier has 2 classes\)"):
        classifier_guidance(mixture.unconditional_model, NoisyClassifier(UNetConfig(
            in_channels=1, model_channels=8, channel_mult=(1,), num_res_blocks=1, attention_resolutions=(),
            image_size=4, num_classes=2, norm_groups=4)), torch.tensor([0, 2]), 1.0, mixture.abar)
    with pytest.raises(ValueError, match=r"y: expected labels in \[0, 1\] \(the classifier has 2 classes\), got a "
                                         r"label 5"):
        classifier_guidance(mixture.unconditional_model, mixture.logits, torch.tensor([0, 5]), 1.0,
                            mixture.abar)(x[:2], t[:2])
    with pytest.raises(ValueError, match=r"classifier output: expected logits \[B, K\]"):
        classifier_guidance(mixture.unconditional_model, lambda x, t: x.sum(1), y, 1.0, mixture.abar)(x[:2], t[:2])
    with pytest.raises(TypeError, match="alphas_cumprod: expected the 1-D float64"):
        classifier_guidance(mixture.unconditional_model, mixture.logits, y, 1.0, mixture.abar.float())
    with pytest.raises(ValueError, match="prediction_type"):
        classifier_guidance(mixture.unconditional_model, mixture.logits, y, 1.0, mixture.abar, prediction_type="x")
    with pytest.raises(ValueError, match=r"p: expected a probability in \[0, 1\]"):
        drop_labels(y, 1.5, 2)
    with pytest.raises(ValueError, match=r"y: expected labels in \[0, 2\]"):
        drop_labels(torch.tensor([0, 7]), 0.1, 2)
    with pytest.raises(TypeError, match="y: expected an int64 tensor"):
        drop_labels(torch.zeros(2, 2, dtype=torch.int64), 0.1, 2)
    with pytest.raises(ValueError, match="config: expected num_classes"):
        NoisyClassifier(UNetConfig(in_channels=1, model_channels=8, channel_mult=(1,), attention_resolutions=(),
                                   image_size=4, norm_groups=4))


def test_a_classifier_without_a_gradient_in_x_is_an_error():
    """A classifier whose logits do not depend on x_t (detached, or constant) would make guidance a silent no-op."""
    from diffcore.guidance import classifier_log_prob_grad

    x, t, y = torch.randn(3, 1, 4, 4), torch.tensor([1, 2, 3]), torch.tensor([0, 1, 0])
    for classifier in (lambda x, t: torch.zeros(x.shape[0], 2),
                       lambda x, t: x.detach().flatten(1)[:, :2]):
        with pytest.raises(ValueError, match="classifier: no gradient of its log-probabilities reaches x_t"):
            classifier_log_prob_grad(classifier, x, t, y)
    grad = classifier_log_prob_grad(lambda x, t: x.flatten(1)[:, :2], x, t, y)
    expected = torch.zeros_like(x).flatten(1)
    p = torch.softmax(x.flatten(1)[:, :2], dim=1)  # d/dz log softmax(z)[y] = onehot(y) - softmax(z)
    expected[:, :2] = torch.nn.functional.one_hot(y, 2).float() - p
    torch.testing.assert_close(grad, expected.view_as(x))
