"""Training: importance sampling and EMA against hand computations, config round trip, exact resume, gradient
accumulation and DDP (two gloo processes) against a single process on the combined batch."""
from __future__ import annotations

import json
import math
import os
import socket

import numpy as np
import pytest
import torch
from torch import nn

from diffcore import checkpoint as ck
from diffcore.data import ImageDataset, synthetic_images
from diffcore.train import EMA, LossSecondMomentSampler, TrainConfig, Trainer, UniformSampler
from diffcore.unet import UNetConfig


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_unet(**overrides) -> UNetConfig:
    base = dict(in_channels=1, model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
                image_size=8, dropout=0.0, learn_sigma=True, num_heads=1, norm_groups=4)
    base.update(overrides)
    return UNetConfig(**base)


def tiny_config(out_dir, **overrides) -> TrainConfig:
    base = dict(data="synthetic", model=tiny_unet(), batch_size=8, total_steps=4, log_every=2, checkpoint_every=100,
                num_timesteps=4, timestep_sampler="loss-second-moment", progress=False, ema_rate=0.9,
                out_dir=str(out_dir), lr=1e-3, bf16=False)  # exact comparisons: fp32 on every CPU
    base.update(overrides)
    return TrainConfig(**base)


def tiny_data(n: int = 48) -> ImageDataset:
    images, labels = synthetic_images(n, 8, seed=0)
    return ImageDataset(images, labels, hflip=True)


# ------------------------------------------------------------------------------------------------ samplers, EMA
def test_loss_second_moment_probabilities_by_hand():
    sampler = LossSecondMomentSampler(4, history=2, uniform_prob=0.1)
    history = {0: [1.0, 3.0, 5.0], 1: [2.0, 2.0], 2: [0.5, 1.5], 3: [4.0]}
    for t, losses in history.items():
        for loss in losses:
            assert sampler.uniform_now()  # warm-up: not every t has 2 losses yet
            torch.testing.assert_close(sampler.probabilities(), torch.full((4,), 0.25, dtype=torch.float64))
            sampler.update(torch.tensor([t]), torch.tensor([loss]))
    assert sampler.uniform_now()  # t = 3 has one loss only
    t, w = sampler.sample(16, torch.Generator().manual_seed(0))
    assert torch.equal(w, torch.ones(16))
    sampler.update(torch.tensor([3, 3]), torch.tensor([6.0, 8.0]))  # batch order: 4 is dropped, then 6
    assert not sampler.uniform_now()
    # hand computation: the last two losses per t are [3, 5], [2, 2], [0.5, 1.5], [6, 8]
    rms = np.array([math.sqrt((9 + 25) / 2), 2.0, math.sqrt((0.25 + 2.25) / 2), math.sqrt((36 + 64) / 2)])
    expected = 0.9 * rms / rms.sum() + 0.1 / 4
    probs = sampler.probabilities()
    np.testing.assert_allclose(probs.numpy(), expected, rtol=1e-12)
    t, w = sampler.sample(20000, torch.Generator().manual_seed(1))
    np.testing.assert_allclose(w.numpy(), 1.0 / (4 * expected[t.numpy()]), rtol=1e-6)
    frequencies = np.bincount(t.numpy(), minlength=4) / 20000
    np.testing.assert_allclose(frequencies, expected, atol=4 * math.sqrt(0.25 / 20000))
    # importance weights make the weighted mean loss unbiased for the uniform average
    mean_sq = (rms**2)
    assert abs(float((w.double() * torch.from_numpy(mean_sq)[t]).mean()) - mean_sq.mean()) < 0.05 * mean_sq.mean()
    # state round trip
    other = LossSecondMomentSampler(4, history=2, uniform_prob=0.1)
    other.load_state_dict(sampler.state_dict())
    torch.testing.assert_close(other.probabilities(), probs)
    with pytest.raises(ValueError, match="T=4"):
        LossSecondMomentSampler(5).load_state_dict(sampler.state_dict())


def test_uniform_sampler():
    t, w = UniformSampler(10).sample(5000, torch.Generator().manual_seed(0))
    assert t.dtype == torch.int64 and int(t.min()) == 0 and int(t.max()) == 9 and torch.equal(w, torch.ones(5000))


def test_ema_closed_form():
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -2.0]]))
    ema = EMA(model, rate=0.9)
    values = []
    for k in range(1, 8):
        value = torch.tensor([[float(k), 0.5 * k * k]])
        with torch.no_grad():
            model.weight.copy_(value)
        ema.update(model)
        values.append(value.double())
    n, r = len(values), 0.9
    expected = r**n * torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    expected = expected + sum((1 - r) * r ** (n - k) * v for k, v in enumerate(values, start=1))
    torch.testing.assert_close(ema.ema_model.weight.double(), expected, rtol=1e-6, atol=1e-6)
    assert ema.num_updates == 7 and not ema.ema_model.weight.requires_grad


