"""``python -m diffcore.cli`` (e.g. under ``torchrun ... -m diffcore.cli train``)."""
import sys

from . import main

sys.exit(main())
