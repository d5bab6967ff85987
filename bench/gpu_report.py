#!/usr/bin/env python
"""Measure diffcore's fused CUDA ops on this GPU; write a JSON file and a markdown summary to bench/results/.

What it measures, all in one run on one GPU (CUDA-event timings, median of repeats of back-to-back calls):
  * the device-to-device copy bandwidth (dst.copy_(src) of one 64M-element tensor), per dtype;
  * each fused op at 64M elements in fp32 and bf16 (cases in bench/cuda_op_cases.py): ms per op, bytes moved per
    second, that bandwidth as a fraction of the copy's (target >= 0.85), and the speedup over the eager
    pure-torch reference and over torch.compile of that reference (target >= 1.0);
  * checks: fused against reference at the benchmark size (largest |difference|), and the in-kernel Philox noise
    drawn on the GPU against the CPU kernels' for the same seed (largest |difference|, and bitwise repeatability).

Usage (on the GPU machine, after `pip install -e . --no-build-isolation` built the CUDA kernels):
    PYTHONPATH=tests python bench/gpu_report.py                      # the full report (a few minutes, mostly torch.compile)
    PYTHONPATH=tests python bench/gpu_report.py --quick              # 4M elements, fewer repeats: a smoke test
    PYTHONPATH=tests python bench/gpu_report.py --no-compile --dtypes fp32 --numel 16777216 --out /tmp/results
A failing case is recorded with its error and the run goes on. Exit status: 0 on success, 2 when no GPU or no
CUDA kernels, 1 when any measurement or check failed.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import torch

import cuda_op_cases as C  # noqa: E402  (bench/ is sys.path[0] when run as a script)

from diffcore import ops  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
COPY_TARGET, COMPILED_TARGET = 0.85, 1.0


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def environment(device: str) -> dict:
    """Device, driver, CUDA, torch, diffcore build and date: what the numbers depend on."""
    import diffcore

    root = Path(__file__).resolve().parents[1]
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        driver = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]).splitlines()
        hardware = {"device": props.name, "compute_capability": f"{props.major}.{props.minor}",
                    "multiprocessors": props.multi_processor_count,
                    "memory_gib": round(props.total_memory / 2**30, 1),
                    "driver_version": driver[0] if driver else "unknown (nvidia-smi not found)"}
    else:  # --cpu-dry-run
        hardware = {"device": f"CPU dry run ({platform.processor() or platform.machine()})", "compute_capability": "-",
                    "multiprocessors": os.cpu_count(), "memory_gib": "-", "driver_version": "-"}
    return {
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        **hardware,
        "cuda_runtime": torch.version.cuda,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "diffcore_build": diffcore.build_info(),
        "git_commit": _run(["git", "-C", str(root), "rev-parse", "HEAD"]) or "unknown",
    }


def noise_check(dtype: torch.dtype, device: str) -> dict:
    """The same seed on CPU and GPU: ddpm_step of x = eps = 0 at t = T-1 returns sigma * z, so it compares z."""
    from op_cases import make_table

    table = make_table(1000)
    x = torch.zeros(64, 3, 32, 33, dtype=dtype)  # inner not a multiple of 4: partial Philox groups too
    t = torch.full((64,), 999)
    run = lambda device: ops.ddpm_step(x.to(device), x.to(device), t.to(device), table.to(device), seed=1234,
                                       offset=7, impl="fused")[0]
    cpu, gpu, gpu_again = run("cpu"), run(device), run(device)
    return {"dtype": str(dtype).replace("torch.", ""),
            "max_abs_difference_cpu_gpu": C.max_abs_difference(cpu, gpu.cpu()),
            "scale_of_values": cpu.abs().max().item(), "gpu_bitwise_repeatable": bool(torch.equal(gpu, gpu_again))}


def measure(args) -> dict:
    device = "cpu" if args.cpu_dry_run else "cuda"
    timer = C.time_host if args.cpu_dry_run else C.time_cuda
    empty_cache = (lambda: None) if args.cpu_dry_run else torch.cuda.empty_cache
    shape = C.shape_for(args.numel)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    impls = [i for i in C.IMPLS if not (args.no_compile and i == "compiled")]
    selected = [case for case in C.cases() if not args.ops or re.search(args.ops, case.name)]
    timing = dict(iters=args.iters, repeats=args.repeats, warmup=3)
    report = {"environment": environment(device), "numel": args.numel, "shape": list(shape), "timing": timing,
              "targets": {"fraction_of_copy": COPY_TARGET, "speedup_vs_compiled": COMPILED_TARGET},
              "copy": {}, "ops": [], "checks": {"noise": [], "errors": []}}
    from tqdm import tqdm

    progress = tqdm(total=len(dtypes) * (1 + len(selected) * len(impls)), disable=args.no_progress, unit="timing")
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        itemsize = torch.empty((), dtype=dtype).element_size()
        progress.set_description(f"copy {dtype_name}")
        copy_s = timer(C.copy_call(dtype, shape, device), **timing)
        copy_bw = 2 * args.numel * itemsize / copy_s
        report["copy"][dtype_name] = {"ms": copy_s * 1e3, "gb_per_s": copy_bw / 1e9}
        empty_cache()
        progress.update()
        for case in selected:
            row = {"op": case.name, "dtype": dtype_name, "bytes_moved": case.elements_moved * args.numel * itemsize,
                   "ms": {}, "errors": {}}
            try:
                inputs = case.build(dtype, shape, device)
                calls = case.calls(inputs)
                row["max_abs_difference_fused_vs_reference"] = C.max_abs_difference(calls["fused"](),
                                                                                    calls["reference"]())
            except Exception as error:  # noqa: BLE001 - recorded in the report, the run goes on
                row["errors"]["setup"] = f"{type(error).__name__}: {error}"
                calls = {}
            for impl in impls:
                progress.set_description(f"{case.name} {dtype_name} {impl}")
                if impl in calls:
                    try:
                        row["ms"][impl] = timer(calls[impl], **timing) * 1e3
                    except Exception as error:  # noqa: BLE001
                        row["errors"][impl] = f"{type(error).__name__}: {error}"
                        traceback.print_exc()
                progress.update()
            calls = inputs = None
            empty_cache()
            fused = row["ms"].get("fused")
            if fused:
                bandwidth = row["bytes_moved"] / (fused / 1e3)
                row["gb_per_s"] = bandwidth / 1e9
                row["fraction_of_copy"] = bandwidth / copy_bw
                for impl, key in [("reference", "speedup_vs_eager"), ("compiled", "speedup_vs_compiled")]:
                    if impl in row["ms"]:
                        row[key] = row["ms"][impl] / fused
            report["ops"].append(row)
            if row["errors"]:
                report["checks"]["errors"].append({"op": case.name, "dtype": dtype_name, **row["errors"]})
    progress.close()
    for dtype in (torch.float32, torch.float64):
        try:
            report["checks"]["noise"].append(noise_check(dtype, device))
        except Exception as error:  # noqa: BLE001
            report["checks"]["errors"].append({"op": "noise check", "error": f"{type(error).__name__}: {error}"})
    return report


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        f"# diffcore CUDA ops on {env['device']}",
        "",
        f"- date (UTC): {env['date_utc']}; git commit: `{env['git_commit']}`",
        f"- device: {env['device']} (sm_{env['compute_capability'].replace('.', '')}, {env['multiprocessors']} SMs, "
        f"{env['memory_gib']} GiB); driver {env['driver_version']}; CUDA runtime {env['cuda_runtime']}",
        f"- torch {env['torch_version']}; python {env['python']}; diffcore build: "
        f"`{json.dumps({k: env['diffcore_build'].get(k) for k in ('version', 'with_cuda', 'cuda_archs')})}`",
        f"- size: {report['numel']:,} elements per image-like tensor (shape {tuple(report['shape'])}); timing: "
        f"median of {report['timing']['repeats']} CUDA-event timings of {report['timing']['iters']} back-to-back "
        "calls",
        "- bytes moved = the tensors one fused pass must read and write; copy = `dst.copy_(src)` (2 x numel "
        "elements) measured in the same run",
        f"- targets: fused >= {COPY_TARGET:.0%} of the copy bandwidth; fused no slower than torch.compile of the "
        "reference (speedup >= 1)",
        "",
        "| dtype | copy GB/s |",
        "|---|---:|",
    ]
    lines += [f"| {d} | {c['gb_per_s']:.0f} |" for d, c in report["copy"].items()]
    lines += ["", "| op | dtype | fused ms | GB/s | of copy | vs eager | vs compiled | max abs diff vs ref | ok |",
              "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for row in report["ops"]:
        frac, compiled = row.get("fraction_of_copy"), row.get("speedup_vs_compiled")
        ok = (frac is not None and frac >= COPY_TARGET) and (compiled is None or compiled >= COMPILED_TARGET)
        lines.append(f"| {row['op']} | {row['dtype']} | {_fmt(row['ms'].get('fused'), '.3f')} | "
                     f"{_fmt(row.get('gb_per_s'), '.0f')} | {_fmt(frac, '.2f')} | "
                     f"{_fmt(row.get('speedup_vs_eager'), '.2f')}x | {_fmt(compiled, '.2f')}x | "
                     f"{_fmt(row.get('max_abs_difference_fused_vs_reference'), '.2e')} | "
                     f"{'yes' if ok else ('ERROR' if row['errors'] else 'no')} |")
    lines += ["", "## In-kernel noise: GPU against CPU, same seed", "",
              "| dtype | max abs diff | max abs value | GPU bitwise repeatable |", "|---|---:|---:|---|"]
    for check in report["checks"]["noise"]:
        lines.append(f"| {check['dtype']} | {check['max_abs_difference_cpu_gpu']:.2e} | "
                     f"{check['scale_of_values']:.2f} | {check['gpu_bitwise_repeatable']} |")
    if report["checks"]["errors"]:
        lines += ["", "## Errors", ""] + [f"- `{json.dumps(e)}`" for e in report["checks"]["errors"]]
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--numel", type=int, default=C.NUMEL_64M, help="elements per tensor (multiple of 16384)")
    parser.add_argument("--dtypes", default="fp32,bf16", help=f"comma-separated, of {', '.join(DTYPES)}")
    parser.add_argument("--ops", default="", help="regular expression selecting op cases by name")
    parser.add_argument("--iters", type=int, default=10, help="back-to-back calls per timing")
    parser.add_argument("--repeats", type=int, default=7, help="timings per measurement (median reported)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile of the reference")
    parser.add_argument("--quick", action="store_true", help="4M elements, 3 repeats: a smoke test")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"), help="output folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="run the whole script on CPU at 64K elements without compile (checks the script itself)")
    args = parser.parse_args(argv)
    if args.quick:
        args.numel, args.repeats = 4 * 2**20, 3
    if args.cpu_dry_run:
        args.numel, args.repeats, args.iters, args.no_compile = 4 * 16384, 3, 2, True
        args.out = args.out if args.out != parser.get_default("out") else str(Path(tempfile.gettempdir()))
    bad = [d for d in args.dtypes.split(",") if d.strip() and d.strip() not in DTYPES]
    if bad:
        parser.error(f"--dtypes: unknown {bad}, expected some of {list(DTYPES)}")
    if not args.cpu_dry_run and not torch.cuda.is_available():
        print("gpu_report: no CUDA device visible to torch (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    if not ops.fused_available("cpu" if args.cpu_dry_run else "cuda"):
        from diffcore import extension

        print(f"gpu_report: diffcore was built without CUDA kernels ({extension.build_info()}); "
              f"{extension.BUILD_HINT}", file=sys.stderr)
        return 2
    report = measure(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = re.sub(r"[^A-Za-z0-9]+", "-", report["environment"]["device"]).strip("-").lower()
    stem = f"gpu_ops_{device}_{dt.datetime.now(dt.timezone.utc):%Y%m%d-%H%M%S}"
    _write_atomic(out / f"{stem}.json", json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    _write_atomic(out / f"{stem}.md", text)
    print(text)
    print(f"wrote {out / stem}.json and .md")
    return 1 if report["checks"]["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
