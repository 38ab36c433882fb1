"""Caffe .caffemodel -> fcnseg: every tensor lands where it belongs and the outputs equal the release's net.

The test writes VGG16-FCN caffemodels with the release's layer names (conv1_1 ... score_pool3, upscore8, Crop,
Eltwise, Scale for FCN-8s at once) and random blobs, at a reduced width so that they stay small, plus one at
VGG16's full convolution widths. The reference output is computed here from the layer list alone, the way the
release's net.py wires it (one in each net's folder of github.com/shelhamer/fcn.berkeleyvision.org, not in this
repository): conv1_1 padded by 100, ceil pooling, and the release's crops 5 / 9 / 19 / 27 / 31 written out as the
constants Caffe printed (fcnseg derives them; here they are the expected values).
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fcnseg.checkpoint import read_checkpoint
from fcnseg.cli import main
from fcnseg.errors import FcnsegError
from fcnseg.hub import load
from fcnseg.models.caffe_proto import CaffeLayer, read_caffemodel
from fcnseg.models.convert import caffe_layer_names, caffe_to_fcnseg
from fcnseg.models.registry import get_model
from fcnseg.preprocessing import CAFFE
from tests.caffe_files import write_caffemodel
from tests.helpers import assert_span_close

VGG = [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]]
SKIPS = {"fcn32s": [], "fcn16s": ["pool4"], "fcn8s": ["pool4", "pool3"], "fcn8s_atonce": ["pool4", "pool3"]}
FINAL_CROP = {"fcn32s": 19, "fcn16s": 27, "fcn8s": 31, "fcn8s_atonce": 31}
SKIP_CROP = {"pool4": 5, "pool3": 9}
ATONCE_SCALE = {"pool4": 0.01, "pool3": 1e-4}


def _blob(rng, *shape, fan_in=None):
    std = (2 / fan_in) ** 0.5 if fan_in else 0.1
    return (rng.standard_normal(shape) * std).astype(np.float32)


def fcn_layers(model: str, *, width=0.25, fc_dim=32, classes=5, seed=0, fc_as_inner_product=False):
    """The layer list of the release's voc-<model>/net.py, with random blobs."""
    rng = np.random.default_rng(seed)
    layers = [CaffeLayer("data", "Input", tops=["data"])]
    c_in, bottom = 3, "data"
    for b, block in enumerate(VGG, 1):
        for i, c in enumerate(block, 1):
            c = round(c * width)
            name = f"conv{b}_{i}"
            blobs = [_blob(rng, c, c_in, 3, 3, fan_in=9 * c_in), _blob(rng, c)]
            layers += [CaffeLayer(name, "Convolution", blobs, [bottom], [name])]
            layers += [CaffeLayer(f"relu{b}_{i}", "ReLU", bottoms=[name], tops=[name])]
            c_in, bottom = c, name
        layers += [CaffeLayer(f"pool{b}", "Pooling", bottoms=[bottom], tops=[f"pool{b}"])]
        bottom = f"pool{b}"
    fc = "InnerProduct" if fc_as_inner_product else "Convolution"
    fc6 = _blob(rng, fc_dim, c_in, 7, 7, fan_in=49 * c_in)
    fc7 = _blob(rng, fc_dim, fc_dim, 1, 1, fan_in=fc_dim)
    if fc_as_inner_product:  # a classifier's matrices: the same numbers, flattened
        fc6, fc7 = fc6.reshape(fc_dim, -1), fc7.reshape(fc_dim, -1)
    layers += [
        CaffeLayer("fc6", fc, [fc6, _blob(rng, fc_dim)], ["pool5"], ["fc6"]),
        CaffeLayer("relu6", "ReLU", bottoms=["fc6"], tops=["fc6"]),
        CaffeLayer("drop6", "Dropout", bottoms=["fc6"], tops=["fc6"]),
        CaffeLayer("fc7", fc, [fc7, _blob(rng, fc_dim)], ["fc6"], ["fc7"]),
        CaffeLayer("relu7", "ReLU", bottoms=["fc7"], tops=["fc7"]),
        CaffeLayer("drop7", "Dropout", bottoms=["fc7"], tops=["fc7"]),
        CaffeLayer("score_fr", "Convolution", [_blob(rng, classes, fc_dim, 1, 1, fan_in=fc_dim), _blob(rng, classes)]),
    ]
    previous = None
    for tap in SKIPS[model]:
        up = "upscore2" if previous is None else f"upscore_{previous}"
        layers.append(CaffeLayer(up, "Deconvolution", [_blob(rng, classes, classes, 4, 4, fan_in=classes)]))
        tap_channels = round(VGG[int(tap[-1]) - 1][-1] * width)
        if model == "fcn8s_atonce":
            factor = np.full(tap_channels, ATONCE_SCALE[tap], np.float32)
            layers.append(CaffeLayer(f"scale_{tap}", "Scale", [factor], [tap], [f"scale_{tap}"]))
        score = [_blob(rng, classes, tap_channels, 1, 1, fan_in=tap_channels), _blob(rng, classes)]
        layers += [
            CaffeLayer(f"score_{tap}", "Convolution", score),
            CaffeLayer(f"score_{tap}c", "Crop"),
            CaffeLayer(f"fuse_{tap}", "Eltwise"),
        ]
        previous = tap
    last = "upscore" if not SKIPS[model] else f"upscore{8 if previous == 'pool3' else 16}"
    k = {"upscore": 64, "upscore16": 32, "upscore8": 16}[last]
    layers.append(CaffeLayer(last, "Deconvolution", [_blob(rng, classes, classes, k, k, fan_in=classes)]))
    layers += [CaffeLayer("score", "Crop"), CaffeLayer("loss", "SoftmaxWithLoss")]
    return layers


