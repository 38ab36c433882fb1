"""Datasets (one module each), paired transforms, batching and the synthetic demo set.

``get_dataset(name, root=..., split=...)`` builds any registered dataset: ``voc``, ``sbd``, ``seg11valid``,
``nyud`` (``modality=rgb|hha|rgbd|rgb-hha``), ``siftflow`` (``target=semantic|geometric|both``), ``folder`` and
``synthetic``.
"""

from .base import IGNORE_INDEX, SegmentationDataset, get_dataset, list_datasets, register_dataset

__all__ = ["IGNORE_INDEX", "SegmentationDataset", "get_dataset", "list_datasets", "register_dataset"]
