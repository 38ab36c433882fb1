"""``report.html``: an evaluation on one self-contained page, written beside ``metrics.json``.

The page holds the four metrics, the per-class table, the confusion heatmap and the per-class IU bars, training
curves from ``log.csv`` when the checkpoint sits in a training run's folder, and the N worst and N best images as
image / truth / prediction triplets with their mean IU (:mod:`fcnseg.engine.examples`). Every picture is inlined as
a base64 ``data:`` URI and the style sheet is in the page: it references no other file and nothing on the network,
so it can be mailed or opened offline. matplotlib draws the figures (:mod:`fcnseg.engine.plots`, imported when a
report is written); masks are palette PNGs, so each pixel of a mask reads back as its class index.
"""

from __future__ import annotations

import base64
import csv
import functools
import html
import io
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..imageio import encode_mask_png, encode_rgb
from ..io import atomic_write
from ..metrics import ConfusionMatrix
from ..palette import VOID_COLOR, full_palette
from .examples import Example, Examples

REPORT_NAME = "report.html"
METRICS = {"pixel_acc": "pixel acc", "mean_acc": "mean acc", "mean_iu": "mean IU", "fw_iu": "f.w. IU"}
MAX_SIDE = 640  # longer sides are shown scaled down (masks by nearest neighbour), to keep the page small

