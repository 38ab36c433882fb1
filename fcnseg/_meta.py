"""Class names and input means of the datasets, in one leaf module that models and data both read.

As torchvision's ``models/_meta.py``: the published weights (:mod:`fcnseg.models.weights`) record the classes and
input of the datasets they were trained on, and the dataset modules (:mod:`fcnseg.data`) read files labelled with
the same classes; neither imports the other for them. This module imports nothing from fcnseg.
"""

from __future__ import annotations

__all__ = [
    "IGNORE_INDEX",
    "NYUD_CLASSES",
    "NYUD_MEAN_BGR",
    "NYUD_MEAN_HHA",
    "NYUD_MEAN_LOG_DEPTH",
    "SIFTFLOW_ABSENT_IN_TEST",
    "SIFTFLOW_CLASSES",
    "SIFTFLOW_GEO_CLASSES",
    "SIFTFLOW_MEAN_BGR",
    "VOC_CLASSES",
]

# -- PASCAL VOC (and SBD, seg11valid) ---------------------------------------------------------------------------------

VOC_CLASSES: tuple[str, ...] = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
"""The 20 PASCAL VOC classes after ``background``; their colours are :func:`fcnseg.palette.voc_palette`'s."""

# -- NYUDv2 -----------------------------------------------------------------------------------------------------------

NYUD_CLASSES: tuple[str, ...] = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
    "picture", "counter", "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror", "floor mat",
    "clothes", "ceiling", "books", "refridgerator", "television", "paper", "towel", "shower curtain", "box",
    "whiteboard", "person", "night stand", "toilet", "sink", "lamp", "bathtub", "bag", "otherstructure",
    "otherfurniture", "otherprop",
)  # fmt: skip
"""The 40 classes of Gupta et al. in FCN's output order (``refridgerator`` spelt as in the release)."""

# The means of FCN's nyud_layers.py (0-255 pixels; BGR order for colour), for models that normalise like the release.
NYUD_MEAN_BGR: tuple[float, float, float] = (116.190, 97.203, 92.318)
NYUD_MEAN_HHA: tuple[float, float, float] = (132.431, 94.076, 118.477)
NYUD_MEAN_LOG_DEPTH = 7.844  # mean of log(depth in mm): about 2.55 m

# -- SIFT Flow --------------------------------------------------------------------------------------------------------

SIFTFLOW_CLASSES: tuple[str, ...] = (
    "awning", "balcony", "bird", "boat", "bridge", "building", "bus", "car", "cow", "crosswalk", "desert",
    "door", "fence", "field", "grass", "moon", "mountain", "person", "plant", "pole", "river", "road", "rock",
    "sand", "sea", "sidewalk", "sign", "sky", "staircase", "streetlight", "sun", "tree", "window",
)  # fmt: skip
"""The 33 semantic classes in FCN's output order (label k + 1 in the files is class k)."""
SIFTFLOW_GEO_CLASSES: tuple[str, ...] = ("sky", "horizontal", "vertical")
"""The 3 geometric classes (label k + 1 in the files is class k; -1 is void)."""
SIFTFLOW_ABSENT_IN_TEST: tuple[str, ...] = ("cow", "desert", "moon")
"""Semantic classes that never occur in the test set; the paper excludes them from the test metrics."""
# The mean of FCN's siftflow_layers.py (0-255 pixels, BGR order), for models that normalise like the release.
SIFTFLOW_MEAN_BGR: tuple[float, float, float] = (114.578, 115.294, 108.353)


IGNORE_INDEX = 255
"""Label of void pixels (object borders in VOC, unlabelled pixels elsewhere): ignored by loss and metrics."""
