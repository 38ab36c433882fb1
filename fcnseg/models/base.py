"""The contract every fcnseg model keeps, and what every consumer reads instead of guessing.

A segmentation model here is a module that maps N x C x H x W normalised images to N x K x H x W scores, K the sum
of its heads' classes (one head for most; SIFT Flow's net has a semantic and a geometric one, concatenated in head
order). Besides ``forward`` it declares what it predicts (heads, class names, colours), what it takes (channels,
preprocessing), its geometry (alignment, stride, the padded size it computes on) and how it was built. The CLI,
evaluation, the report, the server, export and bench read these; inference itself goes through
:class:`fcnseg.inference.Predictor`, which ``predict`` and ``predict_proba`` use with the CLI's ``auto`` choice.
"""

from __future__ import annotations

import contextlib
import os
from abc import abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn

from ..errors import FcnsegError
from ..palette import palette_for
from ..preprocessing import Preprocessing
from .upsampling import matrix_upsampling

if TYPE_CHECKING:
    from ..inference import Predictor

# Attributes that cache execution paths built for ``predict``: never saved, pickled or deep-copied with the model.
_CACHES = ("_runners",)


class SegmentationModel(nn.Module):
    """Base of :class:`~fcnseg.models.fcn.FCN` and :class:`~fcnseg.models.multi.LateFusionFCN`.

    Attributes every model carries: ``preprocessing`` (its input normalisation, every channel), ``classes`` and
    ``palette`` (the first head's class names and colours, None where not recorded), ``head_classes`` (class names
    of the other heads) and ``build_config`` (registry name and options; set by the registry's builders).
    """

    preprocessing: Preprocessing
    head_classes: dict[str, list[str] | None]

    def __init__(self) -> None:
        super().__init__()
        self.classes: list[str] | None = None
        self.palette: list[list[int]] | None = None
        self.build_config: dict[str, Any] | None = None
        self._runners: dict[str, Any] = {}

    # -- declared by each model ------------------------------------------------------------------------------
    @property
    @abstractmethod
    def heads(self) -> dict[str, int]:
        """Classes per head, in the order ``forward`` concatenates their scores."""

    @property
    @abstractmethod
    def in_channels(self) -> int:
        """Input channels: 3 for colour, more where depth or HHA follow (fusion nets)."""

    @property
    @abstractmethod
    def alignment(self) -> str:
        """``caffe`` (the release's pad-100 and crops) or ``aligned``."""

    @property
    @abstractmethod
    def stride(self) -> int:
        """Output stride of the deepest scores (32 for VGG16): tile origins and sizes are multiples of it."""

    @abstractmethod
    def float_layers(self) -> list[str]:
        """Parameter-name prefixes int8 quantisation keeps in float: where little compute buys much accuracy."""

    @abstractmethod
    def rescaled_pairs(self) -> list[tuple[str, str]]:
        """Pairs (a, b) of parameter-name prefixes: a convolution int8 keeps in float whose output reaches the
        quantised convolution b through ReLUs and max poolings only. Both commute with a positive scale per
        channel, so int8 may divide a's output channels by any such scales and multiply b's input channels by
        them without changing the function (:func:`fcnseg.runtime.rescale.rescaled_onnx`)."""

    @abstractmethod
    def padded_size(self, height: int, width: int) -> tuple[int, int]:
        """(rows, columns) of the largest array, in input pixels, the network computes on for an image of
        ``height`` x ``width``: its padding step and its first layer's extra padding included."""

    # -- derived ---------------------------------------------------------------------------------------------
    def export_form(self) -> contextlib.AbstractContextManager[None]:
        """Within, the model computes as it is exported (ONNX): its fixed bilinear last upsamplings as matrix
        products that compute only the pixels kept (:func:`~fcnseg.models.upsampling.matrix_upsampling`)."""
        return matrix_upsampling(self)

    @property
    def num_classes(self) -> int:
        """The first head's number of classes."""
        return next(iter(self.heads.values()))

    def class_names(self) -> dict[str, list[str]]:
        """Each head's class names in index order: those recorded (the first head's in ``classes``), or
        ``class <i>`` where none, or not as many as the head has classes, are recorded."""
        recorded = self.head_classes or {}
        names = {}
        for i, (head, n) in enumerate(self.heads.items()):
            known = list(recorded.get(head) or (self.classes if i == 0 else None) or [])
            names[head] = known if len(known) == n else [f"class {k}" for k in range(n)]
        return names

    def class_colors(self) -> dict[str, np.ndarray]:
        """Each head's class colours, classes x 3 uint8: the first head's recorded palette, else colours for the
        class names (:func:`~fcnseg.palette.palette_for`: VOC's for VOC's names)."""
        (first, n), *others = self.heads.items()
        names = self.head_classes or {}
        colors = {first: np.asarray(self.palette or palette_for(self.classes, n), np.uint8)}
        colors.update({head: np.asarray(palette_for(names.get(head) or None, k), np.uint8) for head, k in others})
        return colors

    def check_head(self, head: str | None) -> str:
        """``head`` if the model has it (None: the only head); else a one-line FcnsegError naming the heads."""
        if head is None:
            if len(self.heads) > 1:
                raise FcnsegError(
                    f"this model has {len(self.heads)} heads ({', '.join(self.heads)}): name one with head=..., or "
                    "ask for every head's mask"
                )
            return next(iter(self.heads))
        if head not in self.heads:
            raise FcnsegError(f"head {head!r}: this model's heads are {', '.join(self.heads)}")
        return head

    # -- inference -------------------------------------------------------------------------------------------
    def predictor(self, runtime: Any = "auto", **options: Any) -> Predictor:
        """The :class:`~fcnseg.inference.Predictor` of this model on ``runtime`` (default ``auto``, the CLI's
        choice for this CPU). Execution paths are built once and kept with the model until its weights change."""
        from ..inference import Predictor

        return Predictor(self, runtime=runtime, **options)

    def predict(self, image: Any, *, head: str | None = None, **options: Any) -> np.ndarray | dict[str, np.ndarray]:
        """Class indices, H x W, at the image's own size (path, PIL image or H x W x C uint8 array). A model of
        several heads gives ``{head: mask}``, or the mask of ``head``.

        Options as :class:`~fcnseg.inference.Predictor`: ``runtime`` (default ``auto``), ``tile``, ``overlap``,
        ``flip``, ``scales``, ``verbose`` (say which path ``auto`` took)."""
        return self._one(self.predictor(**options).masks([image])[0], head)

    def predict_proba(
        self, image: Any, *, head: str | None = None, **options: Any
    ) -> np.ndarray | dict[str, np.ndarray]:
        """Class probabilities, C x H x W float32 (each head's sum to 1); ``{head: probabilities}`` for a model of
        several heads unless ``head`` names one. Options as :meth:`predict`."""
        return self._one(self.predictor(**options).proba([image])[0], head)

    def _one(self, per_head: dict[str, np.ndarray], head: str | None) -> np.ndarray | dict[str, np.ndarray]:
        if head is None and len(per_head) > 1:
            return per_head
        return per_head[self.check_head(head)]

    # -- the Hugging Face Hub ---------------------------------------------------------------------------------
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        metrics: str | os.PathLike | Mapping[str, Any] | None = None,
        license: str | None = None,
        datasets: str | Sequence[str] | None = None,
        tags: Sequence[str] = (),
        **card: Any,
    ) -> Path:
        """Write this model into ``save_directory`` as a Hub repository: ``model.safetensors``, ``config.json``
        and a ``README.md`` model card (``metrics``: an evaluation, ``fcnseg eval --out``'s folder, measured on the
        first of ``datasets``). ``fcnseg.from_pretrained(save_directory)`` reads it back. Options as
        :func:`fcnseg.pretrained.save_pretrained`; needs ``pip install 'fcnseg[hub]'``."""
        from ..pretrained import save_pretrained

        return save_pretrained(
            self, save_directory, metrics=metrics, license=license, datasets=datasets, tags=tags, **card
        )

    def push_to_hub(self, repo_id: str, *, private: bool = False, **options: Any) -> str:
        """Upload this model to the Hub repository ``repo_id`` (created if need be, ``private`` then), as
        :meth:`save_pretrained` writes it; returns the repository's URL. The token is huggingface_hub's own
        (``HF_TOKEN`` or ``hf auth login``). Options as :func:`fcnseg.pretrained.push_to_hub`."""
        from ..pretrained import push_to_hub

        return push_to_hub(self, repo_id, private=private, **options)

    # -- the cache of execution paths is the model's own business -------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in _CACHES:
            state[name] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("_runners", {})
        super().__setstate__(state)

    def _apply(self, fn: Any, recurse: bool = True) -> SegmentationModel:
        # .to(), .cuda(), .half(): a path built for the old device or dtype is stale.
        self._runners = {}
        return super()._apply(fn, recurse)


__all__ = ["SegmentationModel"]
