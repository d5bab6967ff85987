import sys

from reproduction.cli import main

sys.exit(main())
