"""`fcnseg eval`'s report.html: what the page shows equals metrics.json and an independent per-image computation,
every picture is inlined and decodes, and a real browser shows it without a broken image."""

from __future__ import annotations

import base64
import io
import json
import math
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import fcnseg
from fcnseg.cli import main
from fcnseg.engine.checkpointing import LOG_FIELDS
from fcnseg.imageio import read_mask_png
from fcnseg.palette import VOID_COLOR, palette_for
from tests.engine.test_train import _blocks_tree
from tests.helpers import TINY, randomise

CLASSES = ["background", "red", "green", "blue"]


# ------------------------------------------------------------------------------------------------ the page, parsed


class Page(HTMLParser):
    """What a report shows: section ids, the metric cells, the per-class rows, every image (with its section) and
    the example figures (their attributes, images and the IU text of their caption), and every src / href."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.metrics: dict[str, str] = {}
        self.rows: dict[str, dict[str, str]] = {}
        self.images: list[dict[str, str]] = []
        self.figures: dict[str, list[dict]] = {}
        self.refs: list[str] = []
        self.tags: set[str] = set()
        self._section = self._row = self._figure = None
        self._cell: tuple[str, str] | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        self.tags.add(tag)
        self.refs += [a[k] for k in ("src", "href") if k in a]
        if tag == "section":
            self._section = a["id"]
            self.sections.append(a["id"])
        elif tag == "tr" and "data-class" in a:
            self._row = a["data-class"]
            self.rows[self._row] = {}
        elif tag == "td" and "data-metric" in a:
            self._cell = ("metric", a["data-metric"])
        elif tag == "td" and "data-col" in a:
            self._cell = ("col", a["data-col"])
        elif tag == "figure":
            self._figure = {**a, "imgs": [], "iu_text": ""}
            self.figures.setdefault(self._section, []).append(self._figure)
        elif tag == "span" and a.get("class") == "iu":
            self._cell = ("iu", "")
        elif tag == "img":
            self.images.append({**a, "section": self._section})
            if self._figure is not None:
                self._figure["imgs"].append(a)

    def handle_endtag(self, tag):
        if tag == "td" or (tag == "span" and self._cell and self._cell[0] == "iu"):
            self._cell = None
        self._figure = None if tag == "figure" else self._figure
        self._row = None if tag == "tr" else self._row
        self._section = None if tag == "section" else self._section

    def handle_data(self, data):
        if self._cell is None:
            return
        kind, key = self._cell
        if kind == "metric":
            self.metrics[key] = self.metrics.get(key, "") + data
        elif kind == "col":
            self.rows[self._row][key] = self.rows[self._row].get(key, "") + data
        else:
            self._figure["iu_text"] += data


def decode(uri: str) -> Image.Image:
    """An inlined picture, decoded: its data URI must be a base64 PNG or JPEG that PIL reads whole."""
    m = re.fullmatch(r"data:(image/(?:png|jpeg));base64,([A-Za-z0-9+/=]+)", uri)
    assert m, uri[:80]
    img = Image.open(io.BytesIO(base64.b64decode(m[2], validate=True)))
    img.load()
    assert img.format == {"image/png": "PNG", "image/jpeg": "JPEG"}[m[1]]
    return img


def pct(v):
    return "-" if v is None else f"{100 * v:.2f}"


def iu_by_hand(pred: np.ndarray, truth: np.ndarray, n: int, exclude=()) -> float:
    """One image's mean IU, by plain counting: over the classes in its truth or its prediction, void pixels (and
    the ``exclude``d classes) left out; NaN without a labelled pixel."""
    valid = truth < n
    ius = []
    for c in range(n):
        union = np.sum(((pred == c) | (truth == c)) & valid)
        if c not in exclude and union:
            ius.append(np.sum((pred == c) & (truth == c) & valid) / union)
    return float(np.mean(ius)) if ius else math.nan


# ------------------------------------------------------------------------------------------------ two evaluations


def _log_csv(path: Path) -> None:
    """A training run's log.csv as RunLog writes it: loss rows every 10 iterations, validations at 20 and 40."""
    rows = [",".join(LOG_FIELDS)]
    for it in (10, 20, 30, 40):
        rows.append(f"{it},{2.0 / it:.4f},0.001,50.0,,,,")
        if it % 20 == 0:
            rows.append(f"{it},,,,0.5,0.3,{0.1 * it / 20:.3f},0.4")
    path.write_text("\n".join(rows) + "\n")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """The same tiny checkpoint evaluated twice on six 40 x 40 images (one with a void band, one all void): once
    from a training run's folder (log.csv beside it) with the 2 worst and 2 best images, once from a plain folder
    with --report-images 0."""
    tmp = tmp_path_factory.mktemp("report")
    _blocks_tree(tmp / "data", n=6, size=40)
    for stem, rows in (("im1", slice(0, 6)), ("im5", slice(None))):
        mask = read_mask_png(tmp / "data" / "masks" / f"{stem}.png")
        mask[rows] = 255
        Image.fromarray(mask).save(tmp / "data" / "masks" / f"{stem}.png")
    torch.manual_seed(0)
    model = fcnseg.get_model("fcn8s", num_classes=4, **TINY)
    with torch.no_grad():  # random but non-trivial predictions
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5) if p.dim() > 1 else p.zero_()
    (tmp / "run").mkdir()
    ckpt = fcnseg.save_checkpoint(model, tmp / "run" / "best.pt", classes=CLASSES)
    _log_csv(tmp / "run" / "log.csv")
    (tmp / "plain").mkdir()
    plain = shutil.copy(ckpt, tmp / "plain" / "m.pt")
    common = ["--dataset", "folder", "--root", str(tmp / "data"), "--split", "val", "--num-workers", "0",
              "--device", "cpu"]  # fmt: skip
    assert main(["eval", str(ckpt), *common, "--out", str(tmp / "with"), "--report-images", "2"]) == 0
    assert main(["eval", str(plain), *common, "--out", str(tmp / "without"), "--report-images", "0"]) == 0
    return SimpleNamespace(tmp=tmp, model=fcnseg.load(ckpt), run=tmp / "with", plain=tmp / "without")


