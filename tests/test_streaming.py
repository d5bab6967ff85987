"""Streaming data (image folders, tar shards, packed arrays): batch for batch equal to the in-memory path, resume
with DataLoader workers bit-exact, DDP equal to one process, bad data named, flat memory, pack and the logging
people watch (TensorBoard, the incremental loss plot)."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch

from diffcore import checkpoint as ck
from diffcore import data
from diffcore.data import load_image_folder
from diffcore.train import TrainConfig, Trainer
from diffcore.train.logging import LossPlot
from diffcore.unet import UNet, UNetConfig

from helpers import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

N_IMAGES = 2000  # "a few thousand small PNGs"


def write_pngs(folder, images: torch.Tensor, labels: torch.Tensor, start: int = 0) -> None:
    """One PNG per image, in a sub-folder per class (ImageFolder convention)."""
    from PIL import Image

    for i, (image, label) in enumerate(zip(images, labels), start):
        sub = folder / f"class_{int(label)}"
        sub.mkdir(parents=True, exist_ok=True)
        pixels = image.permute(1, 2, 0).numpy()
        Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels).save(sub / f"{i:05d}.png")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """N_IMAGES 8x8 RGB PNGs in four class folders (seeded)."""
    root = tmp_path_factory.mktemp("pngs")
    images, labels = data.synthetic_images(N_IMAGES, 8, channels=3, seed=11)
    write_pngs(root, images, labels)
    return root


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    """64 grayscale 8x8 PNGs for training runs."""
    root = tmp_path_factory.mktemp("small")
    images, labels = data.synthetic_images(64, 8, channels=1, seed=3)
    write_pngs(root, images, labels)
    return root


def in_memory(folder, size=8, channels=3, hflip=True) -> data.ImageDataset:
    images, labels, _ = load_image_folder(folder, size, channels)
    return data.ImageDataset(images, labels, hflip=hflip)


def assert_same_batches(a: data.ShardedBatches, b: data.ShardedBatches, count: int) -> None:
    try:
        for k in range(count):
            (xa, ya), (xb, yb) = next(a), next(b)
            assert torch.equal(xa, xb) and torch.equal(ya, yb), f"batch {k}"
    finally:
        a.close()
        b.close()


# ------------------------------------------------------------------------------------------------ same batches
def test_streamed_folder_matches_in_memory_batch_for_batch(folder):
    source = data.open_source(str(folder), image_size=8, hflip=True)
    assert isinstance(source, data.ImageFolderSource) and len(source) == N_IMAGES
    assert source.class_names == [f"class_{k}" for k in range(4)]
    memory = in_memory(folder)
    assert torch.equal(source.labels, memory.labels)
    # 2000 // 64 = 31 batches per epoch: 34 batches cross an epoch boundary
    assert_same_batches(data.ShardedBatches(memory, 64, seed=4), data.ShardedBatches(source, 64, seed=4), 34)
    # rank 1 of 2, decoded by two workers
    assert_same_batches(data.ShardedBatches(memory, 32, seed=4, rank=1, world_size=2),
                        data.ShardedBatches(source, 32, seed=4, rank=1, world_size=2, num_workers=2), 33)


def test_resized_images_decode_as_the_in_memory_loader(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(20, 13), (8, 8), (31, 40), (9, 64)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8)).save(tmp_path / "gray.png")
    for channels in (1, 3):
        expected, labels, _ = load_image_folder(tmp_path, 8, channels)
        source = data.ImageFolderSource(tmp_path, 8, channels)
        assert torch.equal(torch.from_numpy(np.stack([source[i] for i in range(len(source))])), expected)
        assert source.labels.tolist() == labels.tolist() == [0] * 5


def test_shards_and_packed_array_serve_the_folder_batches(folder, tmp_path):
    data.pack_folder(folder, tmp_path / "shards", 8, shard_size=700, num_workers=1)
    data.pack_folder(folder, tmp_path / "npy", 8, format="npy")
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == [
        "pack.json", "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    info = json.loads((tmp_path / "shards" / "pack.json").read_text())
    assert info["count"] == N_IMAGES and info["class_names"] == [f"class_{k}" for k in range(4)]
    memory = in_memory(folder)
    spec = str(tmp_path / "shards" / "shard-{000000..000002}.tar")
    for source, kind, workers in ((data.open_source(spec, hflip=True), data.TarShardSource, 1),
                                  (data.open_source(str(tmp_path / "shards"), hflip=True), data.TarShardSource, 0),
                                  (data.open_source(str(tmp_path / "npy"), hflip=True), data.PackedArraySource, 0)):
        assert isinstance(source, kind) and torch.equal(source.labels, memory.labels)
        assert_same_batches(data.ShardedBatches(memory, 50, seed=9),
                            data.ShardedBatches(source, 50, seed=9, num_workers=workers), 42)
    # the WebDataset layout, read with tarfile independently of the reader
    with tarfile.open(tmp_path / "shards" / "shard-000001.tar") as archive:
        names = archive.getnames()
        assert names[:2] == ["00000700.png", "00000700.cls"]
        assert int(archive.extractfile("00000700.cls").read()) == int(memory.labels[700])


def test_position_resumes_across_workers_and_ranks(folder):
    source = data.open_source(str(folder), image_size=8, hflip=True)
    ranks = [data.ShardedBatches(source, 16, seed=2, rank=r, world_size=2, num_workers=1) for r in range(2)]
    for _ in range(5):
        for r in ranks:
            next(r)
    state = ranks[0].state_dict()
    # one process with the same global batch (32) continues with the union of the ranks' batches, in global order
    single = data.ShardedBatches(source, 32, seed=2, num_workers=2)
    single.load_state_dict(state)
    try:
        for _ in range(3):
            x, y = next(single)
            parts = [next(r) for r in ranks]
            assert torch.equal(x, torch.stack([p[0] for p in parts], 1).flatten(0, 1))
            assert torch.equal(y, torch.stack([p[1] for p in parts], 1).flatten())
    finally:
        for stream in ranks + [single]:
            stream.close()
    with pytest.raises(ValueError, match="global batch"):
        data.ShardedBatches(source, 16, seed=2).load_state_dict(state)


# ------------------------------------------------------------------------------------------------ training
def tiny_config(out_dir, data_path, **overrides) -> TrainConfig:
    model = UNetConfig(in_channels=1, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                       attention_resolutions=(), image_size=8, dropout=0.0, learn_sigma=True, num_heads=1,
                       norm_groups=4)
    base = dict(data=str(data_path), image_size=8, hflip=True, model=model, batch_size=8, total_steps=12,
                log_every=3, checkpoint_every=100, num_timesteps=4, progress=False, ema_rate=0.9,
                out_dir=str(out_dir), lr=1e-3, bf16=False)  # float32: DDP compares to float rounding
    base.update(overrides)
    return TrainConfig(**base)


@pytest.mark.slow  # several seconds; CI runs the slow tests too
def test_training_streamed_equals_in_memory_and_resumes_bit_exact_with_workers(small_folder, tmp_path):
    images, labels, _ = load_image_folder(small_folder, 8, 1)
    memory = Trainer(tiny_config(tmp_path / "memory", small_folder),
                     dataset=data.ImageDataset(images, labels, hflip=True))
    memory.train()
    # streamed, stopped after 7 steps and resumed with another number of workers: the in-memory weights, bit for bit
    first = Trainer(tiny_config(tmp_path / "resumed", small_folder, num_workers=2))
    assert isinstance(first.batches.dataset, data.ImageFolderSource)
    first.train(max_steps=7)
    del first
    second = Trainer(tiny_config(tmp_path / "resumed", small_folder, num_workers=1))  # workers may change
    assert second.step == 7
    second.train()
    for key, value in memory.model.state_dict().items():
        assert torch.equal(value, second.model.state_dict()[key]), key
    for key, value in memory.ema.state_dict().items():
        assert torch.equal(value, second.ema.state_dict()[key]), key
    torch.manual_seed(memory.config.seed)  # the trainer's initial weights: not vacuous, 12 steps moved them
    initial = UNet(memory.config.model).state_dict()
    assert max(float((memory.model.state_dict()[k] - initial[k]).abs().max()) for k in initial) > 1e-3
    log = [json.loads(line) for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [3, 6, 7, 9, 12] and all(r["skipped_images"] == 0 for r in log)


def _ddp_worker(rank: int, world: int, port: int, out_dir: str, folder: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    try:
        trainer = Trainer(tiny_config(out_dir, folder, total_steps=3, num_workers=1))
        assert trainer.world_size == world
        trainer.train()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_gloo_processes_streaming_match_one_process(small_folder, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path / "ddp"), str(small_folder)), nprocs=2, join=True)
    single = Trainer(tiny_config(tmp_path / "single", small_folder, total_steps=3))
    single.train()
    loaded = ck.load_checkpoint(ck.resolve_checkpoint(tmp_path / "ddp" / "checkpoints"))
    assert loaded.step == 3
    for key, value in single.model.state_dict().items():
        torch.testing.assert_close(loaded.model[key], value, rtol=1e-5, atol=1e-6, msg=key)


# ------------------------------------------------------------------------------------------------ bad data
def test_corrupt_image_is_named_or_skipped_and_counted(tmp_path):
    images, labels = data.synthetic_images(12, 8, channels=3, seed=0)
    write_pngs(tmp_path, images, labels)
    broken = sorted(tmp_path.rglob("*.png"))[5]
    broken.write_bytes(broken.read_bytes()[:30])  # a truncated PNG
    source = data.ImageFolderSource(tmp_path)
    assert source.pixel_size == 8
    for workers in (0, 1):
        stream = data.ShardedBatches(source, 12, num_workers=workers)
        with pytest.raises(data.BadImageError, match=broken.name):
            next(stream)
    skipping = data.ShardedBatches(source, 12, skip_bad_images=True, num_workers=1)
    x, y = next(skipping)
    skipping.close()
    # image 5 was replaced by image 6 (the next good one): it appears twice, with its label
    order = data.epoch_order(12, 0, 0, False)[0].tolist()
    expected = load_image_folder_without(tmp_path, broken)
    rows = [expected[(i + 1) if i == 5 else i] for i in order]
    assert torch.equal(x, torch.stack(rows).float() / 127.5 - 1)
    assert y.tolist() == [int(source.labels[(i + 1) if i == 5 else i]) for i in order]
    assert skipping.skipped == 1 and broken.name in skipping.skipped_names[0]


def load_image_folder_without(root, broken):
    """The folder's images as load_image_folder decodes them, index-aligned, with zeros for the broken one."""
    from PIL import Image

    out = []
    for path in sorted(root.rglob("*.png")):
        if path == broken:
            out.append(torch.zeros(3, 8, 8, dtype=torch.uint8))
            continue
        with Image.open(path) as image:
            out.append(torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1))
    return out


