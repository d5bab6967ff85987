"""``python scripts/reproduce.py`` / ``python -m reproduction``: run the stages, then write the report.

    python scripts/reproduce.py                       # everything, full sizes (hours on a CPU)
    python scripts/reproduce.py --stages ddim-table1  # one stage (stored results of the others are kept)
    python scripts/reproduce.py --report-only         # rewrite docs/reproduction.md from stored results
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

import torch


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reproduce", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=("full", "quick"), default="full",
                        help="experiment sizes: full (the committed report) or quick (seconds; smoke test)")
    parser.add_argument("--out", default="docs/reproduction",
                        help="report folder: results/*.json and figures/*.png (default docs/reproduction)")
    parser.add_argument("--report", default=None,
                        help="the markdown file (default: <out>.md, i.e. docs/reproduction.md)")
    parser.add_argument("--work-dir", default="runs/reproduction", help="where the small models are trained")
    parser.add_argument("--stages", nargs="*", default=None,
                        help="run only these stages (default: all); see --list")
    parser.add_argument("--list", action="store_true", help="list the stages and exit")
    parser.add_argument("--force", action="store_true", help="recompute stages even when stored results match")
    parser.add_argument("--report-only", action="store_true", help="only write the report from stored results")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from reproduction.context import Context
    from reproduction.report import write_report
    from reproduction.settings import ReproSettings
    from reproduction.stages import all_stages, run_stage

    args = build_parser().parse_args(argv)
    settings = ReproSettings.preset(args.preset)
    stages = all_stages(settings)
    names = [stage.name for stage in stages]
    if args.list:
        print("\n".join(names))
        return 0
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads: expected an int >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    unknown = sorted(set(args.stages or ()) - set(names))
    if unknown:
        raise SystemExit(f"--stages: unknown stage(s) {', '.join(unknown)}; expected some of {', '.join(names)}")
    out = Path(args.out)
    ctx = Context(settings, out, Path(args.work_dir), progress=not args.no_progress, force=args.force)
    if not args.report_only:
        for stage in stages:
            if args.stages is None or stage.name in args.stages:
                print(f"[reproduce] {stage.name}", flush=True)
                run_stage(ctx, stage)
    if args.stages is None or args.report_only:
        report = Path(args.report) if args.report else out.with_suffix(".md")
        write_report(ctx, stages, report)
        print(f"[reproduce] wrote {report}")
    return 0