def _page(folder: Path) -> tuple[Page, dict, str]:
    text = (folder / "report.html").read_text(encoding="utf-8")
    return Page(text), json.loads((folder / "metrics.json").read_text()), text


# ------------------------------------------------------------------------------------------------ the tests


@pytest.mark.parametrize("which", ["run", "plain"])
def test_the_figures_shown_are_those_of_metrics_json(evaluated, which):
    page, doc, _ = _page(getattr(evaluated, which))
    assert 0 < doc["mean_iu"] < 1 and 0 < doc["pixel_acc"] < 1  # neither trivial case
    assert page.metrics == {k: pct(doc[k]) for k in ("pixel_acc", "mean_acc", "mean_iu", "fw_iu")}
    assert list(page.rows) == CLASSES == list(doc["per_class"])
    for name, row in page.rows.items():
        expected = doc["per_class"][name]
        assert row == {"iu": pct(expected["iu"]), "acc": pct(expected["acc"]), "pixels": str(expected["pixels"])}
    # The two void images count no pixel: 6 images of 40 x 40 less a 6-row band and a whole image.
    assert sum(int(r["pixels"]) for r in page.rows.values()) == 4 * 1600 + 1600 - 6 * 40


@pytest.mark.parametrize("which", ["run", "plain"])
def test_the_page_is_self_contained_and_every_picture_decodes(evaluated, which):
    page, _, text = _page(getattr(evaluated, which))
    assert page.refs and all(r.startswith("data:image/") for r in page.refs)  # no file, no URL, no CDN
    assert not page.tags & {"script", "link", "iframe", "object"} and "http://" not in text and "https://" not in text
    figures = [decode(i["src"]) for i in page.images if i["section"] in ("figures", "curves")]
    assert [i["alt"] for i in page.images if i["section"] == "figures"] == [
        "confusion matrix (row-normalised)",
        "IU per class",
    ]
    assert all(f.width > 300 and f.height > 150 for f in figures)
    for img in (i for i in page.images if i["section"] in ("worst", "best")):
        assert decode(img["src"]).size == (40, 40)  # shown at the image's own size


def test_curves_come_from_the_run_folder_and_only_from_one(evaluated):
    with_log, _, text = _page(evaluated.run)
    without, _, _ = _page(evaluated.plain)
    assert with_log.sections == ["metrics", "classes", "figures", "curves", "worst", "best"]
    assert without.sections == ["metrics", "classes", "figures"]  # no log.csv beside it, and --report-images 0
    [curves] = [i for i in with_log.images if i["section"] == "curves"]
    assert curves["alt"] == "training curves" and decode(curves["src"]).width > 600
    assert str(evaluated.tmp / "run" / "log.csv") in text


