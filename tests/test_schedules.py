"""Schedules and respacing against closed forms and the reference implementations' semantics."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffcore.respace import ddim_timesteps, resolve_timesteps, respace_schedule, space_timesteps
from diffcore.schedules import (NoiseSchedule, cosine_betas, make_schedule, named_betas, rescale_zero_terminal_snr)


# ----------------------------------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("T", [1000, 250, 4000])
def test_linear_betas_closed_form_and_scale(T):
    schedule = make_schedule("linear", T)
    scale = 1000 / T
    i = np.arange(T)
    expected = scale * 1e-4 + i * (scale * 0.02 - scale * 1e-4) / (T - 1)
    np.testing.assert_allclose(schedule.betas.numpy(), expected, rtol=1e-12, atol=0)
    np.testing.assert_allclose(schedule.alphas_cumprod.numpy(), np.cumprod(1 - expected), rtol=1e-12)
    assert schedule.betas.dtype == torch.float64 and schedule.alphas_cumprod.dtype == torch.float64


def test_linear_T1000_known_terminal_alpha_bar():
    # DDPM's schedule ends at abar_T = exp(sum log(1 - beta)) ~ 4.04e-5 (a well-known value)
    abar = make_schedule("linear", 1000).alphas_cumprod
    assert abar[-1].item() == pytest.approx(4.035e-5, rel=2e-3)
    assert abar[0].item() == pytest.approx(1 - 1e-4, abs=1e-15)


@pytest.mark.parametrize("T", [1000, 100])
def test_cosine_alpha_bar_telescopes_to_closed_form(T):
    schedule = make_schedule("cosine", T)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    raw = [1 - f((i + 1) / T) / f(i / T) for i in range(T)]
    clipped = [r > 0.999 for r in raw]
    first_clipped = clipped.index(True)
    assert all(clipped[first_clipped:]), "only the last betas are clipped"
    assert first_clipped == T - 1  # with s = 0.008 only the very last step exceeds 0.999
    # unclipped: abar_t = f((t+1)/T) / f(0) exactly (the product telescopes)
    expected = np.array([f((i + 1) / T) / f(0) for i in range(first_clipped)])
    np.testing.assert_allclose(schedule.alphas_cumprod[:first_clipped].numpy(), expected, rtol=1e-11)
    assert schedule.betas[-1].item() == 0.999
    assert schedule.betas.max().item() == 0.999


def test_cosine_max_beta_option():
    betas = cosine_betas(50, max_beta=0.5)
    assert betas.max().item() == 0.5 and (betas[:-5] < 0.5).all()


def test_scaled_linear_is_linear_in_sqrt_beta():
    b = make_schedule("scaled_linear", 1000).betas.sqrt().numpy()
    np.testing.assert_allclose(np.diff(b), (math.sqrt(0.012) - math.sqrt(0.00085)) / 999, rtol=1e-9)
    assert b[0] ** 2 == pytest.approx(0.00085, rel=1e-14) and b[-1] ** 2 == pytest.approx(0.012, rel=1e-14)


def test_sigmoid_betas_are_a_scaled_logistic_of_linspace():
    betas = make_schedule("sigmoid", 300).betas
    frac = (betas - 1e-4) / (0.02 - 1e-4)
    logits = torch.log(frac / (1 - frac))
    np.testing.assert_allclose(logits.numpy(), np.linspace(-6, 6, 300), atol=1e-9)


def test_betas_given_directly_and_derived_tables():
    betas = [0.1, 0.2, 0.3, 0.5]
    s = NoiseSchedule.from_betas(betas)
    abar = [0.9, 0.9 * 0.8, 0.9 * 0.8 * 0.7, 0.9 * 0.8 * 0.7 * 0.5]
    np.testing.assert_allclose(s.alphas_cumprod.numpy(), abar, rtol=1e-15)
    np.testing.assert_allclose(s.alphas_cumprod_prev.numpy(), [1.0] + abar[:-1], rtol=1e-15)
    expected_post = [b * (1 - ap) / (1 - a) for b, a, ap in zip(betas, abar, [1.0] + abar[:-1])]
    np.testing.assert_allclose(s.posterior_variance.numpy(), expected_post, rtol=1e-14)
    assert s.posterior_variance[0].item() == 0.0
    np.testing.assert_allclose(s.snr.numpy(), [a / (1 - a) for a in abar], rtol=1e-14)
    assert s.num_timesteps == 4 and not s.has_zero_terminal_snr


def test_from_alphas_cumprod_round_trips_betas():
    base = make_schedule("cosine", 64)
    again = NoiseSchedule.from_alphas_cumprod(base.alphas_cumprod)
    assert torch.equal(again.alphas_cumprod, base.alphas_cumprod)
    np.testing.assert_allclose(again.betas.numpy(), base.betas.numpy(), rtol=1e-9)


@pytest.mark.parametrize("name", ["linear", "cosine", "scaled_linear"])
def test_zero_terminal_snr_rescaling(name):
    base = make_schedule(name, 1000)
    z = make_schedule(name, 1000, rescale_to_zero_terminal_snr=True)
    assert z.alphas_cumprod[-1].item() == 0.0 and z.betas[-1].item() == 1.0 and z.has_zero_terminal_snr
    # Lin et al.: sqrt(abar) is an affine function of the original with the first value kept
    old, new = base.alphas_cumprod.sqrt(), z.alphas_cumprod.sqrt()
    assert new[0].item() == pytest.approx(old[0].item(), rel=1e-14)
    slope = (new[0] - new[-1]) / (old[0] - old[-1])
    np.testing.assert_allclose(new.numpy(), (slope * (old - old[-1])).numpy(), atol=1e-14)
    np.testing.assert_allclose(torch.cumprod(1 - z.betas, 0).numpy(), z.alphas_cumprod.numpy(), atol=1e-14)
    assert "zero_snr" in z.name


def test_to_moves_once_and_is_identity_on_same_device():
    s = make_schedule("cosine", 10)
    assert s.to("cpu") is s
    moved = s.to("meta")
    assert moved.betas.device.type == "meta" and moved.alphas_cumprod.device.type == "meta"
    assert s.betas.device.type == "cpu" and moved.num_timesteps == 10


def test_schedule_errors_are_clear():
    with pytest.raises(ValueError, match=r"schedule: expected one of 'linear', 'cosine'.*got 'cosin'"):
        make_schedule("cosin", 1000)
    with pytest.raises(ValueError, match="num_timesteps: expected an int >= 1"):
        make_schedule("linear", 0)
    with pytest.raises(ValueError, match="beta_end = 2 > 1 for T = 10"):
        make_schedule("linear", 10)
    with pytest.raises(ValueError, match=r"betas: expected values in \(0, 1\]"):
        NoiseSchedule.from_betas([0.1, -0.2])
    with pytest.raises(ValueError, match="only allowed at the last timestep"):
        NoiseSchedule.from_betas([1.0, 0.5])
    with pytest.raises(ValueError, match="1-D"):
        NoiseSchedule.from_betas([[0.1, 0.2]])
    with pytest.raises(TypeError, match="float64"):
        NoiseSchedule(betas=torch.ones(3), alphas_cumprod=torch.ones(3))
    with pytest.raises(TypeError, match="schedule 'cosine'"):
        named_betas("cosine", 10, beta_start=0.1)
    with pytest.raises(ValueError, match="at least 2"):
        rescale_zero_terminal_snr(torch.tensor([0.1], dtype=torch.float64))


# ----------------------------------------------------------------------------------------------------- respacing
def improved_diffusion_space_timesteps(num_timesteps, section_counts):
    """improved-diffusion/respace.py's space_timesteps, verbatim (MIT), as the oracle."""
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired_count = int(section_counts[len("ddim"):])
            for i in range(1, num_timesteps):
                if len(range(0, num_timesteps, i)) == desired_count:
                    return set(range(0, num_timesteps, i))
            raise ValueError(f"cannot create exactly {num_timesteps} steps with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx = 0
    all_steps = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(f"cannot divide section of {size} steps into {section_count}")
        if section_count <= 1:
            frac_stride = 1
        else:
            frac_stride = (size - 1) / (section_count - 1)
        cur_idx = 0.0
        taken_steps = []
        for _ in range(section_count):
            taken_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        all_steps += taken_steps
        start_idx += size
    return set(all_steps)


def test_ddim50_over_1000_is_stride_20():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert ddim_timesteps(1000, 50, "uniform") == list(range(0, 1000, 20))


def test_sections_10_15_20_over_300():
    kept = space_timesteps(300, "10,15,20")
    assert len(kept) == 45
    assert kept[:10] == [0, 11, 22, 33, 44, 55, 66, 77, 88, 99]  # section 0: stride 99/9 = 11
    assert kept[10] == 100 and kept[24] == 199 and kept[25] == 200 and kept[-1] == 299  # section ends included
    assert kept == sorted(improved_diffusion_space_timesteps(300, "10,15,20"))


@pytest.mark.parametrize("T,spec", [(1000, "250"), (1000, "ddim25"), (4000, "ddim100"), (1000, "10,15,20"),
                                    (301, "10,15,20"), (100, "100"), (1000, "50,0,3"), (17, "1,2,3")])
def test_space_timesteps_matches_improved_diffusion(T, spec):
    assert space_timesteps(T, spec) == sorted(improved_diffusion_space_timesteps(T, spec))


def test_quad_matches_ermongroup_ddim():
    for T, S in [(1000, 10), (1000, 50), (1000, 100), (500, 20)]:
        ermon = [int(s) for s in list(np.linspace(0, np.sqrt(T * 0.8), S) ** 2)]
        assert ddim_timesteps(T, S, "quad") == sorted(set(ermon))
    assert ddim_timesteps(1000, 10, "quad") == [0, 9, 39, 88, 158, 246, 355, 483, 632, 800]


def test_uniform_and_even_skip_types():
    assert ddim_timesteps(1000, 300, "uniform") == list(range(0, 1000, 3))  # ermongroup: 334 steps for S = 300
    even = ddim_timesteps(1000, 300, "even")
    assert len(even) == 300 and even[0] == 0 and even[-1] == 999
    assert resolve_timesteps(1000, 7) == list(range(0, 1000, 142))
    assert ddim_timesteps(1000, 5, "quad_full") == [0, 62, 250, 562, 999]  # round(999 (i/4)^2)
    assert ddim_timesteps(100, 30, "quad_full")[-3:] == [86, 92, 99]  # 99 (27/29)^2 = 85.8 and ddim_timesteps(10, 1, "quad_full") == [9]
    assert resolve_timesteps(10, [9, 0, 5]) == [0, 5, 9]
    assert resolve_timesteps(1000, "ddim10") == list(range(0, 1000, 100))


def test_respaced_schedule_keeps_alpha_bar_and_recomputes_betas():
    base = make_schedule("cosine", 1000)
    kept = space_timesteps(1000, "ddim50")
    respaced, timestep_map = respace_schedule(base, kept)
    assert torch.equal(respaced.alphas_cumprod, base.alphas_cumprod[kept])
    abar = base.alphas_cumprod.numpy()
    expected = [1 - abar[kept[0]]] + [1 - abar[b] / abar[a] for a, b in zip(kept[:-1], kept[1:])]
    np.testing.assert_allclose(respaced.betas.numpy(), expected, rtol=1e-12)
    assert timestep_map.dtype == torch.int64 and timestep_map.tolist() == kept


def test_respacing_errors_are_clear():
    with pytest.raises(ValueError, match="steps: expected at most the process's 1000 timesteps, got 1001"):
        ddim_timesteps(1000, 1001)
    with pytest.raises(ValueError, match="steps: expected at most"):
        space_timesteps(100, "ddim200")
    with pytest.raises(ValueError, match="no stride gives exactly 300 steps"):
        space_timesteps(1000, "ddim300")
    with pytest.raises(ValueError, match="comma-separated ints"):
        space_timesteps(1000, "fast")
    with pytest.raises(ValueError, match="section 0 has 100 timesteps, cannot keep 101"):
        space_timesteps(300, "101,1,1")
    with pytest.raises(ValueError, match="skip_type: expected one of 'uniform', 'quad', 'even'"):
        ddim_timesteps(1000, 10, "linear")
    with pytest.raises(ValueError, match=r"distinct timesteps in \[0, 10\)"):
        resolve_timesteps(10, [1, 1, 2])
    with pytest.raises(ValueError, match=r"distinct timesteps in \[0, 10\)"):
        resolve_timesteps(10, [3, 10])
    with pytest.raises(ValueError, match="steps: expected an int >= 1"):
        resolve_timesteps(10, 0)
