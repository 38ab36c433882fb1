"""An oracle for the Caffe import that fcnseg did not write: OpenCV's DNN module runs the release's deploy nets.

The other Caffe tests check the import against PyTorch references that the tests compute. This one writes the deploy
``.prototxt`` of each release net as text, with the release's layer names, ``pad: 100`` on conv1_1, ceil max
pooling, Deconvolution without bias, Crop layers with their ``axis: 2`` offsets (5 / 9 / 19 / 27 / 31), Eltwise
sums and, for FCN-8s at once, the Scale layers, and a ``.caffemodel`` with random non-zero weights, biases and
upsampling kernels for the same layers. ``cv2.dnn.readNetFromCaffe`` computes the net from these two files with
its own protobuf reader and its own layers; ``fcnseg convert`` imports the caffemodel and the model computes the
same input. Both see the raw network input (the model's forward does no preprocessing).

The nets are VGG16 at an eighth of its widths (fc6 / fc7 of 16 channels): the importer reads the widths off the
blobs, and the geometry (pad 100, pooling, crops) is the released one, so any odd input size works.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

cv2 = pytest.importorskip(
    "cv2", reason="the OpenCV oracle needs opencv-python-headless<5 (OpenCV 5 dropped the Caffe reader)"
)
if not hasattr(cv2, "dnn") or not hasattr(cv2.dnn, "readNetFromCaffe"):
    pytest.skip("this OpenCV build has no Caffe reader (cv2.dnn.readNetFromCaffe)", allow_module_level=True)

from fcnseg.cli import main  # noqa: E402
from fcnseg.hub import load  # noqa: E402
from fcnseg.models.caffe_proto import CaffeLayer  # noqa: E402
from tests.caffe_files import write_caffemodel  # noqa: E402
from tests.helpers import span_error  # noqa: E402

VGG16 = [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]]
WIDTH, FC_DIM = 1 / 8, 16
# The release's crop offsets (the numbers in its deploy prototxts), and FCN-8s at once's Scale factors.
SKIP_CROP = {"pool4": 5, "pool3": 9}
FINAL_CROP = {(): 19, ("pool4",): 27, ("pool4", "pool3"): 31}
ATONCE_SCALE = {"pool4": 0.01, "pool3": 0.0001}
SIZES = [(1, 37, 53), (2, 67, 45)]  # (batch, height, width): odd sizes, neither a multiple of 32


class DeployNet:
    """One net described once and written twice: deploy prototxt text (the layers and their parameters, for
    OpenCV) and the layer list with blobs that fcnseg's writer turns into the .caffemodel (the blobs, for both).
    Caffe saves every layer of a net in its caffemodel, parameters included: so does this (Eltwise coefficients,
    the Scale blobs, the structural layers)."""

    def __init__(self, name: str, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.text = [f'name: "{name}"']
        self.layers: list[CaffeLayer] = []
        self.channels: dict[str, int] = {}

    def _layer(self, name, kind, bottoms, tops, param="", blobs=(), coeff=()):
        lines = ["layer {", f'  name: "{name}"', f'  type: "{kind}"']
        lines += [f'  bottom: "{b}"' for b in bottoms] + [f'  top: "{t}"' for t in tops]
        lines += [f"  {param}"] if param else []
        self.text.append("\n".join([*lines, "}"]))
        self.layers.append(CaffeLayer(name, kind, list(blobs), list(bottoms), list(tops), list(coeff)))

    def _random(self, *shape, std):
        return (self.rng.standard_normal(shape) * std).astype(np.float32)

    def input(self, name: str, channels: int) -> None:
        shape = f"dim: 1 dim: {channels} dim: 500 dim: 500"  # the deploy nets' 500 x 500; setInput reshapes
        self._layer(name, "Input", [], [name], f"input_param {{ shape {{ {shape} }} }}")
        self.channels[name] = channels

    def conv(self, name, bottom, out, kernel=3, pad=1, gain=1.0):
        c = self.channels[bottom]
        weight = self._random(out, c, kernel, kernel, std=gain * (2 / (c * kernel * kernel)) ** 0.5)
        bias = self._random(out, std=0.2)
        param = f"convolution_param {{ num_output: {out} pad: {pad} kernel_size: {kernel} stride: 1 }}"
        self._layer(name, "Convolution", [bottom], [name], param, [weight, bias])
        self.channels[name] = out
        return name

    def relu(self, name, blob):
        self._layer(name, "ReLU", [blob], [blob])

    def dropout(self, name, blob):
        self._layer(name, "Dropout", [blob], [blob], "dropout_param { dropout_ratio: 0.5 }")

    def pool(self, name, bottom):
        self._layer(name, "Pooling", [bottom], [name], "pooling_param { pool: MAX kernel_size: 2 stride: 2 }")
        self.channels[name] = self.channels[bottom]
        return name

    def deconv(self, name, bottom, kernel, stride):
        # Random kernels, not the release's bilinear ones: a flipped, transposed or swapped kernel shows.
        c = self.channels[bottom]
        weight = self._random(c, c, kernel, kernel, std=(stride / kernel) / c**0.5)
        param = (f"convolution_param {{ num_output: {c} bias_term: false kernel_size: {kernel} "
                 f"stride: {stride} }}")  # fmt: skip
        self._layer(name, "Deconvolution", [bottom], [name], param, [weight])
        self.channels[name] = c
        return name

    def crop(self, name, bottom, like, offset):
        self._layer(name, "Crop", [bottom, like], [name], f"crop_param {{ axis: 2 offset: {offset} }}")
        self.channels[name] = self.channels[bottom]
        return name

    def eltwise(self, name, bottoms, coeff=()):
        param = " ".join(["operation: SUM", *(f"coeff: {c}" for c in coeff)])
        self._layer(name, "Eltwise", bottoms, [name], f"eltwise_param {{ {param} }}", coeff=coeff)
        self.channels[name] = self.channels[bottoms[0]]
        return name

    def scale(self, name, bottom, value):
        # As the release declares it (a constant filler, lr_mult 0): one factor per channel, no bias.
        factor = np.full(self.channels[bottom], value, np.float32)
        self._layer(name, "Scale", [bottom], [name], f'scale_param {{ filler {{ type: "constant" value: {value} }} }}',
                    [factor])  # fmt: skip
        self.channels[name] = self.channels[bottom]
        return name

    def write(self, folder, stem):
        prototxt, caffemodel = folder / f"{stem}.prototxt", folder / f"{stem}.caffemodel"
        prototxt.write_text("\n".join(self.text) + "\n")
        write_caffemodel(caffemodel, self.layers, name=stem)
        return prototxt, caffemodel


def vgg_trunk(net: DeployNet, data: str, suffix: str = "") -> dict[str, str]:
    """conv1_1 ... drop7 as the release's net.py (fcn.berkeleyvision.org, not in this repository) writes them
    (``suffix``: a stream's, as in conv1_1color)."""
    bottom, taps = data, {}
    for b, block in enumerate(VGG16, 1):
        for i, c in enumerate(block, 1):
            name = f"conv{b}_{i}{suffix}"
            bottom = net.conv(name, bottom, round(c * WIDTH), pad=100 if (b, i) == (1, 1) else 1)
            net.relu(f"relu{b}_{i}{suffix}", name)
        bottom = taps[f"pool{b}"] = net.pool(f"pool{b}{suffix}", bottom)
    for n, kernel in ((6, 7), (7, 1)):
        bottom = net.conv(f"fc{n}{suffix}", bottom, FC_DIM, kernel=kernel, pad=0)
        net.relu(f"relu{n}{suffix}", bottom)
        net.dropout(f"drop{n}{suffix}", bottom)
    taps["fc7"] = bottom
    return taps


def score_head(net, taps, data, classes, skips, *, suffix="", atonce=False):
    """score_fr ... score: the release's voc-fcn{32,16,8}s (and at-once) heads; ``suffix``: siftflow's _sem / _geo."""
    score = net.conv(f"score_fr{suffix}", taps["fc7"], classes, kernel=1, pad=0)
    previous = None
    for tap in skips:
        up = net.deconv(f"upscore2{suffix}" if previous is None else f"upscore_{previous}{suffix}", score, 4, 2)
        source, gain = taps[tap], 1.0
        if atonce:
            # The tap scaled down before scoring, and score weights as much larger as training makes them: each tap
            # then weighs in the output as much as in the staged nets, so a wrong crop of pool3 (x 1e-4) shows.
            source = net.scale(f"scale_{tap}{suffix}", source, ATONCE_SCALE[tap])
            gain = 1 / ATONCE_SCALE[tap]
        s = net.conv(f"score_{tap}{suffix}", source, classes, kernel=1, pad=0, gain=gain)
        s = net.crop(f"score_{tap}{suffix}c", s, up, SKIP_CROP[tap])
        score = net.eltwise(f"fuse_{tap}{suffix}", [up, s])
        previous = tap
    last, kernel, stride = {(): ("upscore", 64, 32), ("pool4",): ("upscore16", 32, 16)}.get(
        tuple(skips), ("upscore8", 16, 8)
    )
    up = net.deconv(last + suffix, score, kernel, stride)
    return net.crop(f"score{suffix}", up, data, FINAL_CROP[tuple(skips)])


def voc_net(skips, atonce=False):
    def build(seed):
        net = DeployNet("voc-fcn", seed)
        net.input("data", 3)
        taps = vgg_trunk(net, "data")
        return net, {"out": score_head(net, taps, "data", 5, skips, atonce=atonce)}, ["data"]

    return build


def siftflow_fcn16s(seed):
    # siftflow-fcn16s: one trunk, a semantic and a geometric FCN-16s head on it, every head layer suffixed.
    net = DeployNet("siftflow-fcn16s", seed)
    net.input("data", 3)
    taps = vgg_trunk(net, "data")
    sem = score_head(net, taps, "data", 6, ["pool4"], suffix="_sem")
    geo = score_head(net, taps, "data", 3, ["pool4"], suffix="_geo")
    return net, {"semantic": sem, "geometric": geo}, ["data"]


def nyud_fcn32s_color_hha(seed):
    # nyud-fcn32s-color-hha: two input blobs, a VGG16 stream on each (layers suffixed color / hha), their score_fr
    # averaged by an Eltwise with coeff 0.5, 0.5, then one upscore and one crop against the colour input.
    net = DeployNet("nyud-fcn32s-color-hha", seed)
    scores = []
    for stream in ("color", "hha"):
        net.input(stream, 3)
    for stream in ("color", "hha"):
        taps = vgg_trunk(net, stream, stream)
        scores.append(net.conv(f"score_fr{stream}", taps["fc7"], 4, kernel=1, pad=0))
    fused = net.eltwise("score_fused", scores, coeff=(0.5, 0.5))
    up = net.deconv("upscore", fused, 64, 32)
    return net, {"out": net.crop("score", up, "color", FINAL_CROP[()])}, ["color", "hha"]


CASES = {
    "fcn32s": (voc_net([]), "fcn32s"),
    "fcn16s": (voc_net(["pool4"]), "fcn16s"),
    "fcn8s": (voc_net(["pool4", "pool3"]), "fcn8s"),
    "fcn8s-atonce": (voc_net(["pool4", "pool3"], atonce=True), "fcn8s_atonce"),
    "siftflow-fcn16s-two-head": (siftflow_fcn16s, "fcn16s_twohead"),
    "nyud-fcn32s-color-hha": (nyud_fcn32s_color_hha, "fcn32s_rgb_hha"),
}


def opencv_forward(prototxt, caffemodel, inputs: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
    net = cv2.dnn.readNetFromCaffe(str(prototxt), str(caffemodel))
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
    for name, blob in inputs.items():
        net.setInput(np.ascontiguousarray(blob, dtype=np.float32), name)
    return list(net.forward(outputs))


@pytest.mark.parametrize("case", list(CASES))
def test_opencv_runs_the_release_net_as_fcnseg_imports_it(case, tmp_path):
    build, expected_model = CASES[case]
    net, outputs, inputs = build(seed=sum(map(ord, case)))
    prototxt, caffemodel = net.write(tmp_path, case)
    converted = tmp_path / f"{case}.pt"
    assert main(["convert", str(caffemodel), "--out", str(converted)]) == 0
    model = load(converted)
    assert model.build_config["name"] == expected_model and model.alignment == "caffe"

    rng = np.random.default_rng(1)
    for n, h, w in SIZES:
        x = rng.standard_normal((n, 3 * len(inputs), h, w)).astype(np.float32)
        feeds = {name: x[:, 3 * i : 3 * i + 3] for i, name in enumerate(inputs)}  # fcnseg: RGB then HHA channels
        expected = opencv_forward(prototxt, caffemodel, feeds, list(outputs.values()))
        with torch.no_grad():
            got = model(torch.from_numpy(x)).numpy()
        # fcnseg concatenates a two-headed net's scores, head by head, in the order of model.heads.
        assert list(model.heads) == list(outputs)
        start = 0
        for (head, blob), oracle in zip(outputs.items(), expected, strict=True):
            assert oracle.shape == (n, model.heads[head], h, w), (head, oracle.shape)
            ours = got[:, start : start + oracle.shape[1]]
            start += oracle.shape[1]
            err = span_error(ours, oracle)
            assert err <= 1e-4, f"{case} {blob} at {n}x{h}x{w}: max |fcnseg - OpenCV| = {err:.2e} of the span"
        assert start == got.shape[1]
