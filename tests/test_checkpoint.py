"""Checkpoints: exact round trip, atomic writes, and clear errors for truncated/corrupted/mismatched ones."""
from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from diffcore import checkpoint as ck
from diffcore import outputs


def tiny_model(width: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, width), nn.SiLU(), nn.Linear(width, 2))


def trained_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 3)).square().mean().backward()
        opt.step()
    return opt


def write(tmp_path, name="ck"):
    model = tiny_model()
    opt = trained_optimizer(model)
    ema = {k: v * 0.5 for k, v in model.state_dict().items()}
    state = {"optimizer": opt.state_dict(), "rng": ck.capture_rng_state(), "history": torch.arange(6.0).view(2, 3),
             "misc": {"tuple": (1, 2.5, "x"), "none": None, "ints": {3: "three", 7: [1, 2]}}}
    path = ck.save_checkpoint(tmp_path / name, model=model.state_dict(), ema=ema, state=state,
                              config={"model": {"width": 4}, "lr": 0.01}, step=42)
    return path, model, opt, ema, state


def test_round_trip_is_exact(tmp_path):
    path, model, opt, ema, state = write(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # no temporary folder left
    loaded = ck.load_checkpoint(path)
    assert loaded.step == 42 and loaded.config == {"model": {"width": 4}, "lr": 0.01}
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model[key], value)
        assert torch.equal(loaded.ema[key], ema[key])
    assert torch.equal(loaded.state["history"], state["history"])
    assert loaded.state["misc"] == state["misc"]  # tuple, None, int-keyed dict restored as such
    # the optimizer restored into a fresh one continues identically
    model2 = tiny_model()
    ck.load_state_strict(model2, loaded.model)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    opt2.load_state_dict(loaded.state["optimizer"])
    x = torch.randn(5, 3)
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        m(x).square().mean().backward()
        o.step()
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_rng_state_round_trip(tmp_path):
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    state = ck.capture_rng_state()
    expected = (torch.rand(4), random.random(), np.random.rand())
    ck.save_checkpoint(tmp_path / "r", model={}, config={}, step=0, state={"rng": state})
    torch.rand(10), random.random(), np.random.rand(5)  # advance everything
    ck.restore_rng_state(ck.load_checkpoint(tmp_path / "r").state["rng"])
    assert torch.equal(torch.rand(4), expected[0])
    assert random.random() == expected[1] and np.random.rand() == expected[2]


def test_truncated_and_corrupted_files_are_refused(tmp_path):
    path, *_ = write(tmp_path)
    blob = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(blob[:-7])
    with pytest.raises(ck.CheckpointError, match="model.safetensors is truncated"):
        ck.load_checkpoint(path)
    corrupted = bytearray(blob)
    corrupted[-3] ^= 0x40  # one flipped bit in a weight
    (path / "model.safetensors").write_bytes(bytes(corrupted))
    with pytest.raises(ck.CheckpointError, match="model.safetensors is corrupted"):
        ck.load_checkpoint(path)
    with pytest.raises(ck.CheckpointError, match="corrupted"):
        ck.verify_checkpoint(path)
    (path / "model.safetensors").write_bytes(blob)
    ck.verify_checkpoint(path)
    (path / "state.json").unlink()
    with pytest.raises(ck.CheckpointError, match="state.json .* is missing"):
        ck.load_checkpoint(path)
    assert ck.load_checkpoint(path, load_state=False).step == 42  # sampling needs no training state
    (path / "manifest.json").unlink()
    with pytest.raises(ck.CheckpointError, match="no manifest.json"):
        ck.load_checkpoint(path)
    with pytest.raises(ck.CheckpointError, match="not a directory"):
        ck.load_checkpoint(tmp_path / "missing")