def test_empty_folder_mixed_sizes_and_truncated_shard_are_named(tmp_path):
    from PIL import Image

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty.*holds no image files"):
        data.open_source(str(tmp_path / "empty"))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.new("RGB", (8, 8)).save(mixed / "a.png")
    Image.new("RGB", (10, 8)).save(mixed / "b.png")
    stream = data.ShardedBatches(data.open_source(str(mixed)), 2)
    with pytest.raises(data.BadImageError, match=r"b\.png is 8x10 .*mixed image sizes"):
        next(stream)
    assert data.open_source(str(mixed), image_size=4).pixel_size == 4  # resizing makes them fit
    data.pack_folder(mixed, tmp_path / "shards", 8)
    shard = tmp_path / "shards" / "shard-000000.tar"
    blob = shard.read_bytes()
    shard.write_bytes(blob[:1200])  # cut inside the second member's data
    with pytest.raises(ValueError, match="shard-000000.tar.*truncated"):
        data.open_source(str(shard))
    with pytest.raises(FileNotFoundError, match=r"shard-000001\.tar"):
        data.open_source(str(tmp_path / "shards" / "shard-{000000..000001}.tar"))


def test_labels_file(tmp_path):
    from PIL import Image

    for name in ("x.png", "y.png", "sub/z.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.new("L", (4, 4)).save(tmp_path / name)
    (tmp_path / "labels.csv").write_text("path,label\nx.png,2\nsub/z.png,0\ny.png,1\n")
    source = data.ImageFolderSource(tmp_path, channels=1)
    assert source.labels.tolist() == [0, 2, 1]  # sorted paths: sub/z.png, x.png, y.png
    (tmp_path / "labels.csv").write_text("x.png,2\n")
    with pytest.raises(ValueError, match="labels.csv has no label for 2 image"):
        data.ImageFolderSource(tmp_path, channels=1)


# ------------------------------------------------------------------------------------------------ memory
RSS_SCRIPT = """
import resource, sys, torch
def peak_kib():  # VmHWM: getrusage's ru_maxrss would start at the parent's (pytest's) RSS, carried over the exec
    try:
        with open("/proc/self/status") as status:
            return int(status.read().split("VmHWM:")[1].split()[0])
    except (OSError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
torch.set_num_threads(1)
from diffcore.data import ShardedBatches, open_source
stream = ShardedBatches(open_source(sys.argv[1], image_size=8), 50)
next(stream)
before = peak_kib()
for _ in range(stream.batches_per_epoch - 1):
    next(stream)
print(before, peak_kib())
"""


@pytest.mark.slow  # multi-second end-to-end test: CI runs it with -m slow
def test_memory_stays_flat_over_an_epoch(folder):
    result = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(folder)], capture_output=True, text=True,
                            timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr
    before, after = (int(v) for v in result.stdout.split())
    # KiB on Linux; the decoded epoch is 2000 x 192 bytes, so growth would be small anyway: a generous bound that a
    # leak of the decoded batches (2000 x 768 bytes of float32 per image, 1.5 MB) or PIL images would still pass,
    # but that catches holding the raw files or decoding everything up front (tens of MB)
    assert after - before < 24 * 1024, (before, after)


