"""Checkpoints under faults and misuse: never replace what is not a checkpoint, survive kill -9 at every point of a
save or a replacement, survive a full disk, refuse manifests that name files outside the checkpoint, and refuse
configs that lack a field changing the model or the process."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from diffcore import checkpoint as ck
from diffcore import outputs
from diffcore.train import TrainConfig, config_from_checkpoint, export_model, load_trained_model
from diffcore.unet import UNet, UNetConfig


def weights(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((3,), float(value)), "b": torch.arange(2.0) + value}


def save(path, step: int, **kwargs):
    return ck.save_checkpoint(path, model=weights(step), config={"step": step}, step=step, **kwargs)


def assert_holds(path, step: int) -> None:
    loaded = ck.load_checkpoint(path)
    assert loaded.step == step and loaded.config == {"step": step}
    assert torch.equal(loaded.model["w"], weights(step)["w"])


def listing(folder) -> dict[str, list[str]]:
    """Every entry of ``folder`` with the names inside it (to show that nothing was touched)."""
    return {p.name: sorted(os.listdir(p)) if p.is_dir() else [p.read_bytes().hex()] for p in folder.iterdir()}


# ------------------------------------------------------------------------------------------------ item 1: targets
def test_save_refuses_what_is_not_a_checkpoint_and_touches_nothing(tmp_path):
    docs = tmp_path / "mydocs"
    docs.mkdir()
    (docs / "thesis.txt").write_text("years of work")
    (tmp_path / "notes.txt").write_text("a file")
    (tmp_path / "link").symlink_to(docs)
    fake = tmp_path / "fake"  # a manifest of another format
    fake.mkdir()
    (fake / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    before = listing(tmp_path)
    for name, why in (("mydocs", "is a folder, not a diffcore checkpoint"), ("notes.txt", "is a file, not a diffcore"),
                      ("link", "is a symbolic link"), ("fake", "is a folder, not a diffcore checkpoint")):
        for overwrite in (False, True):
            with pytest.raises(ck.CheckpointError, match=f"path: .*{name} exists and {why}"):
                save(tmp_path / name, 1, overwrite=overwrite)
            assert listing(tmp_path) == before  # nothing renamed, deleted or left behind
    # a checkpoint is replaced only with overwrite=True
    save(tmp_path / "ck", 1)
    before = listing(tmp_path)
    with pytest.raises(ck.CheckpointError, match="already holds a diffcore checkpoint; pass overwrite=True"):
        save(tmp_path / "ck", 2)
    assert listing(tmp_path) == before
    save(tmp_path / "ck", 2, overwrite=True)
    assert_holds(tmp_path / "ck", 2)
    assert sorted(os.listdir(tmp_path)) == sorted(before)  # no .tmp-/.old- left
    assert ck.is_checkpoint(tmp_path / "ck") and not ck.is_checkpoint(docs) and not ck.is_checkpoint(fake)


def tiny_train_config(tmp_path) -> TrainConfig:
    model = UNetConfig(in_channels=1, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                       attention_resolutions=(4,), image_size=8, learn_sigma=True, num_heads=1, norm_groups=4)
    return TrainConfig(data="synthetic", model=model, num_timesteps=4, out_dir=str(tmp_path / "run"))


def write_trained(path, config: TrainConfig, *, drop=(), version=None):
    torch.manual_seed(0)
    data = config.to_dict()
    for name in drop:
        *parents, leaf = name.split(".")
        node = data
        for parent in parents:
            node = node[parent]
        del node[leaf]
    ck.save_checkpoint(path, model=UNet(config.model).state_dict(), config=data, step=5)
    if version is not None:  # as an older diffcore wrote it
        manifest = json.loads((path / "manifest.json").read_text())
        manifest["version"] = version
        (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def test_export_refuses_a_foreign_target_and_overwrites_only_when_asked(tmp_path):
    source = write_trained(tmp_path / "source", tiny_train_config(tmp_path))
    docs = tmp_path / "mydocs"
    docs.mkdir()
    (docs / "a.txt").write_text("keep me")
    with pytest.raises(ck.CheckpointError, match="not a diffcore checkpoint"):
        export_model(source, docs, overwrite=True)
    assert sorted(os.listdir(docs)) == ["a.txt"] and (docs / "a.txt").read_text() == "keep me"
    out = export_model(source, tmp_path / "out")
    with pytest.raises(ck.CheckpointError, match="overwrite=True"):
        export_model(source, out)
    export_model(source, out, use_ema=False, overwrite=True)
    assert ck.load_checkpoint(out).state["ema"] is False


# ------------------------------------------------------------------------------------------ item 2: kill -9
CHILD = textwrap.dedent("""
    import os, shutil, signal, sys
    import torch
    from diffcore import checkpoint as ck
    from diffcore import outputs
    from diffcore.checkpoint import atomic_replace

    target, point, step = sys.argv[1], sys.argv[2], int(sys.argv[3])

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    real_write, real_exchange, real_rename = outputs.write_synced, atomic_replace.exchange_directories, os.rename
    if point == "mid-write":          # the third file of the new checkpoint is half written
        calls = []
        def write(file, data):
            calls.append(file)
            if len(calls) == 3:
                real_write(file, data[: len(data) // 2])
                die()
            real_write(file, data)
        outputs.write_synced = write
    elif point == "before-swap":
        atomic_replace.exchange_directories = lambda a, b: die()
    elif point == "after-swap":       # the new one is in place, the old one not yet deleted
        atomic_replace.exchange_directories = lambda a, b: (real_exchange(a, b), die())
    elif point == "mid-delete-old":   # one file of the old checkpoint deleted, then killed
        def rmtree(path, ignore_errors=False):
            os.unlink(os.path.join(path, "config.json"))
            die()
        shutil.rmtree = rmtree
    elif point == "fallback-between-renames":  # no renameat2: killed after moving the old one aside
        atomic_replace.exchange_directories = lambda a, b: False
        def rename(a, b):
            real_rename(a, b)
            die()
        os.rename = rename
    elif point == "latest-mid-write":  # save_to_folder: killed while writing the 'latest' pointer
        def write(file, data):
            if file.name.startswith(".latest.tmp-"):
                real_write(file, data[:3])
                die()
            real_write(file, data)
        outputs.write_synced = write
    model = {"w": torch.full((3,), float(step)), "b": torch.arange(2.0) + step}
    if point == "latest-mid-write":
        ck.save_to_folder(target, step, keep_last=1, model=model, config={"step": step})
    else:
        ck.save_checkpoint(target, model=model, config={"step": step}, step=step, overwrite=True)
""")


def run_killed(target, point: str, step: int) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", CHILD, str(target), point, str(step)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr


@pytest.mark.parametrize("point, visible", [("mid-write", 1), ("before-swap", 1), ("after-swap", 2),
                                            ("mid-delete-old", 2), ("fallback-between-renames", None)])
@pytest.mark.slow  # multi-second end-to-end test: CI runs it with -m slow
def test_kill_during_replace_leaves_the_old_or_the_new_checkpoint(tmp_path, point, visible):
    path = tmp_path / "ck"
    save(path, 1)
    # things that look like leftovers but are not diffcore's: never deleted
    (tmp_path / ".tmp-notes").mkdir()
    (tmp_path / ".tmp-ck-0123456789ab").mkdir()
    (tmp_path / ".tmp-ck-0123456789ab" / "diary.txt").write_text("mine")
    (tmp_path / ".old-ck-zz").write_text("mine too")
    user = {".tmp-notes", ".tmp-ck-0123456789ab", ".old-ck-zz"}
    run_killed(path, point, 2)
    leftovers = set(os.listdir(tmp_path)) - user - {"ck"}
    if visible is not None:
        assert_holds(path, visible)  # complete and loadable at its path, at once
        assert leftovers  # the interrupted save left its temporary folder
    else:  # the two-rename fallback: the old one waits beside, and the next save puts it back first
        assert not path.exists() and all(name.startswith(".old-ck-") or name.startswith(".tmp-ck-")
                                          for name in leftovers)
    save(path, 3, overwrite=True)
    assert_holds(path, 3)
    assert set(os.listdir(tmp_path)) == user | {"ck"}  # leftovers cleaned, the user's look-alikes kept
    assert (tmp_path / ".tmp-ck-0123456789ab" / "diary.txt").read_text() == "mine"


@pytest.mark.slow
def test_kill_during_a_first_save_and_while_writing_latest(tmp_path):
    run_killed(tmp_path / "fresh", "mid-write", 1)
    assert not (tmp_path / "fresh").exists()  # absent, not partial
    folder = tmp_path / "run"
    ck.save_to_folder(folder, 4, keep_last=1, model=weights(4), config={"step": 4})
    run_killed(folder, "latest-mid-write", 6)
    assert ck.latest_checkpoint(folder).name == "step_00000004"  # the pointer still names a complete one
    assert_holds(ck.resolve_checkpoint(folder), 4)
    assert any(name.startswith(".latest.tmp-") for name in os.listdir(folder))
    ck.save_to_folder(folder, 8, keep_last=1, model=weights(8), config={"step": 8})
    assert sorted(os.listdir(folder)) == ["latest", "step_00000008"]


# -------------------------------------------------------------------------------------------- full disk
def test_full_disk_leaves_the_previous_checkpoint_and_no_partial_file(tmp_path, monkeypatch):
    path = save(tmp_path / "ck", 1)
    folder = tmp_path / "run"
    ck.save_to_folder(folder, 1, model=weights(1), config={"step": 1})
    before, before_folder = listing(tmp_path / "ck"), listing(folder)
    real = outputs.write_synced
    written = []

    def full_disk(file, data):
        written.append(file.name)
        if len(written) >= 3 or file.name.startswith(".latest.tmp-"):
            real(file, data[: len(data) // 3])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(file, data)

    monkeypatch.setattr(outputs, "write_synced", full_disk)
    with pytest.raises(OSError, match="No space left on device; the previous checkpoint there is unchanged") as info:
        save(path, 2, overwrite=True)
    assert info.value.errno == errno.ENOSPC
    assert listing(tmp_path / "ck") == before and sorted(os.listdir(tmp_path)) == ["ck", "run"]
    assert_holds(path, 1)
    # in a folder: the checkpoint fits but 'latest' does not: the unreachable new step folder is removed too
    written.clear()
    monkeypatch.setattr(outputs, "write_synced", lambda file, data: full_disk(file, data) if file.name.startswith(
        ".latest.tmp-") else real(file, data))
    with pytest.raises(OSError, match="could not write .*latest: No space left on device") as info:
        ck.save_to_folder(folder, 2, model=weights(2), config={"step": 2})
    assert info.value.errno == errno.ENOSPC
    assert listing(folder) == before_folder and ck.latest_checkpoint(folder).name == "step_00000001"


# --------------------------------------------------------------------------------- item 8: hostile manifests
def edit_manifest(path, change) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    change(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_manifest_names_only_plain_files_inside_the_checkpoint(tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(b"private bytes")
    entry = {"bytes": 13, "sha256": "0" * 64}
    for name in ("../secret", str(secret), "sub/x", "..", ".hidden", "a\\b", "manifest.json"):
        path = save(tmp_path / "ck", 1, overwrite=True)
        edit_manifest(path, lambda m: m["files"].update({name: entry}))
        with pytest.raises(ck.CheckpointError, match="not a plain file name inside the checkpoint folder"):
            ck.verify_checkpoint(path)
    # a plain name that is a link to a file outside: refused, never followed
    path = save(tmp_path / "ck", 1, overwrite=True)
    (path / "model.safetensors").unlink()
    (path / "model.safetensors").symlink_to(secret)
    for check in (ck.verify_checkpoint, ck.load_checkpoint):
        with pytest.raises(ck.CheckpointError, match="model.safetensors is not a regular file"):
            check(path)


def test_sizes_are_checked_before_reading(tmp_path):
    path = save(tmp_path / "ck", 1)
    huge = path / "model.safetensors"
    with open(huge, "r+b") as handle:  # a 3 GiB sparse file: reading it would take seconds and gigabytes
        handle.truncate(3 << 30)
    started = time.perf_counter()
    with pytest.raises(ck.CheckpointError, match=r"model.safetensors is truncated or altered \(3221225472 bytes"):
        ck.verify_checkpoint(path)
    assert time.perf_counter() - started < 1.0
    with open(huge, "r+b") as handle:
        handle.truncate(40 << 20)
    edit_manifest(path, lambda m: m["files"]["model.safetensors"].update(bytes=40 << 20))
    with pytest.raises(ck.CheckpointError, match="model.safetensors is corrupted"):
        ck.verify_checkpoint(path)  # the size matches: hashed in 1 MiB chunks


@pytest.mark.parametrize("change, message", [
    (lambda m: m.pop("files"), "has no 'files' field"),
    (lambda m: m["files"]["config.json"].pop("bytes"), r"files\['config.json'\] has no 'bytes' field"),
    (lambda m: m["files"]["config.json"].update(bytes=-1), r"files\['config.json'\].bytes must be an integer >= 0"),
    (lambda m: m["files"]["config.json"].update(sha256="xyz"), "sha256 must be 64 lowercase hex digits"),
    (lambda m: m.update(step="four"), "'step' must be an integer >= 0, got 'four'"),
    (lambda m: m.pop("step"), "has no 'step' field"),
    (lambda m: m.update(files=["model.safetensors"]), "'files' must be an object"),
    (lambda m: m.update(version=True), "format version True is not supported"),
])
def test_malformed_manifest_fields_are_named(tmp_path, change, message):
    path = save(tmp_path / "ck", 1)
    edit_manifest(path, change)
    with pytest.raises(ck.CheckpointError, match=message):
        ck.load_checkpoint(path)


def test_latest_names_only_a_sibling_step_folder(tmp_path):
    folder = tmp_path / "run"
    ck.save_to_folder(folder, 1, model=weights(1), config={"step": 1})
    elsewhere = save(tmp_path / "elsewhere", 9)
    (folder / "step_00000002").symlink_to(elsewhere)
    for pointer in ("../elsewhere", str(elsewhere), "step_00000001/..", "manifest.json"):
        (folder / "latest").write_text(pointer + "\n")
        with pytest.raises(ck.CheckpointError, match="expected the name of a step folder beside it"):
            ck.resolve_checkpoint(folder)
    (folder / "latest").write_text("step_00000002\n")
    with pytest.raises(ck.CheckpointError, match="names step_00000002, which is not a directory in"):
        ck.resolve_checkpoint(folder)
    (folder / "latest").write_text("step_00000001\n")
    assert_holds(ck.resolve_checkpoint(folder), 1)


# ------------------------------------------------------------------------------ item 7: incomplete configs
def test_a_config_without_a_process_or_model_field_is_refused(tmp_path):
    config = tiny_train_config(tmp_path)
    for field in ("num_timesteps", "schedule", "prediction_type", "variance_type", "model.channel_mult",
                  "model.learn_sigma", "model.timestep_scale"):
        path = write_trained(tmp_path / field, config, drop=[field])
        with pytest.raises(ck.CheckpointError, match=f"config.json lacks '{field}', which changes the model"):
            load_trained_model(path)
    # fields added in format version 2 may be absent from a version-1 checkpoint (their defaults), not from a 2
    added = ["ema_warmup", "max_nonfinite_steps", "model.num_heads_upsample", "model.timestep_scale"]
    old = write_trained(tmp_path / "v1", config, drop=added, version=1)
    trained = load_trained_model(old)
    assert trained.config.ema_warmup is False and trained.diffusion.num_timesteps == 4
    new = write_trained(tmp_path / "v2", config, drop=["ema_warmup"])
    with pytest.raises(ck.CheckpointError, match="lacks 'ema_warmup'"):
        load_trained_model(new)
    # output settings do not change the model or the process: they may be absent
    assert load_trained_model(write_trained(tmp_path / "out", config, drop=["out_dir", "log_every"])).step == 5


def test_the_packaged_model_config_is_complete_for_its_version():
    from diffcore.pretrained import default_model_path

    path = default_model_path()
    if not (path / "manifest.json").is_file():
        pytest.skip("the packaged model is not shipped in this build")
    manifest = ck.read_manifest(path)
    config = config_from_checkpoint(json.loads((path / "config.json").read_text()), manifest["version"])
    assert config.num_timesteps == 1000 and config.model.image_size == 28
