"""AlexNet, GoogLeNet, ResNet-50/101 and MobileNetV3-Large backbones: geometry, convolutionalisation, weights."""

import os
from fractions import Fraction

import pytest
import torch
from torch import nn
from torchvision import models as tvm
from torchvision.models import AlexNet_Weights, GoogLeNet_Weights
from torchvision.ops.misc import SqueezeExcitation

import fcnseg
from fcnseg.cli import main
from fcnseg.errors import FcnsegError
from fcnseg.models import (
    AlexNetBackbone,
    GoogLeNetBackbone,
    MobileNetV3LargeBackbone,
    ResNetBackbone,
    VGG16Backbone,
    convolutionalise_alexnet,
    get_model,
    list_models,
)
from fcnseg.models.backbones import Backbone
from fcnseg.models.geometry import CoordMap, compose, crop_offset, layer_map
from fcnseg.preprocessing import IMAGENET, Preprocessing
from tests.helpers import TINY, tiny_options

MODES = ["caffe", "aligned"]
NEW_MODELS = [
    "fcn32s_alexnet",
    "fcn32s_googlenet",
    "fcn8s_googlenet",
    "fcn8s_resnet50",
    "fcn8s_resnet101",
    "fcn8s_mobilenet_v3_large",
]
BACKBONES = {
    "alexnet": lambda mode: AlexNetBackbone(alignment=mode, width=1 / 16, fc_dim=16),
    "googlenet": lambda mode: GoogLeNetBackbone(alignment=mode, width=1 / 16),
    "resnet50": lambda mode: ResNetBackbone(50, alignment=mode, width=1 / 16),
    "resnet101": lambda mode: ResNetBackbone(101, alignment=mode, width=1 / 16),
    "mobilenet_v3_large": lambda mode: MobileNetV3LargeBackbone(alignment=mode, width=1 / 16),
}


def _meta(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):  # shapes only: no memory, no initialisation time
        return get_model(name, **kwargs)


def test_new_models_are_registered():
    assert set(NEW_MODELS) <= set(list_models())


# ------------------------------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_taps_have_strides_8_16_32(backbone, mode):
    net = BACKBONES[backbone](mode).eval()
    maps = net.coord_maps()
    assert [maps[t].stride for t in net.taps] == [8, 16, 32]
    with torch.no_grad():
        feats = net(torch.randn(1, 3, 64, 96))
    assert list(feats) == list(net.taps)
    for tap, f in feats.items():
        assert f.shape[1] == net.channels[tap]
        if mode == "aligned":  # one cell per s x s block: every cell is kept
            s = maps[tap].stride
            assert f.shape[-2:] == (64 // s, 96 // s), tap


def _linearised(name: str, mode: str) -> nn.Module:
    """The model with every convolution a positive box filter, max pooling as average pooling and the (global)
    squeeze-excitation gates removed: on a constant input it is linear, and the input gradient of one output pixel
    is symmetric about the input pixel its receptive field is centred on."""
    model = get_model(name, num_classes=2, alignment=mode, **tiny_options(name)).double().eval()
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.MaxPool2d):
                pool = nn.AvgPool2d(child.kernel_size, child.stride, child.padding, child.ceil_mode)
                setattr(parent, child_name, pool)
            elif isinstance(child, SqueezeExcitation):
                setattr(parent, child_name, nn.Identity())
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.fill_(1.0 / m.weight[0].numel())
                if m.bias is not None:
                    m.bias.zero_()
    return model


def _is_vgg16(name: str) -> bool:
    # Late fusion has a VGG16 per stream (each an fcn32s / fcn16s, whose geometry test_fcn.py checks).
    backbones = [m for m in _meta(name, **tiny_options(name)).modules() if isinstance(m, Backbone)]
    return all(isinstance(b, VGG16Backbone) for b in backbones)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", [m for m in list_models() if not _is_vgg16(m)])
