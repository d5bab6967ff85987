#!/usr/bin/env python
"""Re-run the reproduction report: every number in docs/reproduction.md comes from here.
See diffcore/reproduction/cli.py for the options (``--list``, ``--stages``, ``--preset quick``)."""
import sys

from diffcore.reproduction.cli import main

if __name__ == "__main__":
    sys.exit(main())
