"""The four FCN segmentation metrics, from one confusion matrix accumulated over a whole set.

With ``n_ij`` the pixels of ground-truth class ``i`` predicted as ``j`` and ``t_i = sum_j n_ij``:

- pixel acc = ``sum_i n_ii / sum_i t_i``
- mean acc  = ``(1/n_cl) sum_i n_ii / t_i``
- mean IU   = ``(1/n_cl) sum_i n_ii / (t_i + sum_j n_ji - n_ii)``
- f.w. IU   = ``(sum_k t_k)^-1 sum_i t_i n_ii / (t_i + sum_j n_ji - n_ii)``

As in the paper's reference scorer, the matrix is summed over all images before any ratio is
taken (not averaged per image), labels outside ``[0, n)`` are void, and class means skip classes
whose value is undefined (NaN): accuracy is undefined for a class absent from the ground truth, IU
for a class absent from both ground truth and prediction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["ConfusionMatrix"]

_ArrayLike = torch.Tensor | np.ndarray


def _as_long_tensor(x: Any, what: str) -> torch.Tensor:
    """``x`` (tensor, array or nested list of integers) as an int64 tensor on its own device."""
    if isinstance(x, torch.Tensor):
        if x.dtype.is_floating_point or x.dtype.is_complex:
            raise TypeError(f"{what} must hold integer class indices, got dtype {x.dtype}")
        # Cast before any arithmetic: with uint8 labels, n * 255 would wrap around.
        return x.detach().long()
    arr = np.asarray(x)
    if arr.dtype.kind not in "biu":
        raise TypeError(f"{what} must hold integer class indices, got dtype {arr.dtype}")
    # ascontiguousarray: torch cannot wrap arrays with negative strides (np.flip, [::-1]).
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.int64))


def _nanmean(x: np.ndarray) -> float:
    """Mean of the non-NaN entries; NaN (without np.nanmean's warning) when there are none."""
    kept = x[~np.isnan(x)]
    return float(kept.mean()) if kept.size else math.nan


class ConfusionMatrix:
    """Pixel confusion matrix: ``mat[i, j]`` = pixels of ground-truth class i predicted as j.

    Feed it with :meth:`update` (one batch at a time), combine partial matrices with :meth:`merge`
    or :meth:`all_reduce`, and read the metrics with :meth:`compute` or :meth:`table`.
    """

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        *,
        device: torch.device | str | None = None,
        exclude: Sequence[int] = (),
    ) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.num_classes = num_classes
        self.class_names = self._check_names(class_names)
        # Classes left out of mean accuracy and mean IU (SIFT Flow's test set lacks three classes; the paper
        # excludes them). Pixel accuracy and f.w. IU count every pixel as before.
        self.exclude = tuple(sorted({int(c) for c in exclude}))
        if any(not 0 <= c < num_classes for c in self.exclude):
            raise ValueError(f"exclude: class indices must be in 0..{num_classes - 1}, got {list(exclude)}")
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
        # Without an explicit device the matrix follows the data of the first update, so that
        # counting CUDA batches needs no host transfer of the (large) label maps.
        self._placed = device is not None

    # ------------------------------------------------------------------ accumulation

    def update(self, pred: _ArrayLike, target: _ArrayLike) -> ConfusionMatrix:
        """Count one batch: ``pred`` and ``target`` are integer label maps of the same shape.

        Pixels whose target is outside ``[0, num_classes)`` (255 = void) are ignored.
        Returns ``self``.
        """
        p = _as_long_tensor(pred, "pred")
        t = _as_long_tensor(target, "target")
        if p.shape != t.shape:
            raise ValueError(
                f"pred and target must have the same shape, got pred {tuple(p.shape)} and target {tuple(t.shape)}"
            )
        if p.device != t.device:
            p = p.to(t.device)
        n = self.num_classes
        valid = (t >= 0) & (t < n)
        t = t[valid]
        p = p[valid]
        if p.numel():
            # One host sync for both bounds (each int() on a CUDA scalar would be its own sync).
            lo_v, hi_v = torch.stack(torch.aminmax(p)).tolist()
            # A prediction outside the classes cannot come from an argmax over num_classes scores:
            # the caller passed the wrong map or the wrong num_classes, so fail loudly rather than
            # silently dropping the pixel.
            if lo_v < 0 or hi_v >= n:
                bad = lo_v if lo_v < 0 else hi_v
                raise ValueError(f"prediction {bad} is outside the classes [0, {n}) on a pixel with a valid target")
        counts = torch.bincount(n * t + p, minlength=n * n).reshape(n, n)
        if not self._placed:
            self.mat = self.mat.to(counts.device)
            self._placed = True
        self.mat += counts.to(self.mat.device)
        return self

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add ``other``'s counts to this matrix (e.g. from another worker). Returns ``self``."""
        if not isinstance(other, ConfusionMatrix):
            raise TypeError(f"can only merge a ConfusionMatrix, got {type(other).__name__}")
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge confusion matrices of {self.num_classes} and {other.num_classes} classes")
        if other.exclude != self.exclude:
            raise ValueError(f"cannot merge confusion matrices excluding {self.exclude} and {other.exclude}")
        self.mat += other.mat.to(self.mat.device)
        if self.class_names is None:
            self.class_names = other.class_names
        return self

    def __iadd__(self, other: ConfusionMatrix) -> ConfusionMatrix:
        return self.merge(other)

    def __add__(self, other: ConfusionMatrix) -> ConfusionMatrix:
        if not isinstance(other, ConfusionMatrix):
            return NotImplemented
        return self.copy().merge(other)

    def __radd__(self, other: Any) -> ConfusionMatrix:
        # Lets ``sum(matrices)`` work: sum() starts from the integer 0.
        if isinstance(other, int) and other == 0:
            return self.copy()
        return NotImplemented

    def all_reduce(self, group: Any = None) -> ConfusionMatrix:
        """Sum the matrix over all ranks in place; a no-op unless torch.distributed is set up."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        buf = self.mat
        # NCCL only reduces CUDA tensors and gloo is meant for CPU ones: reduce a copy on the
        # backend's device and copy the sum back, so the matrix stays where it was.
        backend = dist.get_backend(group)
        if backend == "nccl" and buf.device.type != "cuda":
            buf = buf.to(torch.device("cuda", torch.cuda.current_device()))
        elif backend == "gloo" and buf.device.type != "cpu":
            buf = buf.cpu()
        buf = buf.contiguous()
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
        if buf is not self.mat:
            self.mat.copy_(buf)
        return self

    def reset(self) -> None:
        """Zero all counts (the device is kept)."""
        self.mat.zero_()

    def copy(self) -> ConfusionMatrix:
        """An independent copy (same device, names and counts)."""
        new = ConfusionMatrix(self.num_classes, self.class_names, device=self.mat.device, exclude=self.exclude)
        new.mat.copy_(self.mat)
        new._placed = self._placed
        return new

    # ------------------------------------------------------------------ results

    def compute(self) -> dict[str, Any]:
        """The four figures as fractions in [0, 1] plus per-class values (NaN where undefined).

        Keys: ``pixel_acc``, ``mean_acc``, ``mean_iu``, ``fw_iu`` (floats), ``per_class_iu``,
        ``per_class_acc`` (lists of floats) and ``pixels`` (ground-truth pixels per class, ints).
        """
        h = self.mat.detach().to("cpu", torch.float64).numpy()
        tp = np.diag(h)
        gt = h.sum(axis=1)  # t_i
        predicted = h.sum(axis=0)  # sum_j n_ji
        union = gt + predicted - tp
        total = gt.sum()
        # errstate: 0/0 is the intended NaN for undefined ratios, not something to warn about.
        with np.errstate(divide="ignore", invalid="ignore"):
            acc = np.where(gt > 0, tp / gt, np.nan)
            iu = np.where(union > 0, tp / union, np.nan)
        if total > 0:
            pixel_acc = float(tp.sum() / total)
            present = gt > 0  # for such classes union >= t_i > 0, so IU is defined
            fw_iu = float((gt[present] * iu[present]).sum() / total)
        else:
            pixel_acc = fw_iu = math.nan
        keep = np.ones(len(tp), dtype=bool)
        keep[list(self.exclude)] = False
        return {
            "pixel_acc": pixel_acc,
            "mean_acc": _nanmean(acc[keep]),
            "mean_iu": _nanmean(iu[keep]),
            "fw_iu": fw_iu,
            "per_class_iu": [float(v) for v in iu],
            "per_class_acc": [float(v) for v in acc],
            "pixels": [int(v) for v in self.mat.sum(dim=1).cpu().tolist()],
        }

    def table(self, class_names: Sequence[str] | None = None) -> str:
        """A per-class text table (name, IU, acc, pixels) and the four figures, in percent."""
        names = self._check_names(class_names) or self.class_names
        if names is None:
            names = [str(i) for i in range(self.num_classes)]
        r = self.compute()

        def pct(v: float) -> str:
            return "-" if math.isnan(v) else f"{100.0 * v:.2f}"

        width = max(5, *(len(s) for s in names))
        lines = [f"{'class':<{width}}  {'IU %':>7}  {'acc %':>7}  {'pixels':>12}"]
        lines.append("-" * len(lines[0]))
        rows = zip(names, r["per_class_iu"], r["per_class_acc"], r["pixels"], strict=True)
        for i, (name, iu, acc, pix) in enumerate(rows):
            mark = "  (excluded)" if i in self.exclude else ""
            lines.append(f"{name:<{width}}  {pct(iu):>7}  {pct(acc):>7}  {pix:>12d}{mark}")
        lines.append("-" * len(lines[0]))
        if self.exclude:
            lines.append(f"means over {self.num_classes - len(self.exclude)} classes: {len(self.exclude)} excluded")
        lines.append(
            f"pixel acc {pct(r['pixel_acc'])}  mean acc {pct(r['mean_acc'])}  "
            f"mean IU {pct(r['mean_iu'])}  f.w. IU {pct(r['fw_iu'])}"
        )
        return "\n".join(lines)

    # ------------------------------------------------------------------ (de)serialisation

    def state_dict(self) -> dict[str, Any]:
        """A plain dict (CPU tensor) for :meth:`load_state_dict`; safe for ``torch.save``."""
        return {
            "num_classes": self.num_classes,
            "class_names": None if self.class_names is None else list(self.class_names),
            "exclude": list(self.exclude),
            "mat": self.mat.detach().cpu().clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the counts (and names, if given) with those of a :meth:`state_dict`."""
        if int(state["num_classes"]) != self.num_classes:
            raise ValueError(f"state is for {state['num_classes']} classes, this matrix has {self.num_classes}")
        mat = self._check_matrix(state["mat"])
        if mat.shape[0] != self.num_classes:
            raise ValueError(f"state matrix is {tuple(mat.shape)}, expected {self.num_classes} square")
        self.mat = mat.to(self.mat.device)
        if state.get("class_names") is not None:
            self.class_names = self._check_names(state["class_names"])
        self.exclude = tuple(int(c) for c in state.get("exclude", ()))

    @classmethod
    def from_matrix(
        cls,
        mat: _ArrayLike | Sequence[Sequence[int]],
        class_names: Sequence[str] | None = None,
        *,
        exclude: Sequence[int] = (),
    ) -> ConfusionMatrix:
        """A matrix holding the given n x n counts (rows = ground truth, columns = prediction)."""
        m = cls._check_matrix(mat)
        cm = cls(m.shape[0], class_names, device=m.device, exclude=exclude)
        cm.mat = m.clone()
        return cm

    def __repr__(self) -> str:
        return (
            f"ConfusionMatrix(num_classes={self.num_classes}, pixels={int(self.mat.sum())}, device={self.mat.device})"
        )

    # ------------------------------------------------------------------ helpers

    def _check_names(self, names: Sequence[str] | None) -> list[str] | None:
        if names is None:
            return None
        names = [str(s) for s in names]
        if len(names) != self.num_classes:
            raise ValueError(f"got {len(names)} class names for {self.num_classes} classes")
        return names

    @staticmethod
    def _check_matrix(mat: Any) -> torch.Tensor:
        m = mat.detach() if isinstance(mat, torch.Tensor) else torch.as_tensor(np.asarray(mat))
        if m.dim() != 2 or m.shape[0] != m.shape[1] or m.shape[0] < 1:
            raise ValueError(f"a confusion matrix must be square n x n, got shape {tuple(m.shape)}")
        if m.dtype.is_floating_point:
            # Accept float counts only when they are whole numbers (e.g. a matrix saved by numpy).
            if not bool(torch.all(torch.isfinite(m) & (m == m.round()))):
                raise ValueError("confusion matrix counts must be whole numbers")
        elif m.dtype.is_complex or m.dtype == torch.bool:
            raise ValueError(f"confusion matrix counts must be integers, got dtype {m.dtype}")
        m = m.to(torch.int64)
        if bool((m < 0).any()):
            raise ValueError("confusion matrix counts must be non-negative")
        return m
