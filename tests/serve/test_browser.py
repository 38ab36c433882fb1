"""The page at ``/`` in a real browser: ``fcnseg serve`` runs as a process on a free loopback port and headless
Chromium (Debian's, through selenium and the system chromedriver) uploads a photo to it.

The model is the red detector (``tests/serve/serving.py``): its mask is known, so the canvas pixels, the legend,
the hover text and the downloaded PNG can each be checked against values computed here.
"""

from __future__ import annotations

import base64
import re
import urllib.request
import uuid

import numpy as np
import pytest
from PIL import Image

import fcnseg
from fcnseg.imageio import colorize
from tests.serve.serving import (
    RED_CLASSES,
    RED_PALETTE,
    chromium,
    have_chromium,
    red_checkpoint,
    red_photo,
    serving,
)

pytest.importorskip("fastapi")
pytest.importorskip("multipart")
pytest.importorskip("selenium")
pytestmark = pytest.mark.skipif(
    not have_chromium(),
    reason="needs Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver): "
    "apt-get install chromium chromium-driver (.ci/run does)",
)

CANVAS_PIXELS = """
const c = document.getElementById("canvas");
const data = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
let s = ""; for (let i = 0; i < data.length; i++) s += String.fromCharCode(data[i]);
return [c.width, c.height, btoa(s)];
"""

WATCH_PROGRESS = """
window.progressTexts = [];
const box = document.getElementById("progress");
new MutationObserver(() => { if (!box.hidden) window.progressTexts.push(box.textContent.trim()); })
  .observe(box, { attributes: true, childList: true, subtree: true, characterData: true });
"""

DOWNLOADED = """
const done = arguments[arguments.length - 1];
const link = document.getElementById("download");
fetch(link.href).then((r) => r.arrayBuffer()).then((b) => {
  let s = ""; for (const v of new Uint8Array(b)) s += String.fromCharCode(v);
  done([link.download, btoa(s)]);
});
"""


def _wait(driver, predicate, timeout: float = 30):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: predicate(d))


RECOLOUR = """const [r, g, b] = arguments[0], d = state.mask.data;
for (let i = 0; i < d.length; i += 4) { if (d[i] === r && d[i + 1] === g && d[i + 2] === b) d.fill(0, i, i + 3); }
blend();"""


def _canvas(driver, recolor_background_black: bool = False) -> np.ndarray:
    if recolor_background_black:
        driver.execute_script(RECOLOUR, RED_PALETTE[0])
    w, h, data = driver.execute_script(CANVAS_PIXELS)
    return np.frombuffer(base64.b64decode(data), np.uint8).reshape(h, w, 4)


def _set_opacity(driver, percent: int) -> None:
    driver.execute_script(
        "const s = document.getElementById('opacity'); s.value = arguments[0];s.dispatchEvent(new Event('input'));",
        percent,
    )


def _served_png(url: str, path) -> bytes:
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{path.name}"\r\n\r\n'.encode()
            + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode())  # fmt: skip
    request = urllib.request.Request(f"{url}predict", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=60) as r:
        return r.read()