def test_mismatched_model_is_refused_without_partial_load():
    small, big = tiny_model(4), tiny_model(5)
    before = {k: v.clone() for k, v in big.state_dict().items()}
    with pytest.raises(ck.CheckpointError, match=r"shape mismatches .*0.weight: checkpoint \(4, 3\) vs model \(5, 3\)"):
        ck.load_state_strict(big, small.state_dict())
    for key, value in big.state_dict().items():
        assert torch.equal(value, before[key])  # nothing was loaded
    partial = {k: v for k, v in small.state_dict().items() if k != "2.bias"}
    partial["extra"] = torch.zeros(1)
    with pytest.raises(ck.CheckpointError, match=r"1 missing keys \(2.bias\); 1 unexpected keys \(extra\)"):
        ck.load_state_strict(tiny_model(4), partial)
    assert ck.config_differences({"a": 1, "m": {"w": 4, "k": [1, 2]}}, {"a": 1, "m": {"w": 5, "k": (1, 2)}}) == \
        ["m.w: 4 != 5"]


class ExplodingDict(dict):
    """A state dict whose iteration raises midway: simulates a crash while the checkpoint is being written."""

    def items(self):
        for i, item in enumerate(super().items()):
            if i == 2:
                raise RuntimeError("simulated crash mid-write")
            yield item


def test_atomic_write_leaves_nothing_partial(tmp_path, monkeypatch):
    path, model, *_ = write(tmp_path)
    original = (path / "manifest.json").read_text()
    # 1. crash while serializing: the existing checkpoint is untouched, no temporary folder remains
    with pytest.raises(RuntimeError, match="simulated crash"):
        ck.save_checkpoint(path, model=ExplodingDict(model.state_dict()), config={}, step=99,
                           overwrite=True)
    assert (path / "manifest.json").read_text() == original
    assert sorted(os.listdir(tmp_path)) == ["ck"]
    # 2. crash while writing the files to disk (after two files): same
    real = outputs.write_synced
    calls = []

    def failing(file, data):
        calls.append(file)
        if len(calls) == 3:
            real(file, data[: len(data) // 2])
            raise OSError("disk full (simulated)")
        real(file, data)

    monkeypatch.setattr(outputs, "write_synced", failing)
    with pytest.raises(OSError, match="disk full"):
        ck.save_checkpoint(tmp_path / "new", model=model.state_dict(), config={}, step=7)
    assert sorted(os.listdir(tmp_path)) == ["ck"]
    # 3. atomic_write_bytes: a failure leaves the old file and no temporary file
    target = tmp_path / "latest"
    target.write_text("old")
    calls.clear()
    monkeypatch.setattr(outputs, "write_synced", lambda file, data: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError, match="boom"):
        outputs.atomic_write_text(target, "new")
    assert target.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["ck", "latest"]


def test_folder_latest_and_keep_last(tmp_path):
    model = tiny_model()
    for step in (10, 20, 30):
        ck.save_to_folder(tmp_path, step, keep_last=2, model=model.state_dict(), config={"s": step})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000020", "step_00000030"]
    assert ck.latest_checkpoint(tmp_path).name == "step_00000030"
    assert ck.resolve_checkpoint(tmp_path) == tmp_path / "step_00000030"
    assert ck.load_checkpoint(ck.resolve_checkpoint(tmp_path)).config == {"s": 30}
    # an interrupted earlier save leaves a .tmp folder: ignored by resolve, removed by the next save
    (tmp_path / ".tmp-step_00000040-0123456789ab").mkdir()
    (tmp_path / ".tmp-mine").mkdir()  # named like a leftover, but not as diffcore names them: kept
    assert ck.resolve_checkpoint(tmp_path).name == "step_00000030"
    ck.save_to_folder(tmp_path, 40, model=model.state_dict(), config={})
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == [".tmp-mine"]
    with pytest.raises(ck.CheckpointError, match="neither a checkpoint directory"):
        ck.resolve_checkpoint(tmp_path / "step_00000040" / "nothing")
    manifest = json.loads((tmp_path / "step_00000040" / "manifest.json").read_text())
    manifest["version"] = 99
    (tmp_path / "step_00000040" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ck.CheckpointError, match="version 99"):
        ck.load_checkpoint(tmp_path / "step_00000040")
