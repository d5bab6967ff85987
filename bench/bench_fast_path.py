"""The U-Net's inference fast path (fused GroupNorm + scale-shift + SiLU, activations in channels_last) against the
same model with it switched off (torch's GroupNorm, SiLU and addcmul in NCHW), side by side.

    OMP_NUM_THREADS=1 python bench/bench_fast_path.py [--batch 64] [--pairs 7] [--precision fp32 bf16]

Packaged model, one thread; for each precision the two paths alternate (A, B, A, B, ...) and the script prints the
median of the per-pair ratios off / on, the max |difference| of the outputs relative to max |output|, and the load
average. "off" is what diffcore ran before the fused op (bench/RESULTS.md).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from contextlib import contextmanager

import torch

import diffcore.unet.blocks as blocks
import diffcore.unet.model as unet_model
from diffcore.pretrained import load_default


@contextmanager
def fast_path(enabled: bool):
    """Switch the U-Net's fused-GroupNorm / channels_last decision on or off for the duration."""
    saved = blocks.fused_group_norm
    if not enabled:
        blocks.fused_group_norm = unet_model.fused_group_norm = lambda x: False
    try:
        yield
    finally:
        blocks.fused_group_norm = unet_model.fused_group_norm = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=7)
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    args = parser.parse_args()
    model = load_default().model.eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 1, 28, 28, generator=gen)
    t = torch.randint(0, 1000, (args.batch,), generator=gen)
    for precision in args.precision:
        autocast = torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16")

        def call(enabled: bool) -> tuple[float, torch.Tensor]:
            with fast_path(enabled), torch.inference_mode(), autocast:
                start = time.perf_counter()
                out = model(x, t)
                return time.perf_counter() - start, out.float()

        _, off = call(False)
        _, on = call(True)
        ratios, times_off, times_on = [], [], []
        for _ in range(args.pairs):
            a, _ = call(False)
            b, _ = call(True)
            ratios.append(a / b)
            times_off.append(a)
            times_on.append(b)
        error = ((on - off).abs().max() / off.abs().max()).item()
        print(f"{precision} batch {args.batch}: off {statistics.median(times_off) * 1e3:.1f} ms, on "
              f"{statistics.median(times_on) * 1e3:.1f} ms, off/on {statistics.median(ratios):.2f}x "
              f"({min(ratios):.2f}-{max(ratios):.2f}), rel. max diff {error:.1e}, load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    main()