def test_ema_warmup_follows_the_ramped_decay_and_forgets_the_initial_weights():
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(100.0)  # the initial weights, which a short run's EMA should forget
    ema = EMA(model, rate=0.999, warmup=True)
    expected = 100.0
    for n in range(200):
        decay = min(0.999, (1 + n) / (10 + n))
        assert ema.decay() == pytest.approx(decay)
        with torch.no_grad():
            model.weight.fill_(1.0)
        ema.update(model)
        expected = decay * expected + (1 - decay) * 1.0
    assert float(ema.ema_model.weight) == pytest.approx(expected, rel=1e-5)
    # the share of the initialization is prod (1 + n) / (10 + n) = 9! * 200! / 209! < 1e-12, against
    # 0.999^200 = 0.82 without the warm-up
    assert float(ema.ema_model.weight) == pytest.approx(1.0, abs=1e-6)
    plain = EMA(nn.Linear(1, 1, bias=False).requires_grad_(False), rate=0.999)
    assert plain.decay() == 0.999


def test_train_config_rejects_a_non_bool_ema_warmup():
    with pytest.raises(ValueError, match="ema_warmup: expected True or False"):
        TrainConfig(ema_warmup="yes")


# ------------------------------------------------------------------------------------------------ config
def test_config_round_trip_and_errors(tmp_path):
    config = tiny_config(tmp_path, adam_betas=(0.8, 0.99), grad_clip=None)
    again = TrainConfig.from_json(config.to_json())
    assert again == config and isinstance(again.model, UNetConfig) and again.adam_betas == (0.8, 0.99)
    assert json.loads(config.to_json())["model"]["channel_mult"] == [1, 2]
    with pytest.raises(ValueError, match="learn_sigma"):
        tiny_config(tmp_path, variance_type="fixed_small")
    with pytest.raises(ValueError, match="timestep_sampler"):
        tiny_config(tmp_path, timestep_sampler="importance")
    with pytest.raises(ValueError, match="unknown TrainConfig keys"):
        TrainConfig.from_dict({"batchsize": 3})
    with pytest.raises(ValueError, match="micro_batch_size"):
        Trainer(tiny_config(tmp_path, micro_batch_size=3), dataset=tiny_data())
    with pytest.raises(ValueError, match="1-channel images, the data set has 3"):
        Trainer(tiny_config(tmp_path), dataset=ImageDataset(synthetic_images(16, 8, channels=3)[0]))


def test_lr_warmup_and_log_quarters(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, warmup_steps=4, num_timesteps=8), dataset=tiny_data())
    assert [trainer.lr_at(s) for s in range(5)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])
    trainer._reset_meters()
    trainer._accumulate({"t": torch.tensor([0, 1, 2, 7, 7]), "loss": torch.tensor([1.0, 3.0, 10.0, 4.0, 8.0]),
                         "mse": torch.tensor([1.0, 1, 1, 1, 1]), "vb": torch.tensor([0.0, 0, 0, 0, 5]),
                         "grad_norm": torch.tensor(2.0), "nonfinite": torch.tensor(False)})
    trainer.step = 1
    record = trainer._log_record()
    assert record["loss"] == pytest.approx(26 / 5) and record["vb"] == pytest.approx(1.0)
    # quarters of T = 8: t in {0, 1} -> q0, {2, 3} -> q1, {6, 7} -> q3, none in q2
    assert (record["loss_q0"], record["loss_q1"], record["loss_q2"], record["loss_q3"]) == (2.0, 10.0, None, 6.0)
    assert record["grad_norm"] == 2.0 and record["lr"] == pytest.approx(2.5e-4) and record["nonfinite_steps"] == 0


# ------------------------------------------------------------------------------------------------ resume
def assert_same_state(a: dict, b: dict, exact: bool = True) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.slow  # multi-second end-to-end test: CI runs it with -m slow
def test_resume_is_exact(tmp_path):
    # dropout, class conditioning with label dropout, flips, accumulation, warm-up, clipping, importance sampling
    overrides = dict(model=tiny_unet(dropout=0.1, num_classes=4), micro_batch_size=4, warmup_steps=3, grad_clip=0.5,
                     total_steps=12, log_every=3, checkpoint_every=3, class_dropout=0.3, sample_every=6)
    straight = Trainer(tiny_config(tmp_path / "straight", **overrides), dataset=tiny_data())
    straight_records = straight.train()
    assert not straight.timestep_sampler.uniform_now()  # the importance sampler warmed up (T = 4)

    first = Trainer(tiny_config(tmp_path / "resumed", **overrides), dataset=tiny_data())
    first.train(max_steps=7)  # stops between checkpoints: the final save covers step 7
    assert ck.latest_checkpoint(tmp_path / "resumed" / "checkpoints").name == "step_00000007"
    del first
    torch.manual_seed(1234)  # the global RNG state at restart must not matter
    second = Trainer(tiny_config(tmp_path / "resumed", **overrides), dataset=tiny_data())
    assert second.step == 7
    second.train()
    assert second.step == 12
    assert_same_state(straight.model.state_dict(), second.model.state_dict())
    assert_same_state(straight.ema.state_dict(), second.ema.state_dict())
    for p_straight, p_second in zip(straight.optimizer.state.values(), second.optimizer.state.values()):
        assert_same_state(p_straight, p_second)
    np.testing.assert_array_equal(straight.timestep_sampler.losses, second.timestep_sampler.losses)
    # the logged losses of the last interval agree too
    resumed_log = [json.loads(line) for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed_log] == [3, 6, 7, 9, 12]
    assert resumed_log[-1]["loss"] == straight_records[-1]["loss"]
    # EMA sample grids (which must not disturb the training RNGs): 16 images of 8x8 with 2px padding, 4 x 4
    from PIL import Image

    for run in ("straight", "resumed"):
        assert sorted(p.name for p in (tmp_path / run / "samples").iterdir()) == ["step_00000006.png",
                                                                                  "step_00000012.png"]
    with Image.open(tmp_path / "resumed" / "samples" / "step_00000012.png") as grid:
        assert grid.size == (42, 42)
        straight_grid = Image.open(tmp_path / "straight" / "samples" / "step_00000012.png")
        assert np.array_equal(np.asarray(grid), np.asarray(straight_grid))
    assert (tmp_path / "resumed" / "loss.png").is_file()