def reference_forward(layers, model: str, x: torch.Tensor) -> torch.Tensor:
    """The release's FCN computed from Caffe layers, independently of fcnseg's model code."""
    p = {layer.name: [torch.from_numpy(b) for b in layer.blobs] for layer in layers if layer.blobs}
    h, feats = x, {}
    for b, block in enumerate(VGG, 1):
        for i in range(1, len(block) + 1):
            w, bias = p[f"conv{b}_{i}"]
            h = F.relu(F.conv2d(h, w, bias, padding=100 if (b, i) == (1, 1) else 1))
        h = F.max_pool2d(h, 2, 2, ceil_mode=True)
        feats[f"pool{b}"] = h
    for name in ("fc6", "fc7"):
        w, bias = p[name]
        k = 7 if name == "fc6" else 1
        h = F.relu(F.conv2d(h, w.reshape(w.shape[0], -1, k, k), bias.reshape(-1)))
    score = F.conv2d(h, *p["score_fr"])
    previous = None
    for tap in SKIPS[model]:
        up = "upscore2" if previous is None else f"upscore_{previous}"
        score = F.conv_transpose2d(score, p[up][0], stride=2)
        t = feats[tap] * p[f"scale_{tap}"][0].view(1, -1, 1, 1) if f"scale_{tap}" in p else feats[tap]
        s = F.conv2d(t, *p[f"score_{tap}"])
        o = SKIP_CROP[tap]
        score = score + s[:, :, o : o + score.shape[2], o : o + score.shape[3]]
        previous = tap
    last = [n for n in p if n.startswith("upscore") and n != "upscore2" and not n.startswith("upscore_")][0]
    out = F.conv_transpose2d(score, p[last][0], stride={"upscore": 32, "upscore16": 16, "upscore8": 8}[last])
    o = FINAL_CROP[model]
    return out[:, :, o : o + x.shape[2], o : o + x.shape[3]]


def _check_outputs(model, layers, name):
    torch.manual_seed(0)
    for h, w in [(19, 33), (71, 45)]:
        x = torch.randn(1, 3, h, w)
        with torch.no_grad():
            expected, got = reference_forward(layers, name, x), model(x)
        assert got.shape == expected.shape == (1, 5, h, w)
        assert_span_close(got, expected, msg=(name, h, w))


@pytest.mark.parametrize("name", list(SKIPS))
def test_caffemodel_converts_to_the_same_network(name, tmp_path):
    layers = fcn_layers(name)
    src, dst = tmp_path / f"{name}.caffemodel", tmp_path / f"{name}.pt"
    write_caffemodel(src, layers, name=name)
    assert main(["convert", str(src), "--out", str(dst)]) == 0  # format and variant found from the file
    model = load(dst)
    assert model.build_config["name"] == name and model.alignment == "caffe" and model.preprocessing == CAFFE
    names = caffe_layer_names(model)
    state = read_checkpoint(dst)["state_dict"]
    scales = {layer.bottoms[0]: layer.blobs[0] for layer in layers if layer.type == "Scale"}
    for layer in layers:
        if layer.type in ("Convolution", "Deconvolution"):
            for kind, blob in zip(["weight", "bias"], layer.blobs, strict=False):
                assert torch.equal(state[f"{names[layer.name]}.{kind}"], torch.from_numpy(blob)), layer.name
    assert set(scales) == ({"pool4", "pool3"} if name == "fcn8s_atonce" else set())
    assert len(state) == sum(len(layer.blobs) for layer in layers if layer.type != "Scale")
    _check_outputs(model, layers, name)