CSS = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; margin-bottom: .3em; } h2 { font-size: 1.2em; margin-top: 1.8em; }
dl.context { display: grid; grid-template-columns: max-content auto; gap: .1em 1em; color: #555; margin: 0; }
dl.context dt { font-weight: 600; } dl.context dd { margin: 0; word-break: break-all; }
table { border-collapse: collapse; } th, td { padding: .25em .8em; border-bottom: 1px solid #ddd; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
table.metrics td { font-size: 1.6em; font-weight: 600; text-align: center; }
table.metrics th { text-align: center; color: #555; font-weight: 500; }
tr.excluded td { color: #999; }
.swatch { display: inline-block; width: .9em; height: .9em; border: 1px solid #888; margin-right: .4em;
          vertical-align: -0.1em; }
.figures img, #curves img { max-width: 100%; height: auto; margin: .5em 1em .5em 0; vertical-align: top; }
.legend span.item { margin-right: 1em; white-space: nowrap; }
.examples { display: flex; flex-wrap: wrap; gap: 1.2em; }
figure.example { margin: 0; } figure.example figcaption { color: #444; }
.triplet, .labels { display: flex; gap: 4px; } .labels span { width: 170px; color: #666; font-size: .85em; }
.triplet img { width: 170px; height: auto; } .triplet img[data-kind] { image-rendering: pixelated; }
p.note { color: #666; font-size: .9em; }
"""


# ----------------------------------------------------------------------------------------------- encoding


def pct(value: float | None) -> str:
    """A fraction as a percentage with two decimals, as ``fcnseg eval`` prints it; ``-`` where undefined."""
    return "-" if value is None or math.isnan(value) else f"{100 * value:.2f}"


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _fit(a: np.ndarray, resample: Image.Resampling) -> np.ndarray:
    """``a`` (an image or a mask) scaled down so that its longer side is ``MAX_SIDE``; as it is when it fits."""
    h, w = a.shape[:2]
    scale = MAX_SIDE / max(h, w)
    if scale >= 1:
        return a
    return np.asarray(Image.fromarray(a).resize((max(1, round(w * scale)), max(1, round(h * scale))), resample))


def mask_png(mask: np.ndarray, colors: np.ndarray) -> bytes:
    """A class-index mask as a palette PNG (:func:`~fcnseg.imageio.encode_mask_png`): its pixels are the indices,
    its palette the class colours (void 255 in the neutral void colour)."""
    return encode_mask_png(_fit(np.ascontiguousarray(mask, dtype=np.uint8), Image.Resampling.NEAREST), colors)


def image_jpeg(image: np.ndarray) -> bytes:
    """An image as JPEG (:func:`~fcnseg.imageio.encode_rgb`), its colour kept at full resolution."""
    return encode_rgb(_fit(image, Image.Resampling.BILINEAR), "jpeg", full_chroma=True)


def figure_png(draw: Callable[..., None], *args: Any) -> bytes:
    """PNG bytes of a :mod:`fcnseg.engine.plots` figure: ``draw(*args, file)``."""
    buf = io.BytesIO()
    draw(*args, buf)
    return buf.getvalue()


def _img(data: bytes, mime: str, alt: str, **attrs: str) -> str:
    extra = "".join(f' {k.replace("_", "-")}="{html.escape(v)}"' for k, v in attrs.items())
    return f'<img src="{data_uri(data, mime)}" alt="{html.escape(alt)}"{extra}>'


def _swatch(rgb: Sequence[int]) -> str:
    r, g, b = (int(v) for v in rgb)
    return f'<span class="swatch" style="background: rgb({r}, {g}, {b})"></span>'


# ----------------------------------------------------------------------------------------------- sections


def _context(items: Mapping[str, str]) -> str:
    rows = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in items.items())
    return f'<dl class="context">{rows}</dl>'


def _metrics_section(doc: Mapping[str, Any]) -> str:
    head = "".join(f"<th>{label} %</th>" for label in METRICS.values())
    cells = "".join(f'<td data-metric="{key}">{pct(doc[key])}</td>' for key in METRICS)
    excluded = doc.get("excluded_from_means") or []
    note = (
        f'<p class="note">Mean accuracy and mean IU leave out {html.escape(", ".join(excluded))} (absent from this '
        "split), as in the paper.</p>"
        if excluded
        else ""
    )
    return (
        '<section id="metrics"><h2>Metrics</h2><table class="metrics"><thead><tr>'
        f"{head}</tr></thead><tbody><tr>{cells}</tr></tbody></table>{note}</section>"
    )


def _class_row(name: str, row: Mapping[str, Any], color: Sequence[int], excluded: bool) -> str:
    mark = " (excluded from the means)" if excluded else ""
    cells = [
        f'<td class="num" data-col="iu">{pct(row["iu"])}</td>',
        f'<td class="num" data-col="acc">{pct(row["acc"])}</td>',
        f'<td class="num" data-col="pixels">{row["pixels"]}</td>',
    ]
    attrs = f' data-class="{html.escape(name)}"' + (' class="excluded"' if excluded else "")
    return f"<tr{attrs}><td>{_swatch(color)}{html.escape(name)}{mark}</td>{''.join(cells)}</tr>"


def _classes_section(doc: Mapping[str, Any], colors: np.ndarray) -> str:
    excluded = set(doc.get("excluded_from_means") or [])
    rows = [
        _class_row(name, row, colors[k], name in excluded) for k, (name, row) in enumerate(doc["per_class"].items())
    ]
    return (
        '<section id="classes"><h2>Per class</h2><table class="classes"><thead><tr><th>class</th>'
        '<th class="num">IU %</th><th class="num">acc %</th><th class="num">pixels (truth)</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></section>"
    )


def _figures_section(cm: ConfusionMatrix, doc: Mapping[str, Any]) -> str:
    from .plots import plot_confusion, plot_per_class

    confusion = figure_png(plot_confusion, cm.mat.cpu().numpy(), list(doc["per_class"]))
    bars = figure_png(plot_per_class, doc)
    return (
        '<section id="figures"><h2>Confusion matrix and IU per class</h2><div class="figures">'
        f"{_img(confusion, 'image/png', 'confusion matrix (row-normalised)')}"
        f"{_img(bars, 'image/png', 'IU per class')}</div></section>"
    )


def read_log(path: Path) -> list[dict[str, str]]:
    """The rows of a training run's ``log.csv``, rows cut short by a kill left out."""
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f) if None not in r and None not in r.values()]


def _curves_section(log: Path, first_head: str) -> str:
    from .plots import plot_training_curves

    try:
        draw = functools.partial(plot_training_curves, first_head=first_head)
        picture = _img(figure_png(draw, read_log(log)), "image/png", "training curves")
    except (OSError, ValueError, KeyError, csv.Error) as e:  # a damaged log must not cost the report
        picture = f'<p class="note">{html.escape(str(log))} could not be read: {html.escape(str(e))}</p>'
    return (
        f'<section id="curves"><h2>Training curves</h2><p class="note">From {html.escape(str(log))}: the '
        f"training loss, and the mean IU of the run's validations.</p>{picture}</section>"
    )


def _legend(class_names: Sequence[str], colors: np.ndarray) -> str:
    pairs = zip(class_names, colors[: len(class_names)], strict=True)
    items = [f'<span class="item">{_swatch(c)}{html.escape(n)}</span>' for n, c in pairs]
    items.append(f'<span class="item">{_swatch(VOID_COLOR)}void (not scored)</span>')
    return f'<p class="legend">{"".join(items)}</p>'


def _example(rank: int, ex: Example, colors: np.ndarray) -> str:
    name = html.escape(ex.name)
    pictures = (
        _img(image_jpeg(ex.image), "image/jpeg", f"image {ex.name}")
        + _img(mask_png(ex.truth, colors), "image/png", f"truth {ex.name}", data_kind="truth")
        + _img(mask_png(ex.pred, colors), "image/png", f"prediction {ex.name}", data_kind="prediction")
    )
    return (
        f'<figure class="example" data-index="{ex.index}" data-name="{name}" data-iu="{ex.iu!r}">'
        '<div class="labels"><span>image</span><span>truth</span><span>prediction</span></div>'
        f'<div class="triplet">{pictures}</div><figcaption>{rank}. {name}: mean IU '
        f'<span class="iu">{pct(ex.iu)}</span> %</figcaption></figure>'
    )


def _examples_sections(examples: Examples, class_names: Sequence[str], colors: np.ndarray) -> str:
    lead = (
        f'<p class="note">Image, truth and prediction; each image ranked by its own mean IU (over the classes in '
        f"its truth or its prediction) among the {examples.ranked} images evaluated"
        + (f", {examples.unscored} without a labelled pixel left out" if examples.unscored else "")
        + ".</p>"
        + _legend(class_names, colors)
    )
    out = []
    for key, title, items in (("worst", "worst", examples.worst), ("best", "best", examples.best)):
        figures = "".join(_example(i + 1, ex, colors) for i, ex in enumerate(items))
        out.append(
            f'<section id="{key}"><h2>The {len(items)} {title} images</h2>{lead if key == "worst" else ""}'
            f'<div class="examples">{figures}</div></section>'
        )
    return "".join(out)


# ----------------------------------------------------------------------------------------------- the page


def render_report(
    *,
    doc: Mapping[str, Any],
    cm: ConfusionMatrix,
    colors: np.ndarray,
    examples: Examples | None = None,
    log: Path | None = None,
    title: str = "Evaluation",
    context: Mapping[str, str] | None = None,
    first_head: str = "",
) -> str:
    """The page's HTML: ``doc`` is the metrics document (:func:`~fcnseg.engine.evaluate.metrics_dict`), ``cm`` its
    confusion matrix, ``colors`` the class colours, ``log`` a run's ``log.csv`` (curves; ``first_head``: the name
    of a model's first head, whose log columns carry no prefix), ``context`` lines that say what was evaluated."""
    names = list(doc["per_class"])
    colors = np.asarray(full_palette(colors), np.uint8).reshape(256, 3)  # one colour per index, void at 255
    body = [
        f"<header><h1>{html.escape(title)}</h1>{_context(context or {})}</header>",
        _metrics_section(doc),
        _classes_section(doc, colors),
        _figures_section(cm, doc),
        _curves_section(log, first_head) if log is not None else "",
        _examples_sections(examples, names, colors) if examples is not None else "",
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def write_html_report(out: str | Path, **kwargs: Any) -> Path:
    """Write ``out/report.html`` (atomically; keywords as :func:`render_report`); returns its path."""
    path = Path(out) / REPORT_NAME
    page = render_report(**kwargs)
    with atomic_write(path) as f:
        f.write(page.encode("utf-8"))
    return path


def run_log(checkpoint: str | Path) -> Path | None:
    """``log.csv`` beside ``checkpoint`` when the checkpoint is a file in a training run's folder; else None."""
    path = Path(checkpoint)
    log = path.parent / "log.csv"
    return log if path.is_file() and log.is_file() else None