def test_resume_refuses_another_config(tmp_path):
    Trainer(tiny_config(tmp_path, total_steps=2), dataset=tiny_data()).train()
    # total_steps may change (continue training); lr may not
    assert Trainer(tiny_config(tmp_path, total_steps=3), dataset=tiny_data()).step == 2
    with pytest.raises(ck.CheckpointError, match=r"lr: 0.001 != 0.002"):
        Trainer(tiny_config(tmp_path, lr=2e-3), dataset=tiny_data())
    with pytest.raises(ck.CheckpointError, match="model.model_channels"):
        Trainer(tiny_config(tmp_path, model=tiny_unet(model_channels=12)), dataset=tiny_data())


def test_sigint_stops_after_the_step_with_a_checkpoint(tmp_path):
    import signal

    trainer = Trainer(tiny_config(tmp_path, total_steps=50, checkpoint_every=40), dataset=tiny_data())
    step = trainer.train_step

    def interrupted_step():
        out = step()
        if trainer.step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C would; the handler only sets a flag
        return out

    trainer.train_step = interrupted_step
    trainer.train()
    assert trainer.step == 3 and ck.latest_checkpoint(tmp_path / "checkpoints").name == "step_00000003"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler was restored


def test_gradient_accumulation_matches_full_batch(tmp_path):
    full = Trainer(tiny_config(tmp_path / "a", total_steps=3), dataset=tiny_data())
    full.train()
    accumulated = Trainer(tiny_config(tmp_path / "b", total_steps=3, micro_batch_size=2), dataset=tiny_data())
    accumulated.train()
    assert_same_state(full.model.state_dict(), accumulated.model.state_dict(), exact=False)


# ------------------------------------------------------------------------------------------------ DDP
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    try:
        trainer = Trainer(tiny_config(out_dir, total_steps=3, micro_batch_size=2), dataset=tiny_data())
        assert trainer.world_size == world and trainer.local_batch == 4
        trainer.train()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_gloo_processes_match_one_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path / "ddp")), nprocs=2, join=True)
    single = Trainer(tiny_config(tmp_path / "single", total_steps=3), dataset=tiny_data())
    single.train()
    loaded = ck.load_checkpoint(ck.resolve_checkpoint(tmp_path / "ddp" / "checkpoints"))
    assert loaded.step == 3 and len(loaded.state["rng_per_rank"]) == 2
    assert_same_state(loaded.model, single.model.state_dict(), exact=False)
    assert_same_state(loaded.ema, single.ema.state_dict(), exact=False)
    # the importance sampler saw the same losses in the same order on both
    np.testing.assert_allclose(loaded.state["timestep_sampler"]["losses"].numpy(), single.timestep_sampler.losses,
                               rtol=1e-5)
    # not vacuous: three steps moved the weights well beyond the tolerance
    initial = Trainer(tiny_config(tmp_path / "init"), dataset=tiny_data(), resume=False).model.state_dict()
    assert max(float((loaded.model[k] - initial[k]).abs().max()) for k in initial) > 1e-3


def test_resume_treats_fields_added_later_as_their_defaults():
    from diffcore.train.trainer import resume_differences

    config = TrainConfig(total_steps=10)
    older = config.to_dict()
    del older["ema_warmup"]  # a checkpoint written before the field existed
    assert resume_differences(older, config, version=1) == []
    assert resume_differences(older, config.replace(ema_warmup=True), version=1) != []
    changed = dict(older, lr=1.0)
    assert any("lr" in d for d in resume_differences(changed, config, version=1))
    assert resume_differences(dict(older, total_steps=99), config, version=1) == []  # resumable change
    assert "not a valid TrainConfig" in resume_differences(dict(older, bogus=1), config, version=1)[0]
    # a field of the first format may not be absent, whatever the version
    del older["num_timesteps"]
    assert "lacks 'num_timesteps'" in resume_differences(older, config, version=1)[0]
