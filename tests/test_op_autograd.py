"""Gradients through the ops: the fused kernels' backward against finite differences and against the reference.

torch.autograd.gradcheck differentiates the fused forward numerically (float64), so it checks the backward
(which runs the reference under autograd) against the C++ kernels, independently of how the backward is built.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from diffcore import ops

from op_cases import make_table, timesteps

needs_fused = pytest.mark.skipif(not ops.fused_available("cpu"), reason="diffcore._C is not built")
IMPLS = [pytest.param("fused", marks=needs_fused), "reference"]
PREDICTIONS = ["eps", "x0", "v"]
VARIANCES = ["fixed_small", "fixed_large", "learned_range", "learned"]
SHAPE = (4, 2, 3)  # small: gradcheck costs one backward per output element


def _leaf(shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).requires_grad_(True)


def _gradcheck(fn, inputs):
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def _grads(fn, inputs, seed=7):
    """Gradients of a random projection of fn's outputs with respect to each input."""
    outputs = fn(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    g = torch.Generator().manual_seed(seed)
    total = sum((out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum() for out in outputs)
    return torch.autograd.grad(total, inputs, allow_unused=True)


def _agree(fused_fn, reference_fn, inputs):
    for a, b in zip(_grads(fused_fn, inputs), _grads(reference_fn, inputs)):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("impl", IMPLS)
def test_q_sample_gradcheck(impl):
    # abar_t must be large against the finite-difference step here: sqrt(abar) is too curved near T-1
    t, table = torch.tensor([0, 4, 11, 20]), make_table()
    x0, noise = _leaf(SHAPE, 0), _leaf(SHAPE, 1)
    table = table.clone().requires_grad_(True)
    _gradcheck(lambda a, n, tab: ops.q_sample(a, n, t, tab, impl=impl), (x0, noise, table))
    if impl == "fused":
        _agree(lambda a, n, tab: ops.q_sample(a, n, t, tab, impl="fused"),
               lambda a, n, tab: ops.q_sample(a, n, t, tab, impl="reference"), (x0, noise, table))


DDIM_CASES = [(p, clip, eta, given) for p, clip, (eta, given) in
              itertools.product(PREDICTIONS, [False, True], [(0.0, False), (0.7, True), (0.7, False)])]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("prediction_type,clip,eta,given_noise", DDIM_CASES)
def test_ddim_step_gradcheck(impl, prediction_type, clip, eta, given_noise):
    t, table = timesteps(SHAPE[0]), make_table()
    t_prev = torch.tensor([-1, 3, 30, 20])  # the final step, a forward step, an inversion step (t_prev > t)
    x, model_output = _leaf(SHAPE, 0), _leaf(SHAPE, 2, scale=0.5)
    inputs = (x, model_output) + ((_leaf(SHAPE, 3),) if given_noise else ())

    def step(impl):
        def run(x, model_output, noise=None):
            return ops.ddim_step(x, model_output, t, t_prev, table, eta, prediction_type=prediction_type,
                                 clip_denoised=clip, noise=noise, seed=5, offset=2, impl=impl)
        return run

    _gradcheck(step(impl), inputs)
    if impl == "fused":
        _agree(step("fused"), step("reference"), inputs)


DDPM_CASES = list(itertools.product(PREDICTIONS, VARIANCES, [False, True], [True, False]))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("prediction_type,variance_type,clip,given_noise", DDPM_CASES)
def test_ddpm_step_gradcheck(impl, prediction_type, variance_type, clip, given_noise):
    t, table = timesteps(SHAPE[0]), make_table()
    learned = variance_type.startswith("learned")
    x = _leaf(SHAPE, 0)
    model_output = _leaf((SHAPE[0], 2 * SHAPE[1] if learned else SHAPE[1], *SHAPE[2:]), 2, scale=0.5)
    if variance_type == "learned":  # a plausible log variance in the variance channels
        with torch.no_grad():
            model_output[:, SHAPE[1]:] -= 4.0
    inputs = (x, model_output) + ((_leaf(SHAPE, 3),) if given_noise else ())

    def step(impl):
        def run(x, model_output, noise=None):
            return ops.ddpm_step(x, model_output, t, table, prediction_type=prediction_type,
                                 variance_type=variance_type, clip_denoised=clip, noise=noise, seed=5, offset=2,
                                 impl=impl)
        return run

    _gradcheck(step(impl), inputs)
    if impl == "fused":
        _agree(step("fused"), step("reference"), inputs)


@needs_fused
def test_schedule_table_gradients_match_the_reference():
    t, table = timesteps(SHAPE[0]), make_table().requires_grad_(True)
    x, model_output = _leaf(SHAPE, 0), _leaf((SHAPE[0], 2 * SHAPE[1], *SHAPE[2:]), 2, scale=0.5)
    for impl_fn in [
        lambda impl: lambda x, m, tab: ops.ddim_step(x, m[:, :SHAPE[1]], t, t - 3, tab, 0.5, seed=1, impl=impl),
        lambda impl: lambda x, m, tab: ops.ddpm_step(x, m, t, tab, variance_type="learned_range", seed=1, impl=impl),
    ]:
        _agree(impl_fn("fused"), impl_fn("reference"), (x, model_output, table))


@needs_fused
def test_second_derivatives():
    """The backward is differentiable (create_graph=True), e.g. for a gradient penalty through a step."""
    t, table = timesteps(SHAPE[0]), make_table()
    x, model_output = _leaf(SHAPE, 0), _leaf((SHAPE[0], 2 * SHAPE[1], *SHAPE[2:]), 2, scale=0.5)
    noise = _leaf(SHAPE, 3).detach()
    fn = lambda x, m: ops.ddpm_step(x, m, t, table, variance_type="learned_range", noise=noise, impl="fused")
    assert torch.autograd.gradgradcheck(fn, (x, model_output), eps=1e-6, atol=1e-6, rtol=1e-5)


@needs_fused
def test_in_kernel_noise_gradient_uses_the_same_draw():
    """With noise drawn in the kernel, the variance channel's gradient is z * d sigma / d v for that very z."""
    t, table = torch.full((SHAPE[0],), 20), make_table()
    x = _leaf(SHAPE, 0).detach()
    model_output = _leaf((SHAPE[0], 2 * SHAPE[1], *SHAPE[2:]), 2, scale=0.5)
    x_prev, _ = ops.ddpm_step(x, model_output, t, table, variance_type="learned", seed=9, offset=4, impl="fused")
    (grad,) = torch.autograd.grad(x_prev.sum(), model_output)
    mean, _ = ops.ddpm_step(x, model_output.detach(), t, table, variance_type="learned",
                            noise=torch.zeros_like(x), impl="fused")
    sigma_z = x_prev.detach() - mean  # sigma z with sigma = exp(0.5 v): d/dv = 0.5 sigma z
    torch.testing.assert_close(grad[:, SHAPE[1]:], 0.5 * sigma_z, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("which", ["x0", "x_t", "noise", "alphas_cumprod"])
def test_hybrid_loss_refuses_gradients_it_does_not_compute(impl, which):
    table = make_table()
    t = timesteps(SHAPE[0])
    args = {"model_output": _leaf((SHAPE[0], 2 * SHAPE[1], *SHAPE[2:]), 0, scale=0.5),
            "x0": _leaf(SHAPE, 1).detach().clamp(-1, 1), "x_t": _leaf(SHAPE, 2).detach(),
            "noise": _leaf(SHAPE, 3).detach(), "t": t, "alphas_cumprod": table}
    args[which] = args[which].clone().requires_grad_(True)
    mse, vb = ops.hybrid_loss(**args, impl=impl)
    with pytest.raises(RuntimeError, match="x0, x_t, noise and alphas_cumprod get no gradient.*only model_output"):
        (mse + vb).sum().backward()
    # with the data detached, model_output gets its gradient
    args[which] = args[which].detach()
    mse, vb = ops.hybrid_loss(**args, impl=impl)
    (mse + vb).sum().backward()
    assert args["model_output"].grad is not None and torch.isfinite(args["model_output"].grad).all()


@needs_fused
def test_hybrid_loss_direct_op_refuses_data_gradients():
    table, t = make_table(), timesteps(SHAPE[0])
    model_output = _leaf((SHAPE[0], 2 * SHAPE[1], *SHAPE[2:]), 0, scale=0.5)
    x0 = _leaf(SHAPE, 1).detach().clamp(-1, 1).requires_grad_(True)
    x_t, noise = _leaf(SHAPE, 2).detach(), _leaf(SHAPE, 3).detach()
    mse, vb = torch.ops.diffcore.hybrid_loss(model_output, x0, x_t, noise, t, table, 0, 2)
    with pytest.raises(RuntimeError, match="get no gradient, by design"):
        mse.sum().backward()


@pytest.mark.slow
@needs_fused
def test_opcheck_autograd_registrations():
    table = make_table()
    t = timesteps(SHAPE[0])
    x = lambda seed: _leaf(SHAPE, seed).float().detach().requires_grad_(True)
    learned = _leaf((SHAPE[0], 2 * SHAPE[1], *SHAPE[2:]), 4, scale=0.5).float().detach().requires_grad_(True)
    cl = _leaf((4, 3, 5, 2), 5).float().detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    cases = [
        (torch.ops.diffcore.q_sample, (x(0), x(1), t, table)),
        (torch.ops.diffcore.ddim_step, (x(0), x(1), t, t - 1, table, 0.5, 0, True, None, 3, 1)),
        (torch.ops.diffcore.ddim_step, (cl, cl, torch.tensor([3, 9, 0, 39]), torch.tensor([1, 2, -1, 30]), table,
                                        0.0, 1, True, None, 0, 0)),
        (torch.ops.diffcore.ddpm_step, (x(0), learned, t, table, 0, 2, True, x(2), 3, 0)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)