def test_worst_and_best_are_ranked_by_their_own_iu_computed_by_hand(evaluated):
    page, _, text = _page(evaluated.run)
    data, model = evaluated.tmp / "data", evaluated.model
    stems = (data / "val.txt").read_text().split()
    truths = {s: read_mask_png(data / "masks" / f"{s}.png") for s in stems}
    hand = {s: iu_by_hand(model.predict(Image.open(data / "images" / f"{s}.png")), truths[s], 4) for s in stems}
    assert math.isnan(hand["im5"]) and len({v for v in hand.values() if not math.isnan(v)}) == 5  # no ties
    ranked = sorted((s for s in stems if not math.isnan(hand[s])), key=hand.get)
    worst, best = page.figures["worst"], page.figures["best"]
    assert [f["data-name"] for f in worst] == ranked[:2]  # lowest first
    assert [f["data-name"] for f in best] == ranked[::-1][:2]  # highest first
    assert "among the 5 images evaluated, 1 without a labelled pixel left out" in text
    colors = np.asarray(palette_for(CLASSES, 4), np.uint8)
    for fig in worst + best:
        stem = fig["data-name"]
        assert int(fig["data-index"]) == stems.index(stem)
        assert float(fig["data-iu"]) == pytest.approx(hand[stem], abs=1e-12) and fig["iu_text"] == pct(hand[stem])
        image, truth, pred = (decode(i["src"]) for i in fig["imgs"])
        assert [i["alt"] for i in fig["imgs"]] == [f"image {stem}", f"truth {stem}", f"prediction {stem}"]
        source = np.asarray(Image.open(data / "images" / f"{stem}.png"), np.float64)
        # The image itself, as a JPEG: within its noise of the source (other images of the set differ by 25+).
        assert np.abs(np.asarray(image.convert("RGB"), np.float64) - source).mean() < 10
        # The masks are palette PNGs: the pixels are the class indices, the palette the model's colours.
        assert truth.mode == pred.mode == "P"
        assert np.array_equal(np.asarray(truth), truths[stem])
        pred_labels = np.asarray(pred)
        assert np.array_equal(pred_labels, model.predict(Image.open(data / "images" / f"{stem}.png")))
        assert iu_by_hand(pred_labels, np.asarray(truth), 4) == pytest.approx(float(fig["data-iu"]), abs=1e-12)
        palette = np.asarray(pred.getpalette(), np.uint8).reshape(-1, 3)
        assert np.array_equal(palette[:4], colors) and tuple(palette[255]) == VOID_COLOR


