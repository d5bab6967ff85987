#!/usr/bin/env python
"""Re-run the reproduction report: every number in docs/reproduction.md comes from here.

The report's code is the top-level package ``reproduction/`` of this repository (it is not installed with diffcore):
``python scripts/reproduce.py ...`` and ``python -m reproduction ...`` (from the repository root) are the same
command. See reproduction/cli.py for the options (``--list``, ``--stages``, ``--preset quick``)."""
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, where reproduction/ lives
    from reproduction.cli import main

    sys.exit(main())