def _hover_text(driver, x: int, y: int) -> str:
    """Move the mouse over canvas pixel (x, y) (selenium's offsets count from the element's centre, border
    included) and read the hover text."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    canvas = driver.find_element(By.ID, "canvas")
    box = driver.execute_script(
        "const c = arguments[0], r = c.getBoundingClientRect();"
        "return [r.width, r.height, c.clientLeft, c.clientTop, c.clientWidth / c.width];",
        canvas,
    )
    width, height, left, top, scale = box
    dx, dy = round(left + (x + 0.5) * scale - width / 2), round(top + (y + 0.5) * scale - height / 2)
    ActionChains(driver).move_to_element_with_offset(canvas, dx, dy).perform()
    return _wait(
        driver, lambda d: d.find_element(By.ID, "hover").is_displayed() and d.find_element(By.ID, "hover").text
    )


def test_the_page_segments_a_photo_in_chromium(tmp_path):
    from selenium.webdriver.common.by import By

    ckpt = red_checkpoint(tmp_path / "red.pt")
    photo = red_photo()  # 96 x 128: red on the left, blue-grey on the right
    photo_path = tmp_path / "photo.png"
    Image.fromarray(photo).save(photo_path)
    mask = fcnseg.load(ckpt).predict(photo)
    colors = colorize(mask, np.array(RED_PALETTE, np.uint8))
    shares = np.bincount(mask.ravel(), minlength=2) / mask.size
    bad = tmp_path / "notes.png"
    bad.write_text("this is not a picture\n")

    with serving(ckpt) as server, chromium() as driver:
        driver.get(server.url)
        card = _wait(driver, lambda d: "background, red" in d.find_element(By.ID, "card").text and d.find_element(
            By.ID, "card").text)  # fmt: skip
        driver.execute_script(WATCH_PROGRESS)
        driver.find_element(By.ID, "file").send_keys(str(photo_path))
        _wait(driver, lambda d: d.find_element(By.ID, "result").is_displayed())
        progress_seen = driver.execute_script("return window.progressTexts;")
        legend = [li.text.split("\n") for li in driver.find_elements(By.CSS_SELECTOR, "#legend li")]
        blended = _canvas(driver)
        _set_opacity(driver, 100)
        solid = _canvas(driver)
        hover_left, hover_right = _hover_text(driver, 10, 40), _hover_text(driver, 120, 40)
        download_name, downloaded = driver.execute_async_script(DOWNLOADED)
        served = _served_png(server.url, photo_path)
        driver.save_screenshot(str(tmp_path / "page.png"))
        # A class drawn black (background, as palette_for draws it) is left untinted at any opacity: the mask's
        # background pixels recoloured black in the page's own state, then blended again.
        untinted = _canvas(driver, recolor_background_black=True)

        driver.find_element(By.ID, "file").send_keys(str(bad))
        error = _wait(driver, lambda d: d.find_element(By.ID, "error").is_displayed() and d.find_element(
            By.ID, "error").text)  # fmt: skip
        progress_hidden = not driver.find_element(By.ID, "progress").is_displayed()

    # The model card shows the model's classes.
    assert "Classes\n2: background, red" in card and "fcn32s" in card
    # At 100% opacity the canvas is the mask's colours, pixel for pixel: red (250, 200, 0) on the left, background
    # (20, 120, 220) on the right, the boundary where the model puts it.
    assert solid.shape == (96, 128, 4) and (solid[..., 3] == 255).all()
    np.testing.assert_array_equal(solid[..., :3], colors)
    assert solid[40, 10, :3].tolist() == RED_PALETTE[1] and solid[40, 120, :3].tolist() == RED_PALETTE[0]
    # At the default 50% the photo shows through: the blend of photo and mask colours.
    expected = 0.5 * photo.astype(np.float64) + 0.5 * colors
    assert np.abs(blended[..., :3] - expected).max() <= 0.5 + 1e-9
    background = mask == 0
    assert background.any() and (~background).any()
    np.testing.assert_array_equal(untinted[background][:, :3], photo[background])
    np.testing.assert_array_equal(untinted[~background][:, :3], colors[~background])  # 100%: the mask's colour
    # The legend lists the classes present, largest first, with their shares.
    order = np.argsort(-shares)
    assert legend == [[RED_CLASSES[k], f"{100 * shares[k]:.1f}%"] for k in order]
    # Hovering names the class under the cursor (within a pixel of where the mouse was put: layout rounding).
    for text, (x, y) in ((hover_left, (10, 40)), (hover_right, (120, 40))):
        label, share, at_x, at_y = re.fullmatch(r"(\w+) \((\d+\.\d)% of the image\) at (\d+), (\d+)", text).groups()
        k = mask[int(at_y), int(at_x)]
        assert abs(int(at_x) - x) <= 1 and abs(int(at_y) - y) <= 1
        assert (label, share) == (RED_CLASSES[k], f"{100 * shares[k]:.1f}")
    assert "red" in hover_left and "background" in hover_right
    # The download is the served mask PNG itself.
    assert download_name == "photo.png" and base64.b64decode(downloaded) == served
    assert (tmp_path / "page.png").read_bytes().startswith(b"\x89PNG")
    # A bad file gives a readable error, not a blank page.
    assert error == ("Could not segment the image: notes.png: cannot read image (not an image file in a format "
                     "read here; expected PNG, JPEG, BMP, TIFF, WebP, GIF or PPM)")  # fmt: skip
    assert progress_hidden
    # While the upload and the segmentation ran, the progress indicator said so.
    assert any(t.startswith("Uploading") for t in progress_seen) and "Segmenting…" in progress_seen
    assert "POST /predict 200" in server.log() and "POST /predict 400" in server.log(), server.log()


def test_the_page_asks_for_the_api_key_and_sends_it(tmp_path):
    """A server started with a key (here from FCNSEG_API_KEY) serves the page to anyone; the page asks for the key,
    says so when it is refused, and sends it with the model card and upload requests."""
    from selenium.webdriver.common.by import By

    key = "page-test-key-7f3a"
    ckpt = red_checkpoint(tmp_path / "red.pt")
    photo_path = tmp_path / "photo.png"
    Image.fromarray(red_photo()).save(photo_path)
    with serving(ckpt, "--runtime", "eager", env={"FCNSEG_API_KEY": key}) as server, chromium() as driver:
        driver.get(server.url)
        _wait(driver, lambda d: d.find_element(By.ID, "key-form").is_displayed())
        asked = driver.find_element(By.ID, "model-name").text
        driver.find_element(By.ID, "key").send_keys("not-the-key-123")
        driver.find_element(By.ID, "key-submit").click()
        refused = _wait(driver, lambda d: d.find_element(By.ID, "error").is_displayed() and d.find_element(
            By.ID, "error").text)  # fmt: skip
        driver.find_element(By.ID, "key").send_keys(key)
        driver.find_element(By.ID, "key-submit").click()
        card = _wait(driver, lambda d: "background, red" in d.find_element(By.ID, "card").text and d.find_element(
            By.ID, "card").text)  # fmt: skip
        form_hidden = not driver.find_element(By.ID, "key-form").is_displayed()
        driver.find_element(By.ID, "file").send_keys(str(photo_path))
        _wait(driver, lambda d: d.find_element(By.ID, "result").is_displayed())
        legend = [li.text.split("\n")[0] for li in driver.find_elements(By.CSS_SELECTOR, "#legend li")]
        kept = driver.execute_script("return sessionStorage.getItem('fcnseg-api-key');")
        log = server.log()
    assert asked == "an API key is needed"
    assert refused == "The server refused this API key: check it and enter it again."
    assert "fcn32s" in card and form_hidden and kept == key
    assert sorted(legend) == ["background", "red"]
    # The page and its files needed no key; the card needed it (refused twice, then given), and so did the upload.
    assert "GET / 200" in log and "GET /static/app.js 200" in log
    assert log.count("GET /model 401") == 2 and "GET /model 200" in log and "POST /predict 200" in log, log