def test_full_vgg16_widths_and_a_non_default_scale(tmp_path):
    # VGG16's real convolution shapes (fc6/fc7 narrowed to keep the file small), and Scale factors other than
    # the released 0.01 / 1e-4: they are folded into the score layers' input columns, exactly.
    layers = fcn_layers("fcn8s_atonce", width=1.0, fc_dim=16, seed=3)
    for layer in layers:
        if layer.type == "Scale":
            layer.blobs = [np.linspace(0.5, 2.0, layer.blobs[0].size).astype(np.float32) * layer.blobs[0]]
    write_caffemodel(tmp_path / "full.caffemodel", layers)
    ckpt = caffe_to_fcnseg(read_caffemodel(tmp_path / "full.caffemodel")[1])
    assert ckpt["state_dict"]["backbone.features.28.weight"].shape == (512, 512, 3, 3)
    assert ckpt["state_dict"]["backbone.fc6.weight"].shape == (16, 512, 7, 7)
    from fcnseg.hub import model_from_checkpoint

    _check_outputs(model_from_checkpoint(ckpt), layers, "fcn8s_atonce")


@pytest.mark.parametrize("name", ["fcn32s", "fcn16s"])
def test_legacy_v1_caffemodel(name, tmp_path):
    # V1 `layers` (field 2) with enum types and 4-D legacy blobs: biases 1 x 1 x 1 x N, fc6/fc7 as
    # INNER_PRODUCT matrices 1 x 1 x out x in. V1 has no Crop layer; those are left out as old nets did.
    layers = [x for x in fcn_layers(name, fc_as_inner_product=True, seed=7) if x.type not in ("Crop", "Input")]
    src = tmp_path / "v1.caffemodel"
    write_caffemodel(src, layers, legacy=True)
    _, read = read_caffemodel(src)
    types = {x.name: x.type for x in read}
    assert read[0].blobs[1].shape == (1, 1, 1, 16) and types["fc6"] == "InnerProduct"
    assert types["relu1_1"] == "ReLU" and types["loss"] == "SoftmaxWithLoss" and "Deconvolution" in types.values()
    model = load_converted(src, tmp_path)
    assert model.build_config["name"] == name
    state, names = model.state_dict(), caffe_layer_names(model)
    for layer in layers:  # every tensor, the 4-D legacy blobs and the flattened fc matrices included
        for kind, blob in zip(["weight", "bias"], layer.blobs, strict=False):
            ours = state[f"{names[layer.name]}.{kind}"]
            assert torch.equal(ours.flatten(), torch.from_numpy(blob).flatten()), layer.name
    _check_outputs(model, layers, name)


def load_converted(src, tmp_path):
    assert main(["convert", str(src), "--format", "caffe", "--out", str(tmp_path / "out.pt")]) == 0
    return load(tmp_path / "out.pt")


def _without(layers, name):
    return [x for x in layers if x.name != name]


