"""`fcnseg demo --quick`: the whole pipeline end to end, CI-sized, with its bar."""

import json

from PIL import Image

import fcnseg
from tests.engine.test_report import Page, decode, pct


def test_quick_demo(quick_demo):
    out, printed = quick_demo
    results = json.loads((out / "results.json").read_text())
    models = results["models"]
    assert list(models) == ["fcn32s", "fcn16s", "fcn8s"]
    # The CI-sized run's own floors for the default run's targets (FCN-32s mean accuracy >= 0.5, FCN-16s 0.05 mean
    # IU above it, FCN-8s >= 0.80, the boundary figure in the same order), at 170 / 50 / 170 steps of batch 8
    # (measured: 0.196 mean accuracy, 0.129 / 0.171 / 0.463 mean IU, 0.084 / 0.109 / 0.350 near the edges).
    # FCN-32s must find something besides background: predicting background everywhere gives a mean accuracy of
    # exactly 1/7, which is what it gave before it learnt anything.
    r32, r16, r8 = models["fcn32s"], models["fcn16s"], models["fcn8s"]
    assert r32["mean_acc"] >= 0.16, r32
    assert r16["mean_iu"] >= r32["mean_iu"] + 0.01, (r16, r32)
    assert r8["mean_iu"] >= 0.35 and r8["mean_iu"] >= r16["mean_iu"] + 0.1, r8
    assert r32["boundary_mean_iu"] < r16["boundary_mean_iu"] < r8["boundary_mean_iu"]
    for r in models.values():
        assert 0 <= r["boundary_mean_iu"] <= 1 and 0 <= r["mean_iu"] <= 1
    for name in models:
        model = fcnseg.load(out / name / "best.pt")
        assert model.build_config["name"] == name
        assert (out / name / "eval" / "metrics.json").is_file()
    for png in ("predictions.png", "comparison.png"):
        with Image.open(out / png) as im:
            assert im.size[0] > 300
    assert "fcn8s" in printed and "boundary IU" in printed and "predictions.png" in printed


def test_quick_demo_writes_and_links_the_final_models_report(quick_demo):
    out, printed = quick_demo
    report = out / "fcn8s" / "eval" / "report.html"
    assert f"report (FCN-8s on one page, with its worst and best images): {report}" in printed
    assert not (out / "fcn32s" / "eval" / "report.html").exists()  # the final model's only
    page = Page(report.read_text(encoding="utf-8"))
    doc = json.loads((out / "fcn8s" / "eval" / "metrics.json").read_text())
    assert page.sections == ["metrics", "classes", "figures", "curves", "worst", "best"]  # curves: its run's log
    assert page.metrics["mean_iu"] == pct(doc["mean_iu"]) and list(page.rows) == list(doc["per_class"])
    worst, best = page.figures["worst"], page.figures["best"]
    assert len(worst) == len(best) == 4
    ius = [float(f["data-iu"]) for f in worst + best[::-1]]
    assert ius == sorted(ius) and ius[0] < ius[-1]
    for img in page.images:
        assert decode(img["src"]).width > 0
