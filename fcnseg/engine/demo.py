"""``fcnseg demo``: the paper's experiment in miniature, on the synthetic shapes set, on two CPU cores.

FCN-32s is trained from scratch, FCN-16s is initialised from it and FCN-8s from FCN-16s (staged, as in the
paper), each is evaluated on the validation split, and one table compares them on the four metrics plus mean IU
in a band around the class boundaries -- where the skip layers should pay off. There are no pretrained weights
here (they cannot be downloaded), so the backbone is a width-reduced VGG16 trained from scratch.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..io import atomic_write
from .config import TrainConfig

BOUNDARY_WIDTH = 3  # pixels on either side of a class edge
REPORT_IMAGES = 4  # the final model's report.html shows its 4 worst and 4 best validation images


@dataclass(frozen=True)
class DemoPlan:
    iters: tuple[int, int, int]  # FCN-32s, FCN-16s, FCN-8s
    val_images: int
    lr: float
    batch_size: int
    width: float
    fc_dim: int
    train_images: int
    dropout: float = 0.0


# A quarter-width VGG16 (16..128 channels, fc6/fc7 of 64) trained from scratch with AdamW on 128 x 128 images.
# FCN-32s gets more than half the budget: from scratch its only gradient path to the backbone runs through the stride-32
# head, so it learns slowest, and the finer nets start from it (staged, as in the paper). No dropout: at fc6/fc7
# widths of 64, the release's 0.5 silences too much of the one path FCN-32s has (it learnt nothing with it).
FULL = DemoPlan(iters=(800, 200, 500), val_images=100, lr=1e-3, batch_size=16, width=1 / 4, fc_dim=64, train_images=400)
QUICK = DemoPlan(iters=(170, 50, 170), val_images=24, lr=1e-3, batch_size=8, width=1 / 4, fc_dim=64, train_images=128)


def stage_config(
    name: str, iters: int, plan: DemoPlan, out: Path, init_from: Path | None, progress: bool
) -> TrainConfig:
    return TrainConfig(
        dataset="synthetic",
        data_options={"num_images": plan.train_images} if plan.train_images else None,
        model=name,
        width=plan.width,
        fc_dim=plan.fc_dim,
        dropout=plan.dropout,
        alignment="aligned",
        preset="modern",
        amp=False,  # fp32: on the demo's quarter-width net, bf16 autocast steps are slower than fp32 on the CPU
        optimizer="adamw",
        weight_decay=1e-4,
        iters=iters,
        batch_size=plan.batch_size,
        lr=plan.lr,
        warmup_iters=0,
        crop_size=0,  # the synthetic images are small: train on them whole
        scale_min=1.0,
        scale_max=1.0,
        flip=True,
        val_every=iters,
        val_images=min(20, plan.val_images),  # a quick check; evaluate_stage measures the whole split
        log_every=10,
        num_workers=0,
        init_from=str(init_from) if init_from else None,
        out=str(out / name),
        progress=progress,
    )


def run_demo(out: str | Path, *, quick: bool = False, progress: bool = True) -> dict[str, dict[str, float]]:
    """Train the three stages, evaluate them, write pictures; returns {model: metrics}."""
    from .train import train

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    out = Path(out)
    plan = QUICK if quick else FULL
    results: dict[str, dict[str, float]] = {}
    previous: Path | None = None
    started = time.perf_counter()
    for name, iters in zip(("fcn32s", "fcn16s", "fcn8s"), plan.iters, strict=True):
        t0 = time.perf_counter()
        print(f"[demo] training {name} for {iters} iterations" + (f" from {previous}" if previous else " from scratch"))
        train(stage_config(name, iters, plan, out, previous, progress))
        previous = out / name / "best.pt"
        results[name] = evaluate_stage(
            previous, out / name, plan, report_images=REPORT_IMAGES if name == "fcn8s" else 0
        )
        results[name]["train_s"] = time.perf_counter() - t0
    results_path = out / "results.json"
    with atomic_write(results_path, "w") as f:
        json.dump({"quick": quick, "seconds": time.perf_counter() - started, "models": results}, f, indent=2)
    write_pictures(out, plan)
    return results


def evaluate_stage(checkpoint: Path, folder: Path, plan: DemoPlan, *, report_images: int = 0) -> dict[str, float]:
    """Metrics on the first ``val_images`` validation images, plus mean IU near boundaries; writes the report
    files into ``folder/eval``, report.html too (with that many worst and best images) where ``report_images``."""
    from ..data import get_dataset
    from ..data.loader import make_loader
    from ..data.transforms import eval_transforms
    from ..hub import load
    from .evaluate import evaluate, write_report
    from .examples import ImageScores

    model = load(checkpoint)
    ds = get_dataset("synthetic", split="val", transforms=eval_transforms(model.preprocessing))
    subset = torch.utils.data.Subset(ds, range(min(plan.val_images, len(ds))))
    loader = make_loader(subset, batch_size=plan.batch_size, num_workers=0)
    scores = ImageScores(subset.indices) if report_images else None
    cm, band = evaluate(model, loader, ds.num_classes, boundary_width=BOUNDARY_WIDTH, class_names=list(ds.classes),
                        on_image=scores)  # fmt: skip
    doc = write_report(cm, list(ds.classes), folder / "eval")
    r = cm.compute()
    keys = ("pixel_acc", "mean_acc", "mean_iu", "fw_iu")
    figures = {**{k: r[k] for k in keys}, "boundary_mean_iu": band.compute()["mean_iu"]}
    if scores is not None:
        write_stage_report(checkpoint, folder / "eval", model=model, ds=ds, cm=cm, doc=doc, scores=scores,
                           n=report_images, boundary_iu=figures["boundary_mean_iu"])  # fmt: skip
    return figures


def write_stage_report(
    checkpoint: Path,
    out: Path,
    *,
    model: torch.nn.Module,
    ds: Any,
    cm: Any,
    doc: dict[str, Any],
    scores: Any,
    n: int,
    boundary_iu: float,
) -> Path:
    """``out/report.html`` for a stage: its model, validation set ``ds``, confusion matrix ``cm`` and metrics
    ``doc``; the ``n`` worst and best of the images ``scores`` (an ``ImageScores``) ranked, and the mean IU near
    boundaries in the header."""
    from ..predict import mask_colors
    from .examples import find_examples
    from .report import pct, run_log, write_html_report

    examples = find_examples(model, ds, scores.scores, n)["out"]
    context = {
        "checkpoint": str(checkpoint),
        "dataset": f"synthetic, split val, the first {examples.ranked + examples.unscored} images",
        f"mean IU within {BOUNDARY_WIDTH} px of an edge": f"{pct(boundary_iu)} %",
    }
    title = f"fcnseg demo: {checkpoint.parent.name} on the synthetic shapes"
    return write_html_report(out, doc=doc, cm=cm, colors=mask_colors(model), examples=examples,
                             log=run_log(checkpoint), title=title, context=context)  # fmt: skip


def write_pictures(out: Path, plan: DemoPlan, count: int = 4) -> None:
    """predictions.png (image | truth | FCN-32s | FCN-16s | FCN-8s) and comparison.png (metrics per model)."""
    from ..data import get_dataset
    from ..hub import load
    from .plots import plot_model_comparison, plot_predictions

    results = json.loads((out / "results.json").read_text())["models"]
    models = {name: load(out / name / "best.pt") for name in results}
    ds = get_dataset("synthetic", split="val")
    panels = []
    for i in range(count):
        image, mask = ds.load_pair(i)
        # The path the metrics were measured on (eager fp32), so that the pictures show what the table scores.
        preds = {name: m.predict(image, runtime="eager") for name, m in models.items()}
        panels.append((image, mask, preds))
    plot_predictions(panels, np.asarray(ds.palette, np.uint8), out / "predictions.png", class_names=ds.classes)
    keys = ("pixel_acc", "mean_acc", "mean_iu", "fw_iu", "boundary_mean_iu")
    plot_model_comparison({m: {k: results[m][k] for k in keys} for m in results}, out / "comparison.png")


def describe(quick: bool) -> str:
    plan = QUICK if quick else FULL
    return (
        f"synthetic shapes 128 x 128 ({plan.train_images} training images), VGG16 at width {plan.width:g} "
        f"(fc6/fc7 {plan.fc_dim} channels) trained from scratch (no pretrained weights here), "
        f"{' / '.join(map(str, plan.iters))} iterations of batch {plan.batch_size} for FCN-32s / 16s / 8s"
    )


def format_table(results: dict[str, dict[str, Any]]) -> str:
    head = (
        f"{'model':<8} {'pixel acc':>9} {'mean acc':>9} {'mean IU':>8} {'f.w. IU':>8} {'boundary IU':>12} {'time':>7}"
    )
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        lines.append(
            f"{name:<8} {100 * r['pixel_acc']:>9.2f} {100 * r['mean_acc']:>9.2f} {100 * r['mean_iu']:>8.2f} "
            f"{100 * r['fw_iu']:>8.2f} {100 * r['boundary_mean_iu']:>12.2f} {r['train_s']:>6.0f}s"
        )
    return "\n".join(lines)