# ------------------------------------------------------------------------------------------------ CLI, logs
def test_pack_cli_and_its_errors(small_folder, tmp_path, capsys):
    code, out, err = run_cli(capsys, "pack", small_folder, tmp_path / "out", "--image-size", "8", "--format", "npy",
                             "--channels", "1")
    assert code == 0, err
    packed = np.load(tmp_path / "out" / "images.npy", mmap_mode="r")
    expected, labels, _ = load_image_folder(small_folder, 8, 1)
    assert np.array_equal(np.asarray(packed), expected.numpy())
    assert np.load(tmp_path / "out" / "labels.npy").tolist() == labels.tolist()
    code, _, err = run_cli(capsys, "pack", small_folder, tmp_path / "out", "--image-size", "8")
    assert code == 2 and "not empty" in err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    code, _, err = run_cli(capsys, "pack", broken, tmp_path / "nothing", "--image-size", "8")
    assert code == 2 and "bad.png" in err and not (tmp_path / "nothing").exists()


def test_train_cli_on_shards_with_tensorboard(small_folder, tmp_path, capsys, monkeypatch):
    data.pack_folder(small_folder, tmp_path / "shards", 8, channels=1, shard_size=20)
    argv = ["train", "--data", str(tmp_path / "shards" / "shard-{000000..000003}.tar"), "--image-size", "8",
            "--in-channels", "1", "--model-channels", "8", "--channel-mult", "1,2", "--num-res-blocks", "1",
            "--attention-resolutions", "", "--num-heads", "1", "--num-timesteps", "4", "--batch-size", "8",
            "--steps", "4", "--log-every", "2", "--no-progress", "--num-workers", "1", "--tensorboard",
            "--sample-every", "4", "--sample-n", "4", "--sample-steps", "2"]
    with monkeypatch.context() as patch:  # as without the package (importing a None module raises ImportError)
        patch.setitem(sys.modules, "torch.utils.tensorboard", None)
        code, _, err = run_cli(capsys, *argv, "--out-dir", tmp_path / "without")
        assert code == 2 and "the tensorboard package is not installed" in err, err
        assert not (tmp_path / "without" / "checkpoints").exists()
    pytest.importorskip("tensorboard")
    code, out, err = run_cli(capsys, *argv, "--out-dir", tmp_path / "run")
    assert code == 0, err
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [r["step"] for r in log] == [2, 4]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in log], rel=1e-6)
    assert {"train/lr", "train/grad_norm", "train/images_per_s"} <= set(events.Tags()["scalars"])
    # the sample grid: the PNG written to samples/, as an RGB image at its step
    from PIL import Image

    (image,) = events.Images("samples")
    with Image.open(io.BytesIO(image.encoded_image_string)) as logged, \
            Image.open(tmp_path / "run" / "samples" / "step_00000004.png") as written:
        assert image.step == 4 and np.array_equal(np.asarray(logged), np.asarray(written.convert("RGB")))


def test_loss_plot_keeps_bounded_points(tmp_path):
    records = [{"step": s, "loss": float(s), "mse": 1.0, "vb": None} for s in range(1, 10)]
    plot = LossPlot(tmp_path / "loss.png", records[:8], max_points=4)  # as when resuming: read from the log
    assert not (tmp_path / "loss.png").exists()
    plot.add(records[8])
    # by hand: 1..4 kept; 5 -> (1+2)/2, (3+4)/2, 5; 6 appended; 7 -> (1.5+3.5)/2, (5+6)/2, 7; 8; 9 -> 4, 7.5, 9
    assert plot.curves["loss"] == [(4.0, 4.0), (7.5, 7.5), (9.0, 9.0)]
    assert plot.curves["vb"] == []
    from PIL import Image

    with Image.open(tmp_path / "loss.png") as image:
        assert image.size[0] > 100