def test_output_pixels_sit_on_their_input_pixels(name, mode):
    # Every model but the VGG16 ones (whose cells test_fcn.py's impulse test counts by hand): the centroid of an
    # output pixel's input gradient (the centre of its receptive field, since every layer is made symmetric, see
    # _linearised) is that very pixel, for rows of different phases modulo 32. A crop or a padding off by one pixel
    # anywhere (a skip's, the last one) moves it (by 1 or 2). The input is taller than any receptive field
    # (ResNet-101's ~1000 pixels) and narrow: the rows' centroid does not depend on the columns.
    h, w = 1100, 24
    model = _linearised(name, mode)
    x = torch.ones(1, 3, h, w, dtype=torch.float64, requires_grad=True)
    out = model(x)[0, 0]
    assert out.shape == (h, w)
    rows = torch.arange(h, dtype=torch.float64)
    for r in (h // 2, h // 2 + 5, h // 2 + 19):
        (grad,) = torch.autograd.grad(out[r].sum(), x, retain_graph=True)
        g = grad.sum(dim=(0, 1, 3))
        assert g[0] == 0 and g[-1] == 0, "the receptive field must fit in the input"
        centroid = (g * rows).sum() / g.sum()
        assert abs(centroid.item() - r) < 1e-6, (name, mode, r, centroid.item())


def test_fcn_alexnet_final_crop_is_18_from_the_geometry():
    # The release's FCN-AlexNet: conv1 padded by 100, ceil pooling, fc6 a 6 x 6 convolution, 63/32 upsampling and
    # a final crop of 18 (Caffe's crop layer derives it; so does the FCN, from the coordinate maps).
    model = _meta("fcn32s_alexnet", alignment="caffe")
    assert model.head.crop_offsets == {"out": 18}
    assert model.head.upsample_kernels == {"out": 63} and model.head.upsample_out.stride == (32, 32)
    backbone = model.backbone
    assert backbone.features[0].padding == (100, 100) and backbone.features[2].ceil_mode
    fc7 = compose([*backbone.features, backbone.fc6, backbone.fc7])
    assert fc7 == CoordMap(Fraction(32), Fraction(13)) == backbone.coord_maps()["fc7"]
    assert crop_offset(fc7.then(layer_map(model.head.upsample_out)), CoordMap()) == 18
    # Aligned mode: no crop, same 63/32 kernel.
    aligned = _meta("fcn32s_alexnet", alignment="aligned")
    assert aligned.head.crop_offsets == {"out": 0} and aligned.head.upsample_kernels == {"out": 63}


def test_upsampling_kernels_follow_the_geometry():
    # VGG16's cells sit at block centres: even kernels as released. Where cells sit on whole pixels, odd ones.
    assert _meta("fcn8s", alignment="caffe").head.upsample_kernels == {"pool4": 4, "pool3": 4, "out": 16}
    assert _meta("fcn32s", alignment="aligned").head.upsample_kernels == {"out": 64}
    assert _meta("fcn8s_resnet50").head.upsample_kernels == {"layer3": 3, "layer2": 3, "out": 15}
    # GoogLeNet's unpadded poolings put stride-32 cells at 32y + 22, stride-16 ones at 16y + 14: a mix.
    assert _meta("fcn8s_googlenet").head.upsample_kernels == {"inception4e": 4, "inception3b": 3, "out": 15}
    from fcnseg.models import FCN

    with torch.device("meta"):
        backbone = AlexNetBackbone(alignment="caffe")
        with pytest.raises(FcnsegError, match="cannot land on whole pixels"):
            FCN(backbone, 21, upsample_kernels={"out": 64})
        with pytest.raises(FcnsegError, match="upsample_kernels names"):
            FCN(backbone, 21, upsample_kernels={"pool4": 4})
        # AlexNet has stride-8/16 taps too: an FCN-8s on it builds, its kernels and crops derived.
        fcn8s_alexnet = FCN(AlexNetBackbone(alignment="caffe"), 21, skips=("pool2", "pool1"))
    assert fcn8s_alexnet.head.upsample_kernels == {"pool2": 3, "pool1": 3, "out": 15}
    assert all(v >= 0 for v in fcn8s_alexnet.head.crop_offsets.values())


# ------------------------------------------------------------------------------------------ AlexNet fc -> conv


@pytest.fixture(scope="module")
def alexnet_classifier():
    torch.manual_seed(0)
    net = tvm.alexnet(weights=None).eval()
    with torch.no_grad():  # larger biases than the default init make the logit comparison sharper
        for m in net.classifier:
            if isinstance(m, nn.Linear):
                m.bias.normal_(0, 0.1)
    return net


def test_alexnet_conversion_is_a_pure_reshape(alexnet_classifier):
    sd = alexnet_classifier.state_dict()
    out = convolutionalise_alexnet(sd)
    assert out["fc6.weight"].shape == (4096, 256, 6, 6) and out["fc7.weight"].shape == (4096, 4096, 1, 1)
    assert "fc8.weight" not in out
    assert torch.equal(out["fc6.weight"].flatten(1), sd["classifier.1.weight"])
    assert out["fc6.weight"].data_ptr() != sd["classifier.1.weight"].data_ptr()
    with pytest.raises(FcnsegError, match="classifier.4.weight"):
        convolutionalise_alexnet({k: v for k, v in sd.items() if not k.startswith("classifier.4")})


def test_fully_convolutional_alexnet_gives_the_classifier_logits_at_224(alexnet_classifier):
    # At 224 x 224 torchvision's pool5 is 6 x 6 (its adaptive pooling does nothing) and fc6 as an unpadded 6 x 6
    # convolution sees exactly it. The caffe-mode backbone has the release's conv1 padding of 100; with
    # torchvision's own padding of 2 it is torchvision's AlexNet (ceil pooling changes nothing at 224).
    sd = convolutionalise_alexnet(alexnet_classifier.state_dict(), keep_fc8=True)
    fc8 = nn.Conv2d(4096, 1000, 1)
    fc8.load_state_dict({"weight": sd.pop("fc8.weight"), "bias": sd.pop("fc8.bias")})
    backbone = AlexNetBackbone(alignment="caffe").eval()
    backbone.load_state_dict(sd)  # strict: every backbone tensor comes from the classifier
    backbone.features[0].padding = (2, 2)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = alexnet_classifier(x)
        fc7 = backbone(x)["fc7"]
        got = fc8(fc7)[:, :, 0, 0]
    assert fc7.shape[-2:] == (1, 1)
    assert (got - expected).abs().max().item() <= 1e-4
    assert expected.abs().max().item() > 0.1


# ---------------------------------------------------------------------------------------- parameter counts


def _trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_parameter_counts_match_table_1():
    # Table 1 of the paper: FCN-AlexNet 57M, FCN-VGG16 134M (21 classes; frozen upsamplers not counted).
    alexnet = _trainable(_meta("fcn32s_alexnet"))
    vgg16 = _trainable(_meta("fcn32s"))
    assert alexnet == pytest.approx(57e6, rel=0.02)
    assert vgg16 == pytest.approx(134e6, rel=0.02)
    # Exactly torchvision's AlexNet without fc8 (4096 x 1000 + 1000), plus score_fr (4096 x 21 + 21).
    assert alexnet == 61_100_840 - 4_097_000 + 4096 * 21 + 21 == 57_089_877
    # FCN-GoogLeNet: 5.62M here against the paper's 6M. torchvision's GoogLeNet (ported from TensorFlow) has a
    # 3 x 3 convolution where the paper's inception modules have a 5 x 5 one, 16 weights fewer per pair of channels
    # in that branch; with the 5 x 5 kernels the count is the paper's.
    googlenet = _meta("fcn32s_googlenet")
    count = _trainable(googlenet)
    assert count == 6_624_904 - 1_025_000 + 1024 * 21 + 21 == 5_621_429  # torchvision's without fc, plus score_fr
    five_by_five = sum(
        (25 - 9) * m.branch3[1].conv.in_channels * m.branch3[1].conv.out_channels
        for m in googlenet.backbone.modules()
        if type(m).__name__ == "Inception"
    )
    assert count + five_by_five == pytest.approx(6e6, rel=0.02)
    # No table for these: torchvision's body without its classifier, plus score layers on the three taps.
    assert _trainable(_meta("fcn8s_resnet50")) == 25_557_032 - 2_049_000 + (2048 + 1024 + 512 + 3) * 21
    assert _trainable(_meta("fcn8s_resnet101")) == 44_549_160 - 2_049_000 + (2048 + 1024 + 512 + 3) * 21
    mobilenet_classifier = 960 * 1280 + 1280 + 1280 * 1000 + 1000
    assert _trainable(_meta("fcn8s_mobilenet_v3_large")) == 5_483_032 - mobilenet_classifier + (960 + 112 + 40 + 3) * 21


def test_options_a_network_has_no_use_for_are_refused_by_name():
    # fc6/fc7's fc_dim and dropout belong to VGG16 and AlexNet, batch_norm to VGG16: the other builders do not take
    # them, so a configuration that sets one is refused rather than silently trained without it.
    for name, option in [("fcn8s_resnet50", "fc_dim"), ("fcn8s_mobilenet_v3_large", "dropout"),
                         ("fcn32s_googlenet", "batch_norm"), ("fcn32s_alexnet", "batch_norm")]:  # fmt: skip
        with pytest.raises(FcnsegError, match=rf"model '{name}' takes no option\(s\) {option};"):
            _meta(name, **{option: 16 if option == "fc_dim" else 0.1 if option == "dropout" else True})
    assert _trainable(_meta("fcn32s_alexnet", **TINY)) < 60_000  # width and fc_dim both apply to AlexNet
    with pytest.raises(FcnsegError, match="dropout must be in"):
        _meta("fcn32s_alexnet", dropout=1.0)
    with pytest.raises(FcnsegError, match="width must be > 0"):
        _meta("fcn8s_mobilenet_v3_large", width=0)
    with pytest.raises(FcnsegError, match="alignment must be one of"):
        _meta("fcn8s_googlenet", alignment="tight")


def test_a_checkpoint_that_recorded_the_once_ignored_options_still_loads(tmp_path):
    # Checkpoints saved while every builder took fc_dim / batch_norm / dropout record them for ResNet too (the
    # builder's defaults, filled in); they had no effect then and are dropped on reading.
    model = get_model("fcn8s_resnet50", num_classes=3, **tiny_options("fcn8s_resnet50")).eval()
    path = fcnseg.save_checkpoint(model, tmp_path / "new.pt")
    ckpt = torch.load(path, weights_only=True)
    assert "fc_dim" not in ckpt["config"]
    ckpt["config"].update(fc_dim=4096, batch_norm=False, dropout=0.5)
    torch.save(ckpt, tmp_path / "old.pt")
    x = torch.randn(1, 3, 45, 61)
    with torch.no_grad():
        torch.testing.assert_close(fcnseg.load(tmp_path / "old.pt")(x), model(x), rtol=0, atol=0)


# ------------------------------------------------------------------------------------ torchvision weights


def _randomise_batch_norm(net: nn.Module) -> nn.Module:
    # Default running statistics (0 / 1) would hide a mix-up of batch-norm buffers.
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return net


# model -> (torchvision classifier, its module whose output is the model's coarsest tap, or None)
CLASSIFIERS = {
    "fcn32s_alexnet": (lambda: tvm.alexnet(weights=None), None),
    "fcn32s_googlenet": (
        lambda: tvm.googlenet(weights=None, aux_logits=True, transform_input=True, init_weights=True),
        "inception5b",
    ),
    "fcn8s_resnet50": (lambda: tvm.resnet50(weights=None), "layer4"),
    "fcn8s_resnet101": (lambda: tvm.resnet101(weights=None), "layer4"),
    "fcn8s_mobilenet_v3_large": (lambda: tvm.mobilenet_v3_large(weights=None), "features"),
}


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_torchvision_weights_from_a_state_dict_file(name, tmp_path):
    # No network: the torchvision classifier's (random) state dict on disk, as --backbone-weights FILE. The
    # backbone then computes the classifier's own features (aligned mode keeps torchvision's padding), from the
    # input that the recorded preprocessing produces.
    torch.manual_seed(0)
    make, top = CLASSIFIERS[name]
    classifier = _randomise_batch_norm(make()).eval()
    path = tmp_path / "classifier.pth"
    torch.save(classifier.state_dict(), path)
    model = get_model(name, backbone_weights=str(path)).eval()
    own, theirs = model.backbone.state_dict(), classifier.state_dict()
    shared = [k for k in own if k in theirs]
    assert len(shared) >= len(own) - 4  # all but AlexNet's fc6 / fc7, which are renamed and reshaped
    assert all(torch.equal(own[k], theirs[k]) for k in shared)
    if name == "fcn32s_googlenet":
        # torchvision's transform_input maps ImageNet-normalised input to [-1, 1]: folded into the preprocessing.
        assert model.preprocessing == Preprocessing(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    else:
        assert model.preprocessing == IMAGENET
    if top is None:
        return
    pixels = torch.randint(0, 256, (1, 3, 96, 64), dtype=torch.uint8)
    feats = {}
    getattr(classifier, top).register_forward_hook(lambda m, i, o: feats.setdefault("top", o))
    with torch.no_grad():
        classifier(IMAGENET(pixels))  # torchvision's input: ImageNet mean/std
        got = model.backbone(model.preprocessing(pixels))[model.head.top]
    assert got.shape == feats["top"].shape
    assert (got - feats["top"]).abs().max().item() <= 1e-4 * feats["top"].abs().max().item()


def test_state_dict_file_of_another_network_is_refused(tmp_path):
    path = tmp_path / "alexnet.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 11, 11)}, path)
    with pytest.raises(FcnsegError, match="not a torchvision ResNet-50 state dict"):
        get_model("fcn8s_resnet50", **tiny_options("fcn8s_resnet50"), backbone_weights=str(path))
    with pytest.raises(FcnsegError, match="expected a file or one of IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT"):
        get_model(
            "fcn8s_mobilenet_v3_large",
            **tiny_options("fcn8s_mobilenet_v3_large"),
            backbone_weights=str(tmp_path / "missing.pth"),
        )
    with pytest.raises(FcnsegError, match="not GoogLeNet weights"):
        get_model(
            "fcn32s_googlenet", **tiny_options("fcn32s_googlenet"), backbone_weights=AlexNet_Weights.IMAGENET1K_V1
        )


def test_enum_names_load_from_the_hub_cache_and_record_the_input(hub):
    # The weights enum's file, placed where torchvision's downloader keeps it, is used without any download; the
    # input is read off the entry's transforms (ImageNet mean/std), with GoogLeNet's transform_input folded in.
    torch.manual_seed(0)
    classifier = tvm.googlenet(weights=None, aux_logits=True, init_weights=True)
    torch.save(classifier.state_dict(), hub / os.path.basename(GoogLeNet_Weights.IMAGENET1K_V1.url))
    for weights in ("DEFAULT", "IMAGENET1K_V1", GoogLeNet_Weights.IMAGENET1K_V1):
        model = get_model("fcn8s_googlenet", backbone_weights=weights)
        assert torch.equal(model.backbone.inception5b.branch1.conv.weight, classifier.inception5b.branch1.conv.weight)
        assert model.preprocessing == Preprocessing(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
        assert model.build_config["kwargs"]["backbone_weights"] == weights


def test_fcnseg_models_lists_every_model_with_parameters_and_gflop(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
    assert set(rows) == set(list_models())
    # name, skips, parameters, GFLOP caffe, GFLOP aligned, crops...
    alexnet = rows["fcn32s_alexnet"]
    assert alexnet[2] == "57,089,877" and alexnet[-2:] == ["out", "18"]
    for name in NEW_MODELS:
        caffe, aligned = float(rows[name][3]), float(rows[name][4])
        assert 0 < aligned < caffe  # pad 100 costs compute


@pytest.mark.parametrize("name", NEW_MODELS)
def test_checkpoint_round_trip(name, tmp_path):
    # Rebuilt from the checkpoint's build config (on the meta device), batch-norm statistics included.
    import fcnseg
    from fcnseg.hub import load

    torch.manual_seed(0)
    model = _randomise_batch_norm(get_model(name, num_classes=3, alignment="caffe", **tiny_options(name))).eval()
    with torch.no_grad():
        for score in [model.head.score_fr, *model.head.score_skip.values()]:
            score.weight.normal_(0, 0.1)
    loaded = load(fcnseg.save_checkpoint(model, tmp_path / "m.pt"))
    x = torch.randn(1, 3, 45, 38)
    with torch.no_grad():
        expected = model(x)
        assert expected.abs().max() > 0
        assert torch.equal(loaded(x), expected)
    assert loaded.head.crop_offsets == model.head.crop_offsets and loaded.preprocessing == model.preprocessing
