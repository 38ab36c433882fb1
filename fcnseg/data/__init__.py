"""Datasets (one module each), paired transforms, batching, the data check and the synthetic demo set.

``get_dataset(name, root=..., split=...)`` builds any registered dataset: ``voc``, ``sbd``, ``seg11valid``,
``nyud`` (``modality=rgb|hha|rgbd|rgb-hha``), ``siftflow`` (``target=semantic|geometric|both``), ``folder`` and
``synthetic``. Each dataset module registers itself when imported, and this package imports all of them, so the
registry is full as soon as any part of ``fcnseg.data`` is imported.
"""

from . import folder, nyud, sbd, seg11valid, siftflow, synthetic, voc
from .base import IGNORE_INDEX, SegmentationDataset, get_dataset, list_datasets, register_dataset

__all__ = [
    "IGNORE_INDEX",
    "SegmentationDataset",
    "folder",
    "get_dataset",
    "list_datasets",
    "nyud",
    "register_dataset",
    "sbd",
    "seg11valid",
    "siftflow",
    "synthetic",
    "voc",
]
