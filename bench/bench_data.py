"""Data loading on this machine: the loader's images/s against the training step's, and peak memory.

Run as a script (it is not a pytest benchmark: it generates thousands of files once under /tmp):

    OMP_NUM_THREADS=1 python bench/bench_data.py [--out bench/results/data_<date>.json]

1. Throughput: 2,000 64x64 RGB PNGs, streamed at 32x32 (decode + resize + centre crop) from the folder, from tar
   shards and from a packed (memory-mapped) array, through :class:`diffcore.data.ShardedBatches` with 0, 1 and 2
   DataLoader workers (batch 32, flips on); then one training step of the fashion_mnist_small U-Net (3 channels,
   32x32, batch 32, one torch thread) fed from the folder with 0, 1 and 2 workers.
2. Peak RSS (``resource.getrusage`` in a fresh subprocess) over one epoch of 2,000 and 20,000 8x8 PNGs: streamed
   (folder, shards, packed array) and, for comparison, loaded into memory. (The peak is the process's VmHWM, which
   is what ``getrusage``'s ru_maxrss reports except that ru_maxrss carries the parent's RSS over an exec; a
   worker's peak counts the pages it shares with the main process since the fork.)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path("/tmp/diffcore_bench_data")
# Peak RSS of this process in KiB. On Linux getrusage's ru_maxrss survives exec: a child of a big process starts
# with its parent's RSS as its "peak", so the mm's own high-water mark (VmHWM, reset at exec) is read instead.
PEAK_RSS = r"""
import resource
def peak_kib():
    try:
        with open("/proc/self/status") as status:
            return int(status.read().split("VmHWM:")[1].split()[0])
    except (OSError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
"""
RSS_SCRIPT = PEAK_RSS + r"""
import sys, torch
torch.set_num_threads(1)
from diffcore.data import ImageDataset, ShardedBatches, open_source
from diffcore.images import load_image_folder
kind, path, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
if kind == "memory":
    images, labels, _ = load_image_folder(path, 8, 3)
    dataset = ImageDataset(images, labels, hflip=True)
else:
    dataset = open_source(path, image_size=8 if kind == "folder" else None, hflip=True)
stream = ShardedBatches(dataset, 100, num_workers=workers)
for _ in range(stream.batches_per_epoch):
    next(stream)
stream.close()
print(peak_kib(), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def make_folder(root: Path, n: int, size: int) -> Path:
    """n RGB PNGs of size x size in 4 class folders (generated once; reused when complete)."""
    from PIL import Image

    from diffcore.data import synthetic_images

    marker = root / ".complete"
    if marker.is_file():
        return root
    images, labels = synthetic_images(n, size, channels=3, seed=0)
    for i, (image, label) in enumerate(zip(images, labels)):
        sub = root / f"c{int(label)}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(sub / f"{i:06d}.png")
    marker.write_text("")
    return root


def packed(folder: Path, size: int, fmt: str) -> Path:
    from diffcore.data import pack_folder

    out = folder.parent / f"{folder.name}_{fmt}{size}"
    if not out.is_dir():
        pack_folder(folder, out, size, format=fmt, num_workers=2)
    return out


def loader_rate(source, workers: int, batches: int = 60, batch: int = 32) -> float:
    from diffcore.data import ShardedBatches

    stream = ShardedBatches(source, batch, num_workers=workers)
    next(stream)  # workers started, first batches in flight
    started = time.perf_counter()
    for _ in range(batches):
        next(stream)
    rate = batches * batch / (time.perf_counter() - started)
    stream.close()
    return rate


def train_rate(folder: Path, workers: int, steps: int = 6) -> float:
    import tempfile

    from diffcore.train import TrainConfig, Trainer
    from diffcore.unet import UNetConfig

    model = UNetConfig.fashion_mnist_small(in_channels=3, image_size=32, dropout=0.0,
                                          attention_resolutions=(8,))
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(data=str(folder), image_size=32, hflip=True, model=model, batch_size=32,
                             total_steps=1000, out_dir=out, progress=False, num_workers=workers)
        trainer = Trainer(config, device="cpu", resume=False)
        trainer.train_step()
        started = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        rate = steps * 32 / (time.perf_counter() - started)
        trainer.batches.close()
    return rate


def peak_rss(kind: str, path: Path, workers: int) -> tuple[float, float]:
    result = subprocess.run([sys.executable, "-c", RSS_SCRIPT, kind, str(path), str(workers)], capture_output=True,
                            text=True, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    main, children = (int(v) / 1024 for v in result.stdout.split())  # KiB -> MiB
    return main, children


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the numbers as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from diffcore.data import open_source

    results: dict = {"date": str(date.today()), "machine": f"{os.cpu_count()} CPUs, {platform.processor()}",
                     "torch": torch.__version__, "loader": {}, "train": {}, "rss": {}}
    big = make_folder(ROOT / "rgb64_2000", 2000, 64)
    sources = {"folder (64px PNG -> 32px)": open_source(str(big), image_size=32, hflip=True),
               "tar shards (32px PNG)": open_source(str(packed(big, 32, "shards")), hflip=True),
               "packed npy (memory-mapped)": open_source(str(packed(big, 32, "npy")), hflip=True)}
    print("| source | 0 workers | 1 worker | 2 workers |  (loader alone, images/s)\n|---|---|---|---|")
    for name, source in sources.items():
        rates = [loader_rate(source, w) for w in (0, 1, 2)]
        results["loader"][name] = rates
        print(f"| {name} | " + " | ".join(f"{r:,.0f}" for r in rates) + " |", flush=True)
    rates = [train_rate(big, w) for w in (0, 1, 2)]
    results["train"]["fashion_mnist_small 3x32x32 b32 from the folder"] = rates
    print("| training step (fashion_mnist_small, 3x32x32, batch 32) | "
          + " | ".join(f"{r:,.1f}" for r in rates) + " |", flush=True)

    print("\n| images (8x8 PNG) | source | workers | peak RSS main (MiB) | peak RSS of a worker (MiB) |\n"
          "|---|---|---|---|---|")
    for n in (2000, 20000):
        small = make_folder(ROOT / f"rgb8_{n}", n, 8)
        paths = {"folder": small, "shards": packed(small, 8, "shards"), "npy": packed(small, 8, "npy"),
                 "memory": small}
        for kind, path in paths.items():
            for workers in ((0, 2) if kind == "folder" else (0,)):
                main_mb, child_mb = peak_rss(kind, path, workers)
                results["rss"][f"{n} {kind} w{workers}"] = [main_mb, child_mb]
                print(f"| {n:,} | {kind} | {workers} | {main_mb:.0f} | "
                      f"{child_mb:.0f} |" if workers else f"| {n:,} | {kind} | 0 | {main_mb:.0f} | - |", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