def test_a_negative_report_images_is_one_line_and_exit_2(evaluated, capsys):
    tmp = evaluated.tmp
    code = main(["eval", str(tmp / "plain" / "m.pt"), "--dataset", "folder", "--root", str(tmp / "data"),
                 "--out", str(tmp / "bad"), "--report-images", "-1"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err == "fcnseg: error: --report-images -1: expected 0 or more images\n"
    assert not (evaluated.tmp / "bad").exists()  # refused before any work


def test_per_image_matrices_add_up_to_the_batch_matrix():
    # The per-image callback sees each image of a padded batch on its own, and the totals do not change.
    from fcnseg.data.transforms import pad_collate
    from fcnseg.engine.evaluate import evaluate_heads
    from fcnseg.engine.examples import ImageScores

    model = randomise(fcnseg.get_model("fcn32s", num_classes=3, **TINY, dropout=0.0), seed=1).eval()
    g = torch.Generator().manual_seed(2)
    sizes = ((32, 40), (24, 40), (32, 16))
    items = [(torch.randn(3, h, w, generator=g), torch.randint(0, 3, (h, w), generator=g)) for h, w in sizes]
    items[1][1][:4] = 255
    loader = [pad_collate(items[:2]), pad_collate(items[2:])]  # the second image padded with void
    heads = {"out": ["a", "b", "c"]}
    seen, scores = [], ImageScores([7, 3, 5])
    with torch.no_grad():
        plain = evaluate_heads(model, loader, heads)["out"]
        per_image = evaluate_heads(model, loader, heads, on_image=lambda m: (seen.append(m["out"]), scores(m)))["out"]
        batches = [(model(x).argmax(1), m) for x, m in loader]  # each image as its padded batch predicts it
    expected = [
        iu_by_hand(p.numpy(), t.numpy(), 3) for preds, masks in batches for p, t in zip(preds, masks, strict=True)
    ]
    assert torch.equal(plain.mat, per_image.mat) and plain.mat.sum() == 32 * 40 + 20 * 40 + 32 * 16
    assert torch.equal(sum(m.mat for m in seen), plain.mat) and [m.mat.sum().item() for m in seen] == [1280, 800, 512]
    assert [i for i, _ in scores.scores["out"]] == [7, 3, 5]
    assert [s for _, s in scores.scores["out"]] == pytest.approx(expected, abs=1e-12)
    assert len(set(expected)) == 3 and all(0 < v < 1 for v in expected)


def test_rank_leaves_out_nan_and_never_shows_an_image_twice():
    from fcnseg.engine.examples import rank

    pairs = [(0, 0.5), (1, math.nan), (2, 0.1), (3, 0.9), (4, 0.5), (5, 0.3)]
    assert rank(pairs, 2) == ([(2, 0.1), (5, 0.3)], [(3, 0.9), (4, 0.5)])
    assert rank(pairs, 4) == ([(2, 0.1), (5, 0.3), (0, 0.5)], [(3, 0.9), (4, 0.5)])  # 5 ranked: 3 worst, 2 best
    assert rank(pairs, 0) == ([], []) and rank([(0, math.nan)], 3) == ([], [])


def test_scores_are_gathered_from_every_process(monkeypatch):
    # Under torchrun each process scores its shard; the report ranks the union (the collective itself is
    # torch.distributed's all_gather_object: here it hands back this process's scores and another shard's).
    from fcnseg.engine import examples

    scores = examples.ImageScores([0, 2])
    scores({"out": fcnseg.ConfusionMatrix.from_matrix([[3, 1], [0, 4]])})  # IU 3/4 and 4/5
    scores({"out": fcnseg.ConfusionMatrix.from_matrix([[4, 0], [0, 4]])})  # IU 1 and 1
    other = {"out": [(1, 0.25), (3, math.nan)]}
    monkeypatch.setattr(examples, "gather_objects", lambda mine: [mine, other])
    merged = scores.gathered()["out"]
    assert [i for i, _ in merged] == [0, 2, 1, 3]
    assert [s for _, s in merged[:3]] == pytest.approx([(0.75 + 0.8) / 2, 1.0, 0.25]) and math.isnan(merged[3][1])
    assert examples.rank(merged, 1) == ([(1, 0.25)], [(2, 1.0)])


def test_a_two_headed_model_gets_one_report_per_head(tmp_path):
    # SIFT Flow: semantic/report.html and geometric/report.html, each ranking the images by its own head's IU (the
    # semantic one leaving out the classes the test set lacks, as its mean IU does).
    from fcnseg.data import get_dataset
    from fcnseg.data.siftflow import SIFTFLOW_CLASSES
    from tests.models.test_multi import make_scenes

    root = make_scenes(tmp_path / "siftflow")
    model = fcnseg.get_model("fcn16s_twohead", **TINY)
    model.classes = list(SIFTFLOW_CLASSES)
    model.head_classes = {"semantic": list(SIFTFLOW_CLASSES), "geometric": ["sky", "horizontal", "vertical"]}
    randomise(model, seed=3).eval()
    ckpt = fcnseg.save_checkpoint(model, tmp_path / "two.pt")
    out = tmp_path / "eval"
    assert main(["eval", str(ckpt), "--dataset", "siftflow", "--root", str(root), "--split", "test", "--data-option",
                 "target=both", "--out", str(out), "--num-workers", "0", "--report-images", "1"]) == 0  # fmt: skip
    assert not (out / "report.html").exists()
    ds = get_dataset("siftflow", root=root, split="test", target="both")
    excluded = {"semantic": [SIFTFLOW_CLASSES.index(c) for c in ("cow", "desert", "moon")], "geometric": []}
    for k, head in enumerate(("semantic", "geometric")):
        page, doc, _ = _page(out / head)
        assert page.metrics["mean_iu"] == pct(doc["mean_iu"]) and list(page.rows) == list(doc["per_class"])
        n = len(doc["per_class"])
        hand = {}
        for i in range(len(ds)):
            image, masks = ds[i]
            pred = model.predict(ds.load_pair(i)[0])[head]
            hand[ds.ids[i]] = iu_by_hand(pred, masks[k].numpy(), n, excluded[head])
        ranked = sorted(hand, key=hand.get)
        [worst], [best] = page.figures["worst"], page.figures["best"]
        assert (worst["data-name"], best["data-name"]) == (ranked[0], ranked[-1])
        assert float(worst["data-iu"]) == pytest.approx(hand[ranked[0]], abs=1e-12)
        assert np.asarray(decode(best["imgs"][2]["src"])).max() < n  # this head's labels


def test_the_report_opens_in_headless_chromium(evaluated, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    browser = shutil.which("chromium") or "/usr/bin/chromium"
    driver_path = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    for path, package in ((browser, "chromium"), (driver_path, "chromium-driver")):
        if not Path(path).exists():
            pytest.skip(f"{path} not found: apt-get install chromium chromium-driver (package {package})")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(arg)
    page, doc, _ = _page(evaluated.run)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get((evaluated.run / "report.html").as_uri())
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight])"
        )
        shown = driver.execute_script("return document.querySelector('td[data-metric=\"mean_iu\"]').innerText")
        fetched = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1200, height + 120)
        driver.save_screenshot(str(tmp_path / "report.png"))
    finally:
        driver.quit()
    assert len(images) == len(page.images) == 2 + 1 + 3 * 4
    assert all(complete and w > 0 and h > 0 for complete, w, h in images), images  # no broken image
    assert shown == pct(doc["mean_iu"]) and fetched == []  # nothing was fetched: no file beside it, no network
    with Image.open(tmp_path / "report.png") as shot:
        assert shot.width >= 1000 and shot.height > 1500
        assert len(shot.convert("RGB").getcolors(1 << 20) or []) > 100  # drawn, not blank
