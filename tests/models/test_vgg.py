"""Convolutionalisation: fc6/fc7/fc8 as convolutions compute exactly what the classifier computes."""

import os

import pytest
import torch
from torchvision.models import VGG16_Weights, vgg16

from fcnseg.errors import FcnsegError
from fcnseg.models import VGG16Backbone, convolutionalise_vgg16, get_model
from fcnseg.preprocessing import CAFFE, IMAGENET


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    net = vgg16(weights=None).eval()
    with torch.no_grad():  # torchvision's init gives tiny logits; larger biases make the comparison sharper
        for m in net.classifier:
            if isinstance(m, torch.nn.Linear):
                m.bias.normal_(0, 0.1)
    return net


@pytest.fixture(scope="module")
def vgg_file(classifier, tmp_path_factory):
    """The classifier's state dict on disk, written once (528 MB); tests link it where they need it."""
    path = tmp_path_factory.mktemp("vgg") / "vgg16.pth"
    torch.save(classifier.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def converted(classifier):
    sd = convolutionalise_vgg16(classifier.state_dict(), keep_fc8=True)
    backbone = VGG16Backbone(alignment="aligned").eval()
    fc8 = torch.nn.Conv2d(4096, 1000, 1)
    fc8.load_state_dict({"weight": sd.pop("fc8.weight"), "bias": sd.pop("fc8.bias")})
    backbone.load_state_dict(sd)  # strict: every backbone tensor comes from the classifier
    return backbone, fc8


def test_conversion_is_a_pure_reshape(classifier):
    sd = classifier.state_dict()
    out = convolutionalise_vgg16(sd)
    assert out["fc6.weight"].shape == (4096, 512, 7, 7)
    assert out["fc7.weight"].shape == (4096, 4096, 1, 1)
    assert "fc8.weight" not in out
    assert torch.equal(out["fc6.weight"].flatten(1), sd["classifier.0.weight"])
    assert torch.equal(out["features.28.weight"], sd["features.28.weight"])
    # Pure: the input is untouched and shares no storage with the output.
    assert out["fc6.weight"].data_ptr() != sd["classifier.0.weight"].data_ptr()
    with pytest.raises(FcnsegError, match="classifier.0.weight"):
        convolutionalise_vgg16({k: v for k, v in sd.items() if not k.startswith("classifier.0")})


def test_fully_convolutional_vgg16_gives_the_classifier_logits_at_224(classifier, converted):
    backbone, fc8 = converted
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = classifier(x)
        fc7 = backbone(x)["fc7"]  # 7 x 7 map; fc6 padded by 3 in aligned mode
        got = fc8(fc7)[:, :, 3, 3]  # the centre cell sees exactly the 7 x 7 pool5 grid
    assert fc7.shape[-2:] == (7, 7)
    assert (got - expected).abs().max().item() <= 1e-4
    assert expected.abs().max().item() > 0.1  # the comparison is not between near-zero numbers


def test_dense_map_equals_the_classifier_on_every_window(classifier, converted):
    # On a larger input every interior cell of the score map is the classifier applied to the 7 x 7 pool5
    # window around it: the network evaluates the classifier densely, sharing the convolutional work.
    # (Equality with the classifier run on a 224 x 224 crop of the *image* cannot hold exactly: inside the crop
    # conv1..conv5 see zero padding at its border where the large image has real pixels.)
    backbone, fc8 = converted
    x = torch.randn(1, 3, 320, 288)
    with torch.no_grad():
        feats = backbone.features(x)  # pool5: 10 x 9
        dense = fc8(backbone(x)["fc7"])
        for i in range(3, feats.shape[2] - 3):
            for j in range(3, feats.shape[3] - 3):
                window = feats[:, :, i - 3 : i + 4, j - 3 : j + 4].flatten(1)
                expected = classifier.classifier(window)
                assert (dense[:, :, i, j] - expected).abs().max().item() <= 1e-4, (i, j)


def test_backbone_weights_from_a_local_file(tmp_path, classifier, vgg_file):
    path = vgg_file
    model = get_model("fcn32s", backbone_weights=str(path))
    assert torch.equal(model.backbone.fc6.weight.flatten(1), classifier.classifier[0].weight)
    # The refusals use a tiny net: the net is built, at random, before its weights are looked for.
    with pytest.raises(FcnsegError, match="expected a file or one of"):
        get_model("fcn32s", width=1 / 16, backbone_weights=str(tmp_path / "missing.pth"))
    with pytest.raises(FcnsegError, match="do not fit"):
        get_model("fcn32s", width=0.5, backbone_weights=str(path))


def test_backbone_weights_file_through_fcnseg_train_reproduces_the_classifier(tmp_path, classifier, vgg_file):
    # End to end: `fcnseg train --backbone-weights FILE` builds the net from a torchvision VGG16 state dict on disk;
    # after one step at a vanishing rate the saved checkpoint's backbone, followed by the classifier's fc8 as a
    # 1 x 1 convolution, gives the classifier's logits at 224 x 224.
    from fcnseg.cli import main
    from fcnseg.hub import load

    path = vgg_file
    flags = "train --dataset synthetic --data-option size=48 --data-option num_images=2 --model fcn32s --iters 1 "
    flags += "--optimizer sgd --lr 1e-30 --momentum 0 --weight-decay 0 --batch-size 1 --val-every 1 --val-images 1 "
    flags += "--num-workers 0 --no-progress --device cpu"
    assert main([*flags.split(), "--backbone-weights", str(path), "--out", str(tmp_path / "run")]) == 0
    model = load(tmp_path / "run" / "last.pt")
    assert model.preprocessing == IMAGENET
    fc8 = torch.nn.Conv2d(4096, 1000, 1)
    sd = classifier.state_dict()
    fc8.load_state_dict({"weight": sd["classifier.6.weight"][:, :, None, None], "bias": sd["classifier.6.bias"]})
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        got = fc8(model.backbone(x)["fc7"])[:, :, 3, 3]
        expected = classifier(x)
    assert (got - expected).abs().max().item() <= 1e-4 and expected.abs().max().item() > 0.1


def test_torchvision_enum_names_load_from_the_hub_cache(hub, classifier, vgg_file):
    # The weights enum's file, placed where torchvision's downloader keeps it, is used without any download.
    os.link(vgg_file, hub / VGG16_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[1])
    for name in ("DEFAULT", VGG16_Weights.IMAGENET1K_V1):
        model = get_model("fcn8s", backbone_weights=name)
        assert torch.equal(model.backbone.fc6.weight.flatten(1), classifier.classifier[0].weight)
        assert model.preprocessing == IMAGENET  # read off the enum's transforms
    assert get_model("fcn8s", width=1 / 16, fc_dim=16).build_config["kwargs"]["backbone_weights"] is None


def test_features_only_enum_keeps_fc6_random_and_records_its_input(hub, classifier):
    # IMAGENET1K_FEATURES (the Caffe features, RGB 0-255 minus a mean) ships NaN classifier weights: fc6/fc7 are
    # not taken from it.
    sd = classifier.state_dict()
    sd = {k: (torch.full_like(v, float("nan")) if k.startswith("classifier") else v) for k, v in sd.items()}
    torch.save(sd, hub / VGG16_Weights.IMAGENET1K_FEATURES.url.rsplit("/", 1)[1])
    model = get_model("fcn32s", backbone_weights="IMAGENET1K_FEATURES")
    assert torch.equal(model.backbone.features[0].weight, sd["features.0.weight"])
    assert torch.isfinite(model.backbone.fc6.weight).all()
    p = model.preprocessing
    assert p.mean == (0.48235, 0.45882, 0.40784) and p.std == pytest.approx((1 / 255,) * 3) and p.channel_order == "RGB"


def test_caffe_vgg16_expects_the_caffe_input(hub, classifier, vgg_file, monkeypatch):
    # torchfcn's vgg16_from_caffe.pth (md5-checked) in the cache: the backbone records BGR / 0-255 / mean input.
    import dataclasses
    import hashlib

    from fcnseg.models import weights

    path = hub / "vgg16_from_caffe.pth"
    os.link(vgg_file, path)
    with pytest.raises(FcnsegError, match="vgg16_from_caffe.pth: md5 is .* expected aa75b158"):
        get_model("fcn32s", width=1 / 16, backbone_weights="CAFFE")  # refused by its md5, before the fit
    md5 = hashlib.md5(path.read_bytes()).hexdigest()
    monkeypatch.setattr(weights, "VGG16_CAFFE", dataclasses.replace(weights.VGG16_CAFFE, md5=md5))
    model = get_model("fcn32s", backbone_weights="CAFFE")
    assert model.preprocessing == CAFFE
    assert torch.equal(model.backbone.fc7.weight.flatten(1), classifier.classifier[3].weight)
    # A local copy anywhere: "caffe:FILE" (md5-checked, Caffe input); a plain FILE would mean ImageNet input.
    model = get_model("fcn32s", backbone_weights=f"caffe:{vgg_file}")
    assert model.preprocessing == CAFFE
    with pytest.raises(FcnsegError, match="no such file"):
        get_model("fcn32s", width=1 / 16, backbone_weights="caffe:/nowhere/vgg.pth")


def test_damaged_enum_file_in_the_cache_is_one_line(hub):
    (hub / VGG16_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[1]).write_bytes(b"not a zip")
    with pytest.raises(FcnsegError, match=r"cannot read .*vgg16-397923af.pth .*delete it to download again"):
        get_model("fcn32s", width=1 / 16, backbone_weights="IMAGENET1K_V1")


def test_enum_download_failure_is_one_line(hub, monkeypatch):
    import urllib.error

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(
        FcnsegError, match="cannot download https://download.pytorch.org/.*vgg16.*--backbone-weights FILE"
    ):
        get_model("fcn32s", width=1 / 16, backbone_weights="IMAGENET1K_V1")


@pytest.mark.parametrize("batch_norm", [False, True])
def test_vgg16_body_is_torchvisions_layer_for_layer(batch_norm):
    # fcnseg lays out VGG16's body itself (torchvision is imported where weights are read): torchvision's own
    # make_layers is the oracle for the configuration, the module order, the shapes and the weights one seed draws.
    from torchvision.models import vgg as tv_vgg

    from fcnseg.models.backbones import VGG16_LAYERS, vgg_features

    assert list(VGG16_LAYERS) == tv_vgg.cfgs["D"]
    narrow = [v if v == "M" else v // 16 for v in tv_vgg.cfgs["D"]]
    torch.manual_seed(0)
    ours = vgg_features(narrow, batch_norm=batch_norm)
    torch.manual_seed(0)
    theirs = tv_vgg.make_layers(narrow, batch_norm=batch_norm)
    assert repr(ours) == repr(theirs)
    expected = theirs.state_dict()
    assert list(ours.state_dict()) == list(expected)
    for key, value in ours.state_dict().items():
        assert torch.equal(value, expected[key]), key
