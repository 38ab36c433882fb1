"""Datasets (one module each), paired transforms, batching, the data check and the synthetic demo set.

``get_dataset(name, root=..., split=...)`` builds any registered dataset: ``voc``, ``sbd``, ``seg11valid``,
``nyud`` (``modality=rgb|hha|rgbd|rgb-hha``), ``siftflow`` (``target=semantic|geometric|both``), ``cityscapes``
(``mode=fine|coarse``), ``ade20k``, the annotation tools' exports ``coco`` (``crowd=void|ignore``), ``cvat`` and
``labelme``, the user's ``folder`` and ``synthetic``. Each dataset module registers itself when imported, and this
package imports all of them, so the registry is full as soon as any part of ``fcnseg.data`` is imported.
"""

from . import ade20k, cityscapes, coco, cvat, folder, labelme, nyud, sbd, seg11valid, siftflow, synthetic, voc
from .base import IGNORE_INDEX, SegmentationDataset, get_dataset, list_datasets, register_dataset

__all__ = [
    "IGNORE_INDEX",
    "SegmentationDataset",
    "ade20k",
    "cityscapes",
    "coco",
    "cvat",
    "folder",
    "get_dataset",
    "labelme",
    "list_datasets",
    "nyud",
    "register_dataset",
    "sbd",
    "seg11valid",
    "siftflow",
    "synthetic",
    "voc",
]
