"""Importing this module registers every built-in dataset (each module registers itself on import)."""

from . import folder, sbd, seg11valid, synthetic, voc  # noqa: F401
