"""Pictures a person can read: confusion heatmap, per-class bars, prediction panels, model comparison, training
curves. Each one goes to a file path (written atomically) or to an open binary file (e.g. ``io.BytesIO``, for PNG
bytes to inline in a page)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..io import atomic_write  # noqa: E402

Target = str | Path | IO[bytes]


def _save(fig: Any, target: Target) -> None:
    try:
        if hasattr(target, "write"):
            fig.savefig(target, format="png", dpi=110, bbox_inches="tight")
        else:
            with atomic_write(Path(target)) as f:
                fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)


def plot_confusion(mat: np.ndarray, class_names: Sequence[str], path: Target) -> None:
    """Row-normalised confusion matrix (each ground-truth row sums to 100%), with percentages written in."""
    n = len(class_names)
    rows = mat.sum(1, keepdims=True)
    norm = np.divide(mat, rows, out=np.zeros(mat.shape, float), where=rows > 0)
    # Capped: ADE20K's 150 classes would otherwise make a 7,600-pixel square that takes half a minute to draw.
    size = min(max(4.0, 0.45 * n + 2), 22.0)
    font = 8 if n <= 40 else max(3.0, 8 * 40 / n)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(100 * norm, cmap="Blues", vmin=0, vmax=100, interpolation="nearest")  # in %, as the numbers
    ax.set_xticks(range(n), class_names, rotation=60, ha="right", fontsize=font)
    ax.set_yticks(range(n), class_names, fontsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    if n <= 25:
        for i in range(n):
            for j in range(n):
                if norm[i, j] >= 0.005:
                    color = "white" if norm[i, j] > 0.5 else "black"
                    ax.text(j, i, f"{100 * norm[i, j]:.0f}", ha="center", va="center", fontsize=7, color=color)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="% of the true class's pixels")
    ax.set_title("confusion matrix: each row, % of a true class's pixels")
    _save(fig, path)


def plot_per_class(metrics: Mapping[str, Any], path: Target) -> None:
    """Horizontal bars of IU per class, with the mean IU marked."""
    names = list(metrics["per_class"])
    ius = [metrics["per_class"][k]["iu"] for k in names]
    vals = [0.0 if v is None else 100 * v for v in ius]
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.3 * len(names) + 1)))
    ax.barh(range(len(names)), vals, color="#4878cf")
    ax.set_yticks(range(len(names)), [n + (" (absent)" if v is None else "") for n, v in zip(names, ius, strict=True)])
    ax.invert_yaxis()
    ax.set_xlim(0, 110)  # room for the value written after a 100% bar
    ax.set_xticks(range(0, 101, 20))
    ax.set_xlabel("IU (%)")
    if metrics.get("mean_iu") is not None:
        ax.axvline(100 * metrics["mean_iu"], color="#d65f5f", ls="--", label=f"mean IU {100 * metrics['mean_iu']:.1f}")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, fontsize=8)  # beside, not on, bars
    for i, v in enumerate(vals):
        ax.text(v + 1, i, f"{v:.1f}", va="center", fontsize=8)
    ax.set_title("IU per class")
    _save(fig, path)


def plot_predictions(
    panels: Sequence[tuple[np.ndarray, np.ndarray, Mapping[str, np.ndarray]]],
    colors: np.ndarray,
    path: Target,
    class_names: Sequence[str] | None = None,
) -> None:
    """Rows of image | ground truth | one column per model's prediction (colour-coded classes), and below them a
    legend of ``class_names`` in their colours."""
    cols = 2 + len(panels[0][2])
    fig, axes = plt.subplots(len(panels), cols, figsize=(2.2 * cols, 2.2 * len(panels)), squeeze=False)
    lut = np.zeros((256, 3), np.uint8)
    lut[: len(colors)] = colors
    lut[255] = (224, 224, 192)
    for r, (image, gt, preds) in enumerate(panels):
        items = [("image", image), ("ground truth", lut[gt])] + [(k, lut[v]) for k, v in preds.items()]
        for c, (title, img) in enumerate(items):
            ax = axes[r, c]
            ax.imshow(img, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=9)
    if class_names:
        fig.tight_layout()  # the rows close together, then the legend right under them
        _legend(fig, class_names, colors, columns=min(len(class_names), 8))
    _save(fig, path)


def _legend(fig: Any, class_names: Sequence[str], colors: np.ndarray, columns: int) -> None:
    """A legend of the classes' colours under the figure (an edge on each swatch, so a black one still shows)."""
    from matplotlib.patches import Patch

    pairs = zip(class_names, colors[: len(class_names)], strict=True)
    handles = [Patch(facecolor=np.asarray(c) / 255, edgecolor="0.4", label=n) for n, c in pairs]
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=columns, fontsize=8, frameon=False)


def plot_model_comparison(rows: Mapping[str, Mapping[str, float]], path: Target) -> None:
    """Grouped bars: one group per metric, one bar per model."""
    models = list(rows)
    metrics = list(next(iter(rows.values())))
    x = np.arange(len(metrics))
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(1.6 * len(metrics) + 2, 3.5))
    for i, m in enumerate(models):
        vals = [100 * rows[m][k] for k in metrics]
        bars = ax.bar(x + i * width - 0.4 + width / 2, vals, width, label=m)
        for b, v in zip(bars, vals, strict=True):
            ax.text(b.get_x() + b.get_width() / 2, v + 0.5, f"{v:.1f}", ha="center", fontsize=7)
    ax.set_xticks(x, [k.replace("_", " ") for k in metrics])
    ax.set_ylim(0, 108)
    ax.set_ylabel("%")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)  # beside the bars
    _save(fig, path)


def plot_training_curves(rows: Sequence[Mapping[str, str]], path: Target, *, first_head: str = "") -> None:
    """A training run's ``log.csv`` rows: the training loss and the validation mean IU (one line per head) against
    the iteration. Empty cells (a loss row has no validation figures and the reverse) are skipped. ``first_head``
    names the head of the unprefixed columns (the log prefixes only the further heads' columns)."""

    def series(key: str) -> tuple[list[int], list[float]]:
        points = [(int(r["iteration"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
        return [p[0] for p in points], [p[1] for p in points]

    fig, (loss_ax, iu_ax) = plt.subplots(1, 2, figsize=(10, 3.4))
    loss_ax.plot(*series("loss"), color="#4878cf", lw=1.2)
    loss_ax.set_title("training loss")
    iu_keys = [k for k in (rows[0] if rows else {}) if k == "mean_iu" or k.endswith("/mean_iu")]
    for key in iu_keys:
        its, values = series(key)
        label = f"{first_head} mean IU".strip() if key == "mean_iu" else f"{key.rsplit('/', 1)[0]} mean IU"
        iu_ax.plot(its, [100 * v for v in values], marker="o", ms=3, lw=1.2, label=label)
    iu_ax.set_title("validation mean IU (%)")
    if len(iu_keys) > 1:
        iu_ax.legend(fontsize=8)
    for ax in (loss_ax, iu_ax):
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    _save(fig, path)