def _replace(layers, name, **changes):
    out = []
    for x in layers:
        if x.name == name:
            x = CaffeLayer(**{**dict(name=x.name, type=x.type, blobs=x.blobs, bottoms=x.bottoms), **changes})
        out.append(x)
    return out


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda L: L + [CaffeLayer("norm1", "LRN")], "layer 'norm1' has type 'LRN', which fcnseg cannot import"),
        (
            lambda L: _replace(L, "score_pool4", blobs=[np.zeros((5, 7, 1, 1), np.float32), np.zeros(5, np.float32)]),
            r"layer 'score_pool4' \(Convolution\) weight has shape \(5, 7, 1, 1\), fcnseg expects \(5, 128, 1, 1\)",
        ),
        (
            lambda L: L + [CaffeLayer("fc8", "Convolution", [np.zeros((5, 32, 1, 1), np.float32)])],
            r"layer 'fc8' \(Convolution\) has no counterpart in fcnseg fcn16s",
        ),
        (lambda L: _without(L, "conv5_3"), "no weights for layer\\(s\\) conv5_3"),
        (lambda L: _without(L, "score_fr"), "no weighted layer 'score_fr'"),
        (
            lambda L: _replace(L, "upscore2", blobs=[np.zeros((5, 5, 4, 4), np.float32), np.zeros(5, np.float32)]),
            "layer 'upscore2' has 2 blobs; fcnseg fcn16s expects 1",
        ),
    ],
    ids=["unknown-type", "shape-mismatch", "extra-layer", "missing-layer", "no-score", "extra-blob"],
)
def test_caffe_refusals_name_the_layer(edit, message, tmp_path, capsys):
    src = tmp_path / "bad.caffemodel"
    write_caffemodel(src, edit(fcn_layers("fcn16s")))
    with pytest.raises(FcnsegError, match=message):
        caffe_to_fcnseg(read_caffemodel(src)[1], source=str(src))
    assert main(["convert", str(src), "--out", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(src) in err and not (tmp_path / "x.pt").exists()


def test_convert_refuses_a_file_that_is_not_a_caffemodel(tmp_path, capsys):
    src = tmp_path / "junk.caffemodel"
    src.write_bytes(b"\xff" * 64)
    assert main(["convert", str(src), "--out", str(tmp_path / "x.pt")]) == 2
    assert str(src) in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "missing.caffemodel"), "--out", str(tmp_path / "x.pt")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_forced_model_must_fit_the_layers(tmp_path):
    layers = fcn_layers("fcn16s")
    with pytest.raises(FcnsegError, match=r"layer 'upscore2' \(Deconvolution\) has no counterpart in fcnseg fcn32s"):
        caffe_to_fcnseg(layers, model="fcn32s")
    ckpt = caffe_to_fcnseg(layers)
    assert ckpt["model"] == "fcn16s" and ckpt["num_classes"] == 5
    assert ckpt["config"]["width"] == 0.25 and ckpt["config"]["fc_dim"] == 32
    assert get_model("fcn16s", **ckpt["config"]).alignment == "caffe"


def test_split_layers_caffe_saved_are_followed_back(tmp_path):
    # Caffe inserts Split layers where a blob feeds several layers and saves them: pool4 feeds conv5_1 and
    # scale_pool4, so the Scale layer's bottom is the split's output, not "pool4".
    layers = fcn_layers("fcn8s_atonce", seed=2)
    out = []
    for layer in layers:
        if layer.type == "Scale":
            tap = layer.bottoms[0]
            split_top = f"{tap}_{tap}_0_split_1"
            out.append(CaffeLayer(f"{tap}_{tap}_0_split", "Split", [], [tap], [f"{tap}_{tap}_0_split_0", split_top]))
            layer = CaffeLayer(layer.name, "Scale", layer.blobs, [split_top], layer.tops)
        out.append(layer)
    write_caffemodel(tmp_path / "split.caffemodel", out)
    model = load_converted(tmp_path / "split.caffemodel", tmp_path)
    assert model.build_config["name"] == "fcn8s_atonce"
    _check_outputs(model, layers, "fcn8s_atonce")


@pytest.mark.parametrize("source, forced", [("fcn8s", "fcn8s_atonce"), ("fcn8s_atonce", "fcn8s")])
def test_forcing_the_other_fcn8s_still_computes_the_file(source, forced, tmp_path):
    # The at-once factors (or their absence) are folded into the score layers: same outputs either way.
    from fcnseg.hub import model_from_checkpoint

    layers = fcn_layers(source, seed=4)
    model = model_from_checkpoint(caffe_to_fcnseg(layers, model=forced))
    assert model.build_config["name"] == forced
    _check_outputs(model, layers, source)


# ----------------------------------------------------------------------------- two heads and late fusion

TRUNK = ("data", "conv", "relu", "pool", "fc6", "fc7", "drop")


def _split(layers):
    """(trunk, head) layers of an fcn_layers() list: the VGG16 body, then the score / upsampling / loss layers."""
    trunk = [x for x in layers if x.name.startswith(TRUNK)]
    return trunk, [x for x in layers if not x.name.startswith(TRUNK)]


def _suffixed(layers, suffix, keep=()):
    return [
        CaffeLayer(x.name if x.name in keep else x.name + suffix, x.type, x.blobs, x.bottoms, x.tops)
        for x in layers
        if x.name != "data"
    ]


def siftflow_layers(sem_classes, geo_classes):
    """siftflow-fcn16s's layout: (semantic net, geometric net, the two-headed file's layers)."""
    sem, geo = fcn_layers("fcn16s", classes=sem_classes, seed=11), fcn_layers("fcn16s", classes=geo_classes, seed=12)
    trunk, sem_head = _split(sem)
    _, geo_head = _split(geo)
    return sem, geo, trunk + _suffixed(sem_head, "_sem") + _suffixed(geo_head, "_geo")


def color_hha_layers(classes):
    """nyud-fcn32s-color-hha's layout: (colour net, HHA net, the late-fusion file's layers)."""
    color, hha = fcn_layers("fcn32s", classes=classes, seed=21), fcn_layers("fcn32s", classes=classes, seed=22)
    upscore = next(x for x in color if x.name == "upscore")
    streams = [
        x
        for x in _suffixed(color, "color") + _suffixed(hha, "hha")
        if not x.name.startswith(("upscore", "score", "loss"))
    ]
    streams += [x for x in _suffixed(color, "color") + _suffixed(hha, "hha") if x.name.startswith("score_fr")]
    fused = CaffeLayer("score_fused", "Eltwise", bottoms=["score_frcolor", "score_frhha"], tops=["score_fused"],
                       coeff=[0.5, 0.5])  # fmt: skip
    return color, hha, [CaffeLayer("data", "Input"), *streams, fused, upscore, CaffeLayer("score", "Crop")]


def test_siftflow_two_headed_file_converts_to_both_heads(tmp_path):
    # siftflow-fcn16s's layout (its net.py): one VGG16 trunk, then score_fr_sem ... upscore16_sem and the same
    # layers suffixed _geo, each head with its own pool4 scores and upsamplers.
    sem, geo, layers = siftflow_layers(5, 3)
    trunk, _ = _split(sem)
    _, geo_head = _split(geo)
    write_caffemodel(tmp_path / "siftflow.caffemodel", layers)
    _, layers = read_caffemodel(tmp_path / "siftflow.caffemodel")
    names = {"semantic": list("abcde"), "geometric": ["sky", "horizontal", "vertical"]}
    ckpt = caffe_to_fcnseg(layers, classes=names["semantic"], head_classes=names)
    assert ckpt["model"] == "fcn16s_twohead" and ckpt["config"]["second_classes"] == 3
    assert ckpt["head_classes"] == names
    model = load(_save(ckpt, tmp_path / "siftflow.pt"))
    x = torch.randn(1, 3, 37, 51)
    with torch.no_grad():
        out = model(x)
        # Each head computes what the release's net computes from the shared trunk and that head's layers.
        assert_span_close(out[:, :5], reference_forward(sem, "fcn16s", x))
        assert_span_close(out[:, 5:], reference_forward(trunk + geo_head, "fcn16s", x))


def test_color_hha_file_converts_with_the_averaged_scores_folded_in(tmp_path):
    # nyud-fcn32s-color-hha's layout (its net.py): every layer of a stream suffixed "color" / "hha", the two
    # score_fr maps summed by an Eltwise with coeff 0.5, 0.5, one upscore and one crop for the sum.
    color, hha, layers = color_hha_layers(5)
    upscore = next(x for x in color if x.name == "upscore")
    write_caffemodel(tmp_path / "color-hha.caffemodel", layers)
    _, read = read_caffemodel(tmp_path / "color-hha.caffemodel")
    assert next(x for x in read if x.name == "score_fused").coeff == [0.5, 0.5]
    ckpt = caffe_to_fcnseg(read)
    assert ckpt["model"] == "fcn32s_rgb_hha"
    model = load(_save(ckpt, tmp_path / "color-hha.pt"))
    x = torch.randn(1, 6, 41, 30)
    shared = [x if x.name != "upscore" else upscore for x in hha]  # one upsampling for the sum, the colour one's
    with torch.no_grad():
        expected = 0.5 * (reference_forward(color, "fcn32s", x[:, :3]) + reference_forward(shared, "fcn32s", x[:, 3:]))
        assert_span_close(model(x), expected)
    # A weighted sum of anything but score layers is refused, naming the layer.
    odd = [*layers[:-3], CaffeLayer("score_fused", "Eltwise", bottoms=["fc7color", "fc7hha"], coeff=[2.0, 1.0]),
           *layers[-2:]]  # fmt: skip
    with pytest.raises(FcnsegError, match="Eltwise layer 'score_fused' weighs 'fc7color' by 2.0"):
        caffe_to_fcnseg(odd)


def _save(ckpt, path):
    torch.save(ckpt, path)
    return path


def _convert_cli(layers, tmp_path, capsys, *flags):
    write_caffemodel(tmp_path / "net.caffemodel", layers)
    assert main(["convert", str(tmp_path / "net.caffemodel"), "--out", str(tmp_path / "net.pt"), *flags]) == 0
    return read_checkpoint(tmp_path / "net.pt"), capsys.readouterr().err


@pytest.mark.parametrize(
    "net, classes, weights",
    [
        ("siftflow", 33, "SIFTFLOW_FCN16S_HEAVY"),
        ("colour-hha", 40, "NYUD_FCN32S_COLOR_HHA_HEAVY"),
        ("fcn8s", 21, "FCN8S_HEAVY_PASCAL"),
        ("fcn8s_atonce", 21, "FCN8S_ATONCE_PASCAL"),
    ],
)
def test_convert_records_the_input_of_the_release_the_layers_identify(net, classes, weights, tmp_path, capsys):
    from fcnseg.models.weights import FCNWeights

    entry = FCNWeights[weights].value
    layers = {
        "siftflow": lambda: siftflow_layers(classes, 3)[2],
        "colour-hha": lambda: color_hha_layers(classes)[2],
    }.get(net, lambda: fcn_layers(net, classes=classes))()
    ckpt, err = _convert_cli(layers, tmp_path, capsys)
    assert ckpt["model"] == entry.model and err == ""  # identified: nothing assumed, nothing to say
    assert ckpt["preprocessing"] == entry.preprocessing.to_dict()  # SIFT Flow's mean; NYUDv2's six channels
    assert ckpt["classes"] == list(entry.classes)
    assert ckpt["head_classes"] == {k: list(v) for k, v in (entry.head_classes or {}).items()}
    # What --weights gives by hand is what the layers gave.
    ckpt2, _ = _convert_cli(layers, tmp_path, capsys, "--weights", FCNWeights[weights].id)
    assert ckpt2["preprocessing"] == ckpt["preprocessing"] and ckpt2["classes"] == ckpt["classes"]


def test_convert_says_which_input_it_assumed_when_the_layers_do_not_tell(tmp_path, capsys):
    from fcnseg.models.weights import NYUD_CAFFE, NYUD_CAFFE_HHA

    src = tmp_path / "net.caffemodel"
    # NYUDv2's colour and HHA FCN-32s share their layers: the colour input is assumed, and said so in one line.
    ckpt, err = _convert_cli(fcn_layers("fcn32s", classes=40), tmp_path, capsys)
    assert ckpt["preprocessing"] == NYUD_CAFFE.to_dict()
    assert err == (
        f"fcnseg: note: {src}: fcn32s with 40 classes fits several published nets nyud-fcn32s-color-heavy, "
        "nyud-fcn32s-hha-heavy: assumed the input of nyud-fcn32s-color-heavy (BGR, 0-255 minus mean (116.19, 97.203, "
        "92.318)); set another with --weights NAME\n"
    )
    ckpt, err = _convert_cli(fcn_layers("fcn32s", classes=40), tmp_path, capsys, "--weights", "nyud-fcn32s-hha-heavy")
    assert ckpt["preprocessing"] == NYUD_CAFFE_HHA.to_dict() and err == ""
    # No published net at all: the VOC input, said so.
    ckpt, err = _convert_cli(fcn_layers("fcn8s", classes=5), tmp_path, capsys)
    assert ckpt["preprocessing"] == CAFFE.to_dict() and ckpt["classes"] == []
    assert err.startswith(f"fcnseg: note: {src}: fcn8s with 5 classes is no published net: assumed the PASCAL VOC")
    # A fusion net of another class count still records six channels: colour as assumed, HHA like grey.
    ckpt, err = _convert_cli(color_hha_layers(5)[2], tmp_path, capsys)
    assert ckpt["preprocessing"] == CAFFE.for_channels(6).to_dict() and len(ckpt["preprocessing"]["mean"]) == 6
    assert "assumed the PASCAL VOC input" in err
