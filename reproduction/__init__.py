"""The reproduction report (docs/reproduction.md): diffcore's own runs of the seed papers' claims on Fashion-MNIST,
computed by stages that store their numbers as JSON, and a writer that turns those into the markdown and its
figures. Run it with ``python scripts/reproduce.py`` (see :mod:`reproduction.cli`)."""
from reproduction.settings import ReproSettings

__all__ = ["ReproSettings"]
