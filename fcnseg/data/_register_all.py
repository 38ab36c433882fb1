"""Importing this module registers every built-in dataset (each module registers itself on import)."""

from . import folder, nyud, sbd, seg11valid, siftflow, synthetic, voc  # noqa: F401
