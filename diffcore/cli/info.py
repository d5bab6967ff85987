"""``diffcore info``: versions, what was built, which devices are visible (JSON)."""
from __future__ import annotations

import argparse
import json
import platform
from typing import Any

import torch


def register(sub) -> None:
    """Add the ``info`` subcommand to the subparsers ``sub``."""
    p = sub.add_parser("info", help="build, kernels and devices (JSON)",
                       description="Print what was built (C++/CUDA kernels), which devices are visible and versions.")
    p.set_defaults(run=run)


def info() -> dict[str, Any]:
    """Versions, build information of the C++/CUDA extension, fused-kernel availability per device type, the
    visible devices and whether a packaged default model is installed."""
    from .. import __version__, build_info
    from ..extension import has_fused_kernels
    from ..pretrained import default_model_path

    cuda = torch.cuda.is_available()
    devices = [{"index": i, "name": torch.cuda.get_device_name(i),
                "capability": ".".join(map(str, torch.cuda.get_device_capability(i))),
                "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)}
               for i in range(torch.cuda.device_count())] if cuda else []
    ops = list(build_info().get("ops", []))
    return {"diffcore": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "build": build_info(),
            "kernels": {"cpu": has_fused_kernels("cpu"), "cuda": has_fused_kernels("cuda") if cuda else False,
                        "ops": ops},
            "devices": {"cuda_available": cuda, "cuda_version": torch.version.cuda, "gpus": devices,
                        "cpu_threads": torch.get_num_threads()},
            "packaged_model": (default_model_path() / "manifest.json").is_file()}


def run(args: argparse.Namespace) -> int:
    """Print :func:`info` as JSON."""
    print(json.dumps(info(), indent=2, default=str))
    return 0
