"""A diverging run never destroys its good checkpoints: non-finite steps are skipped without touching the state,
too many of them (or non-finite weights) stop the run with TrainingDiverged before anything non-finite is saved,
pruning keeps the last finite checkpoint, and resuming from it is bit-exact."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from diffcore import checkpoint as ck
from diffcore.data import ImageDataset, synthetic_images
from diffcore.train import TrainConfig, Trainer, TrainingDiverged
from diffcore.unet import UNet, UNetConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(out_dir, **overrides) -> TrainConfig:
    model = UNetConfig(in_channels=1, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                       attention_resolutions=(4,), image_size=8, dropout=0.0, learn_sigma=True, num_heads=1,
                       norm_groups=4)
    base = dict(data="synthetic", model=model, batch_size=8, total_steps=8, log_every=1, checkpoint_every=2,
                num_timesteps=4, timestep_sampler="loss-second-moment", progress=False, ema_rate=0.9,
                ema_warmup=True, keep_checkpoints=1, max_nonfinite_steps=2, out_dir=str(out_dir), lr=1e-3)
    base.update(overrides)
    return TrainConfig(**base)


def tiny_data() -> ImageDataset:
    images, labels = synthetic_images(48, 8, seed=0)
    return ImageDataset(images, labels)


class Poisonable(UNet):
    """A U-Net whose output turns NaN while ``poisoned`` (a bad batch, an overflow)."""

    poisoned = False

    def forward(self, x, t, **kwargs):
        out = super().forward(x, t, **kwargs)
        return out * math.nan if self.poisoned else out


def snapshot(trainer: Trainer) -> dict:
    trainer.ema.settle()
    return {"model": {k: v.clone() for k, v in trainer.model.state_dict().items()},
            "ema": {k: v.clone() for k, v in trainer.ema.state_dict().items()}, "ema_updates": trainer.ema.num_updates,
            "optimizer": {i: {k: v.clone() for k, v in state.items()}
                          for i, state in enumerate(trainer.optimizer.state.values())},
            "sampler": trainer.timestep_sampler.losses.copy()}


def assert_same(a: dict, b: dict) -> None:
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert a["ema_updates"] == b["ema_updates"]
    for i in a["optimizer"]:
        assert all(torch.equal(a["optimizer"][i][k], b["optimizer"][i][k]) for k in a["optimizer"][i])
    assert (a["sampler"] == b["sampler"]).all()


def test_non_finite_learning_rates_and_limits_are_refused(tmp_path):
    for name, value in (("lr", math.inf), ("lr", math.nan), ("weight_decay", math.nan), ("grad_clip", math.inf),
                        ("max_nonfinite_steps", -1)):
        with pytest.raises(ValueError, match=name):
            tiny_config(tmp_path, **{name: value})


def test_a_non_finite_step_is_skipped_without_touching_the_state(tmp_path):
    config = tiny_config(tmp_path, checkpoint_every=100)
    torch.manual_seed(config.seed)
    trainer = Trainer(config, model=Poisonable(config.model), dataset=tiny_data())
    for _ in range(3):
        trainer.train_step()
    before = snapshot(trainer)
    trainer.model.poisoned = True
    out = trainer.train_step()
    assert bool(out["nonfinite"]) and trainer.step == 4
    assert_same(before, snapshot(trainer))  # weights, moments, step counts, EMA and its warm-up count, history
    trainer.model.poisoned = False
    trainer.train_step()
    moved = snapshot(trainer)
    assert any(not torch.equal(moved["model"][k], before["model"][k]) for k in moved["model"])  # training goes on
    trainer.check_divergence(weights=True)  # one skipped step is within the limit


def test_too_many_skipped_steps_stop_the_run_and_keep_the_checkpoint(tmp_path):
    config = tiny_config(tmp_path)
    torch.manual_seed(config.seed)
    trainer = Trainer(config, model=Poisonable(config.model), dataset=tiny_data())
    trainer.train(max_steps=2)
    assert ck.latest_checkpoint(tmp_path / "checkpoints").name == "step_00000002"
    at_two = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.model.poisoned = True
    with pytest.raises(TrainingDiverged, match=r"3 consecutive steps had a non-finite loss or gradient .*"
                                               r"max_nonfinite_steps=2.*step_00000004, was kept"):
        trainer.train()
    # step 4 (2 skipped steps, within the limit) was saved: its weights are those of step 2, untouched
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest", "step_00000004"]
    kept = ck.load_checkpoint(tmp_path / "checkpoints" / "step_00000004")
    assert all(torch.equal(kept.model[k], at_two[k]) for k in kept.model)
    assert kept.state["nonfinite"] == {"run": 2, "total": 2}
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["nonfinite_steps"] for r in log] == [0, 0, 1, 1, 1] and log[-1]["loss"] is None


@pytest.mark.slow
def test_diverged_weights_are_never_saved_and_the_last_finite_checkpoint_resumes_exactly(tmp_path):
    # lr = inf from the 5th step on (the learning rate, not the gradient, blows the weights up): the checkpoint
    # due at step 6 is refused, pruning (keep 1) kept step 4, and resuming from it matches a straight run
    config = tiny_config(tmp_path / "diverged")
    trainer = Trainer(config, dataset=tiny_data())
    finite_lr = trainer.lr_at
    trainer.lr_at = lambda step: math.inf if step >= 4 else finite_lr(step)
    with pytest.raises(TrainingDiverged, match="training diverged at step 6: .* tensors hold NaN or infinity"):
        trainer.train()
    folder = tmp_path / "diverged" / "checkpoints"
    assert sorted(os.listdir(folder)) == ["latest", "step_00000004"]
    kept = ck.load_checkpoint(ck.resolve_checkpoint(folder))
    assert not ck.nonfinite_tensors(kept.model) and not ck.nonfinite_tensors(kept.ema)
    del trainer

    torch.manual_seed(99)  # the global RNG state at restart must not matter
    resumed = Trainer(config, dataset=tiny_data())
    assert resumed.step == 4
    resumed.train()
    straight = Trainer(tiny_config(tmp_path / "straight"), dataset=tiny_data())
    straight.train()
    assert resumed.step == straight.step == 8
    for a, b in ((resumed.model, straight.model), (resumed.ema.ema_model, straight.ema.ema_model)):
        for (key, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), key


def test_a_folder_refuses_non_finite_states(tmp_path):
    good = {"w": torch.ones(2)}
    ck.save_to_folder(tmp_path, 1, keep_last=1, model=good, config={})
    for model, ema in (({"w": torch.tensor([1.0, math.nan])}, None), (good, {"w": torch.tensor([math.inf, 0.0])})):
        with pytest.raises(ck.CheckpointError, match="hold NaN or infinity"):
            ck.save_to_folder(tmp_path, 2, keep_last=1, model=model, ema=ema, config={})
        assert sorted(os.listdir(tmp_path)) == ["latest", "step_00000001"]
