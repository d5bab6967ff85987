"""Is diffcore faster than what a user would pick instead? End to end, side by side, in one process.

    OMP_NUM_THREADS=1 python bench/bench_end_to_end.py sample [--rounds 3] [--n 64] [--compile] [--threads 1]
    OMP_NUM_THREADS=1 python bench/bench_end_to_end.py train [--rounds 5]
    OMP_NUM_THREADS=1 python bench/bench_end_to_end.py fid [--n 500]

``sample``: DDIM-50 of n images from the packaged Fashion-MNIST model through ``diffcore.sample``: the default
path (``runtime.SAMPLE_PRECISION``, "auto"), ``precision="fp32"`` and, with ``--compile``, ``compile=True`` with
each of them (first calls timed
separately), against diffusers' ``UNet2DModel`` of the same size (1,743,170 parameters, DESIGN.md section 5) +
``DDIMScheduler`` (cosine schedule, clipping), both on ``--threads`` threads, rounds interleaved; prints the median
time of each and the median of the per-round ratios diffusers / diffcore, with the load average of every round.
``train``: one training step (forward, eps MSE, backward, AdamW) at batch 64, diffcore's U-Net (fp32, and bf16
autocast) against the same diffusers model.
``fid``: quality evidence for a bf16 default: n samples in fp32 and in bf16 at equal seeds, scored with
``diffcore.metrics.score_samples`` against Fashion-MNIST test images, with the noise floor (held-out real images
of the same count) over several disjoint reference splits.
Single-threaded unless ``--threads``; diffusers is a benchmark-only dependency.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import time

import torch

import diffcore
from diffcore import runtime
from diffcore.pretrained import load_default
from diffcore.runtime import cpu_features


def machine() -> str:
    """One line: CPU model, features, torch version, threads."""
    try:
        model = next(line.split(":", 1)[1].strip() for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        model = platform.processor()
    return (f"{model}, {os.cpu_count()} CPUs, {cpu_features()}, torch {torch.__version__}, "
            f"threads {torch.get_num_threads()}")


def diffusers_unet(out_channels: int = 2):
    """diffusers' UNet2DModel with exactly the packaged model's parameter count (DESIGN.md section 5)."""
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=28, in_channels=1, out_channels=out_channels, block_out_channels=(32, 64, 64),
                       layers_per_block=2, down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), attention_head_dim=16,
                       resnet_time_scale_shift="scale_shift", attn_norm_num_groups=32).eval()


@torch.no_grad()
def diffusers_ddim(unet, n: int, steps: int = 50, seed: int = 0) -> torch.Tensor:
    """DDIM (eta 0, clipped x0) with diffusers' scheduler; the first output channel is eps."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True)
    scheduler.set_timesteps(steps)
    x = torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))
    for t in scheduler.timesteps:
        eps = unet(x, t).sample[:, :1]
        x = scheduler.step(eps, t, x).prev_sample
    return x


def timed(fn, outputs: "dict | None" = None, name: str = "") -> float:
    """Seconds ``fn()`` took; its result is kept in ``outputs[name]`` when ``outputs`` is given."""
    start = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - start
    if outputs is not None:
        outputs[name] = result
    return elapsed


def bench_sample(args) -> None:
    packaged = load_default()
    model, diffusion = packaged.model.eval(), packaged.diffusion
    reference = diffusers_unet()
    n = args.n

    def ours(**kw):
        return lambda: diffcore.sample(model, n=n, seed=0, diffusion=diffusion, progress=False, sampler="ddim", **kw)

    default = f"diffcore default (precision={runtime.SAMPLE_PRECISION})"
    options = {default: ours(), "diffcore precision=fp32": ours(precision="fp32")}
    if args.compile:
        options["diffcore compile=True (default precision)"] = ours(compile=True)
        options["diffcore compile=True precision=fp32"] = ours(compile=True, precision="fp32")
        for name in [k for k in options if "compile" in k]:  # first calls: compile, or load the on-disk cache
            first = timed(options[name])
            print(f"{name}: first call {first:.1f} s (cache {os.environ.get('TORCHINDUCTOR_CACHE_DIR')}), "
                  f"load {os.getloadavg()}", flush=True)
    options["diffusers UNet2DModel + DDIMScheduler"] = lambda: diffusers_ddim(reference, n)
    times, images = {name: [] for name in options}, {}
    for r in range(args.rounds):
        for name, fn in options.items():
            times[name].append(timed(fn, images, name))
        print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.1f}s" for k, v in times.items())
              + f", load {os.getloadavg()}", flush=True)
    fp32 = images["diffcore precision=fp32"]
    for name in [k for k in options if k.startswith("diffcore") and k != "diffcore precision=fp32"]:
        diff = (images[name] - fp32).abs()
        print(f"{name}: images vs fp32's at the same seed: max |diff| {diff.max():.2e}, mean {diff.mean():.2e}")
    base = times["diffusers UNet2DModel + DDIMScheduler"]
    print(f"\nDDIM-50 of {n} images; {machine()}")
    print("| path | median s | speed-up vs diffusers (median of per-round ratios) |\n|---|---|---|")
    for name, ts in times.items():
        ratio = statistics.median(b / t for b, t in zip(base, ts))
        print(f"| {name} | {statistics.median(ts):.2f} | {ratio:.2f}x |")


