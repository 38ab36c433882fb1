"""The README's picture of the ``fcnseg serve`` page (docs/serve.png), taken from the real page in headless Chromium.

It serves CHECKPOINT with ``fcnseg serve``, uploads a synthetic-shapes image (the demo's data, drawn at --size)
through the page, waits for the overlay and hovers over the image, then saves the window as a palette PNG.

    fcnseg demo --quick --out runs/demo          # the demo's FCN-8s, trained on synthetic shapes (the picture's)
    python docs/serve_screenshot.py runs/demo/fcn8s/best.pt --out docs/serve.png

Run it from the repository root (it uses the serve tests' helpers, tests/serve/serving.py).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fcnseg.data.synthetic import render  # noqa: E402
from tests.serve.serving import chromium, serving  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--out", default="docs/serve.png")
    ap.add_argument("--size", nargs=2, type=int, default=[192, 256], metavar=("H", "W"))
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--colours", type=int, default=256, help="palette size of the saved PNG (default: 256)")
    args = ap.parse_args()

    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    image, _ = render(np.random.default_rng(args.seed), *args.size)
    with tempfile.TemporaryDirectory() as tmp:
        photo = Path(tmp) / "shapes.png"
        Image.fromarray(image).save(photo)
        with serving(args.checkpoint) as server, chromium(1180, 860) as driver:
            driver.get(server.url)
            WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "card").text)
            driver.find_element(By.ID, "file").send_keys(str(photo))
            WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, "result").is_displayed())
            canvas = driver.find_element(By.ID, "canvas")
            ActionChains(driver).move_to_element_with_offset(canvas, -60, -40).perform()
            shot = Path(tmp) / "shot.png"
            driver.save_screenshot(str(shot))
        # A palette image of the screenshot: a small file for the repository, the page's few flat colours intact.
        # Octree keeps small flat areas (the legend's swatches) their own colours; median cut merged some of them.
        rgb = Image.open(shot).convert("RGB")
        palette = rgb.quantize(args.colours, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
        palette.save(args.out, optimize=True)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
