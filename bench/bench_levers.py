"""Speed levers for the packaged model's U-Net forward at batch 64, each against fp32 eager, side by side.

    OMP_NUM_THREADS=1 python bench/bench_levers.py LEVER [--base bf16] [--rounds 7] [--threads 1] [--batch 64]

LEVER is one of :data:`LEVERS`. The script builds the lever's callable, times its first call (compiles; with a
warm ``TORCHINDUCTOR_CACHE_DIR`` it loads the cache instead), checks its output against fp32 eager (max |diff|,
relative to max |fp32|), then alternates eager fp32 and the lever (A, B, A, B, ...) and prints the median of the
per-pair ratios eager / lever with the load average. ``--base bf16`` times bf16-autocast eager as the A side instead
(outputs are still checked against fp32 eager). One lever per process.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch

from bench_end_to_end import timed
from diffcore.pretrained import load_default
from diffcore.runtime import compile_model

#: ``compile*``: ``compile_model``; ``freeze*``: with ``torch._inductor.config.freezing`` set for the process (dynamo
#: then turns the weights into constants; passing ``freezing`` in ``torch.compile(options=...)`` alone does not);
#: ``*_bf16``: under bf16 autocast; ``*_cpp``: inductor's C++ wrapper; ``*_autotune``: max-autotune-no-cudagraphs
LEVERS = ("bf16", "jit_freeze", "jit_freeze_cl", "eager_cl", "compile", "compile_bf16", "compile_cpp",
          "compile_bf16_cpp", "compile_bf16_autotune", "freeze", "freeze_bf16")


def build(lever: str, model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor):
    """The lever's ``call() -> [B, 2, 28, 28]`` float32 output (runs under inference mode / no_grad)."""
    bf16 = "bf16" in lever
    autocast = torch.autocast("cpu", torch.bfloat16, enabled=bf16)
    if lever == "bf16":
        def call():
            with torch.inference_mode(), autocast:
                return model(x, t).float()
        return call
    if lever in ("jit_freeze", "jit_freeze_cl"):
        xx = x.contiguous(memory_format=torch.channels_last) if lever.endswith("_cl") else x
        with torch.no_grad():
            traced = torch.jit.trace(model, (xx, t), check_trace=False)
            frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
        def call():
            with torch.no_grad():
                return frozen(xx, t)
        return call
    if lever == "eager_cl":
        cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
        xx = x.contiguous(memory_format=torch.channels_last)
        def call():
            with torch.inference_mode():
                return cl(xx, t)
        return call
    if lever.startswith("freeze"):
        torch._inductor.config.freezing = True
    options = {"cpp_wrapper": True} if lever.endswith("_cpp") else None
    mode = "max-autotune-no-cudagraphs" if lever.endswith("_autotune") else None
    compiled = compile_model(model, buckets=None, options=options, mode=mode)

    def call():
        with torch.no_grad(), autocast:
            return compiled(x, t).float()
    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("lever", choices=LEVERS)
    parser.add_argument("--base", choices=("fp32", "bf16"), default="fp32", help="the A side: eager fp32 or bf16")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_default().model.eval()
    torch.manual_seed(0)
    x = torch.randn(args.batch, 1, 28, 28)
    t = torch.randint(0, 1000, (args.batch,))

    def eager():
        with torch.inference_mode():
            return model(x, t)

    expected = eager()
    if args.base == "bf16":
        eager = build("bf16", model, x, t)
    start = time.perf_counter()
    lever = build(args.lever, model, x, t)
    got = lever()
    first = time.perf_counter() - start
    err = (got.float() - expected).abs().max().item() / expected.abs().max().item()
    lever()  # second call: jit's profiling executor optimizes on the first runs
    pairs = []
    for _ in range(args.rounds):
        a = timed(eager)
        pairs.append((a, timed(lever)))
    ratio = statistics.median(a / b for a, b in pairs)
    print(f"{args.lever} vs eager {args.base}: threads {args.threads}, batch {args.batch}, first call {first:.1f} s, "
          f"max|diff|/max|ref| {err:.2e}, eager {1e3 * statistics.median(a for a, _ in pairs):.0f} ms, lever "
          f"{1e3 * statistics.median(b for _, b in pairs):.0f} ms, ratio {ratio:.2f}x "
          f"(range {min(a / b for a, b in pairs):.2f}-{max(a / b for a, b in pairs):.2f}), load {os.getloadavg()}",
          flush=True)


if __name__ == "__main__":
    main()
