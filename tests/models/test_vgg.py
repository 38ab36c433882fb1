"""Convolutionalisation: fc6/fc7/fc8 as convolutions compute exactly what the classifier computes."""

import pytest
import torch
from torchvision.models import vgg16

from fcnseg.errors import FcnsegError
from fcnseg.models import VGG16Backbone, convolutionalise_vgg16, get_model


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


def test_backbone_weights_from_a_local_file(tmp_path, classifier):
    path = tmp_path / "vgg16.pth"
    torch.save(classifier.state_dict(), path)
    model = get_model("fcn32s", backbone_weights=str(path))
    assert torch.equal(model.backbone.fc6.weight.flatten(1), classifier.classifier[0].weight)
    with pytest.raises(FcnsegError, match="expected a file or one of"):
        get_model("fcn32s", backbone_weights=str(tmp_path / "missing.pth"))
    with pytest.raises(FcnsegError, match="do not fit"):
        get_model("fcn32s", width=0.5, backbone_weights=str(path))