def bench_train(args) -> None:
    packaged = load_default()
    ours = type(packaged.model)(packaged.model.config)
    theirs = diffusers_unet()
    x = torch.randn(64, 1, 28, 28)
    t = torch.randint(0, 1000, (64,))
    noise = torch.randn_like(x)

    def step_fn(model, call, bf16: bool):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        model.train()

        def step():
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                out = call(model)
            loss = (out[:, :1].float() - noise).square().mean()
            loss.backward()
            optimizer.step()
        return step

    options = {"diffcore fp32": step_fn(ours, lambda m: m(x, t), False),
               "diffcore bf16 autocast": step_fn(ours, lambda m: m(x, t), True),
               "diffusers fp32": step_fn(theirs, lambda m: m(x, t).sample, False)}
    for fn in options.values():
        fn()
    times = {name: [] for name in options}
    for _ in range(args.rounds):
        for name, fn in options.items():
            times[name].append(timed(fn))
    base = times["diffusers fp32"]
    print(f"\ntraining step, batch 64; {machine()}")
    print("| path | median ms | speed-up vs diffusers fp32 |\n|---|---|---|")
    for name, ts in times.items():
        ratio = statistics.median(b / s for b, s in zip(base, ts))
        print(f"| {name} | {1e3 * statistics.median(ts):.0f} | {ratio:.2f}x |")


def bench_fid(args) -> None:
    from diffcore.data import load_fashion_mnist
    from diffcore.metrics import score_samples

    packaged = load_default()
    real = load_fashion_mnist("test")[0]  # uint8 [10000, 28, 28]
    runs = [(p, int(seed)) for p, seed in (item.split(":") for item in args.runs.split(","))]
    samples = {}
    for precision, seed in runs:
        start = time.perf_counter()
        samples[precision, seed] = diffcore.sample(packaged.model, n=args.n, seed=seed, diffusion=packaged.diffusion,
                                                   progress=False, precision=precision, sampler="ddim")
        print(f"{precision} seed {seed}: {args.n} samples in {time.perf_counter() - start:.0f} s", flush=True)
    if ("fp32", args.seed) in samples and ("bf16", args.seed) in samples:
        diff = (samples["bf16", args.seed] - samples["fp32", args.seed]).abs()
        print(f"pixels: mean |bf16 - fp32| {diff.mean():.4f}, fraction > 1/127.5: "
              f"{(diff > 1 / 127.5).float().mean():.3f}")
    print(f"\nFID in the project's classifier features, {args.n} samples each; {machine()}")
    names = [f"FID {p} seed {s}" for p, s in runs]
    print(f"| reference split | {' | '.join(names)} | FID held-out real (floor) |\n|---{'|---' * (len(runs) + 1)}|")
    table = []
    for split in range(args.splits):
        options = dict(with_floor=True, seed=split, kid_subset_size=min(1000, args.n))
        scores = [score_samples(samples[run], real, **options) for run in runs]
        table.append([s.fid for s in scores] + [scores[0].floor.fid])
        print(f"| {split} | {' | '.join(f'{v:.3f}' for v in table[-1])} |", flush=True)
    for i, name in enumerate(names[1:], 1):
        d = [row[i] - row[0] for row in table]
        print(f"{name} - {names[0]}: median {statistics.median(d):+.3f} (range {min(d):+.3f}..{max(d):+.3f})")
    floors = [row[-1] for row in table]
    print(f"floor {statistics.mean(floors):.3f} +- {statistics.stdev(floors) if len(floors) > 1 else 0:.3f} (sd over "
          f"splits)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("sample", "train", "fid"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n", type=int, default=None, help="images (sample: 64, fid: 500)")
    parser.add_argument("--seed", type=int, default=0, help="fid: the seed of the fp32/bf16 pixel comparison")
    parser.add_argument("--runs", default="fp32:0,bf16:0,fp32:1",
                        help="fid: precision:seed runs; the first is the baseline (fp32 at another seed gives the "
                        "sampling noise of FID)")
    parser.add_argument("--splits", type=int, default=5, help="fid: disjoint reference splits")
    parser.add_argument("--compile", action="store_true",
                        help="sample: also compile=True, with the default precision and with fp32")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of both libraries")
    args = parser.parse_args()
    args.n = args.n or (500 if args.what == "fid" else 64)
    torch.set_num_threads(args.threads)
    {"sample": bench_sample, "train": bench_train, "fid": bench_fid}[args.what](args)


if __name__ == "__main__":
    main()
