"""Benchmark session setup: single-threaded CPU, and a table of fused-vs-reference ratios at the end.

Every benchmark sets ``benchmark.group`` to "<op> <size>" and ``benchmark.extra_info["impl"]`` to the path it
timed; the summary divides the reference median by the fused median within each group.
"""
from __future__ import annotations

import json
import os

import torch



def pytest_configure(config):
    torch.set_num_threads(1)


def _medians(config):
    session = getattr(config, "_benchmarksession", None)
    if session is None:
        return {}
    groups: dict = {}
    for bench in session.benchmarks:
        if not bench.stats or not getattr(bench.stats, "rounds", 0):
            continue
        impl = bench.extra_info.get("impl", bench.name)
        groups.setdefault(bench.group, {})[impl] = bench.stats.median
    return groups


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    groups = _medians(config)
    rows = []
    for group, medians in sorted(groups.items(), key=lambda kv: str(kv[0])):
        base = medians.get("reference")
        for impl, median in sorted(medians.items()):
            if impl == "reference" or base is None:
                continue
            rows.append((group, impl, median, base, base / median))
    if not rows:
        return
    terminalreporter.section("diffcore: reference median / fused median (single thread)")
    terminalreporter.write_line(f"{'group':38s} {'path':22s} {'ms':>9s} {'ref ms':>9s} {'speedup':>8s}")
    for group, impl, median, base, ratio in rows:
        terminalreporter.write_line(f"{group:38s} {impl:22s} {median * 1e3:9.3f} {base * 1e3:9.3f} {ratio:7.2f}x")
    out = os.environ.get("DIFFCORE_BENCH_SUMMARY")
    if out:
        with open(out + ".tmp", "w") as f:
            json.dump([dict(group=g, impl=i, median_s=m, reference_median_s=b, speedup=r) for g, i, m, b, r in rows],
                      f, indent=2)
        os.replace(out + ".tmp", out)
