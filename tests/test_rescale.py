"""int8's channel rescaling (fcnseg/runtime/rescale.py): the factors, the activation ranges they come from, the
rescaled ONNX file, and the pairs every registered model declares."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fcnseg.models import get_model, list_models
from fcnseg.runtime.engines import calibration_tag
from fcnseg.runtime.openvino import openvino_available
from fcnseg.runtime.rescale import MAX_GAIN, channel_maxima, rescale_factors, rescaled_onnx
from tests.helpers import TINY, randomise, tiny_options


def test_factors_give_every_channel_the_largest_range_and_amplify_at_most_max_gain():
    # Ranges after the ReLU: 4, 2, 0 (never positive), 0.1 and 0. The largest keeps 1; 2 gets 1/2; the rest would
    # need 40x or more, so they get 1/MAX_GAIN (16x).
    got = rescale_factors(torch.tensor([4.0, 2.0, -1.0, 0.1, 0.0]))
    floor = 1 / MAX_GAIN
    assert torch.allclose(got, torch.tensor([1.0, 0.5, floor, floor, floor]))
    assert torch.equal(rescale_factors(torch.tensor([-1.0, 0.0])), torch.ones(2))  # a layer never positive


def _first_conv_by_hand(model, x):
    """conv1_1's output written out with F.conv2d on the input the model pads itself (aligned mode)."""
    conv = model.backbone.features[0]
    return F.conv2d(model.pad(x), conv.weight, conv.bias, padding=conv.padding)


def test_channel_maxima_are_the_first_layers_outputs_and_stop_the_forward_there():
    model = randomise(get_model("fcn8s", num_classes=3, **TINY), seed=0).eval()
    g = torch.Generator().manual_seed(1)
    calibration = [torch.randn(1, 3, 37, 53, generator=g), 2 * torch.randn(1, 3, 64, 41, generator=g)]
    later = []
    model.score_heads.out.score_fr.register_forward_hook(lambda *_: later.append(1))
    got = channel_maxima(model, calibration, ["backbone.features.0."])
    with torch.no_grad():
        expected = torch.stack([_first_conv_by_hand(model, x).amax(dim=(0, 2, 3)) for x in calibration]).amax(0)
    assert torch.allclose(got["backbone.features.0."], expected, atol=1e-6)
    assert later == []  # the forward pass stopped after the first layer


def test_channel_maxima_of_two_streams_come_from_one_pass_each():
    model = randomise(get_model("fcn32s_rgb_hha", num_classes=3, **TINY), seed=0).eval()
    x = torch.randn(1, 6, 40, 40, generator=torch.Generator().manual_seed(2))
    firsts = [a for a, _ in model.rescaled_pairs()]
    got = channel_maxima(model, [x], firsts)
    with torch.no_grad():
        for (name, stream), part in zip(model.streams.items(), (x[:, :3], x[:, 3:]), strict=True):
            expected = _first_conv_by_hand(stream, part).amax(dim=(0, 2, 3))
            assert torch.allclose(got[f"streams.{name}.backbone.features.0."], expected, atol=1e-6), name


@pytest.mark.parametrize("name", list_models())
def test_each_models_rescaled_pairs_leave_its_function_unchanged(name):
    # Dividing the first layer's output channels by s and multiplying the second's inputs by s changes nothing
    # only if what lies between commutes with the scale (ReLU, max pooling; not a batch norm). The first layer is
    # one int8 keeps in float and the second one it quantises.
    model = randomise(get_model(name, **tiny_options(name)), seed=0).eval()
    x = torch.randn(1, model.in_channels, 45, 61, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(x)
        for a, b in model.rescaled_pairs():
            first, second = model.get_submodule(a.rstrip(".")), model.get_submodule(b.rstrip("."))
            s = torch.rand(first.out_channels, generator=torch.Generator().manual_seed(4)) + 0.05
            first.weight /= s[:, None, None, None]
            first.bias /= s
            second.weight *= s[None, :, None, None]
            assert a in model.float_layers() and not b.startswith(tuple(model.float_layers()))
        after = model(x)
    span = float(before.max() - before.min())
    assert float((after - before).abs().max()) <= 1e-5 * span


def test_vgg16_and_alexnet_rescale_their_first_two_convolutions_and_a_batch_norm_stops_it():
    assert get_model("fcn8s", **TINY).rescaled_pairs() == [("backbone.features.0.", "backbone.features.2.")]
    assert get_model("fcn32s_alexnet", **TINY).rescaled_pairs() == [("backbone.features.0.", "backbone.features.3.")]
    assert get_model("fcn8s", batch_norm=True, **TINY).rescaled_pairs() == []
    assert get_model("fcn8s_resnet50", **tiny_options("fcn8s_resnet50")).rescaled_pairs() == []


@pytest.mark.parametrize("bias", [True, False])
def test_rescaled_onnx_scales_exactly_the_pairs_tensors_and_computes_the_same(tmp_path, bias):
    # With zero biases the exporter leaves them out of the file: the pair is rescaled without one.
    import onnx
    from onnx import numpy_helper

    from fcnseg.runtime.onnx import exported_fp32, ort_session

    model = randomise(get_model("fcn8s", num_classes=3, **TINY), seed=0, bias_std=0.1 if bias else None).eval()
    fp32 = exported_fp32(model, tmp_path)
    s = np.linspace(1 / MAX_GAIN, 1, model.backbone.features[0].out_channels)
    out = rescaled_onnx(fp32, tmp_path / "rescaled.onnx", {("backbone.features.0.", "backbone.features.2."): s})

    def tensors(path):
        return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}

    old, new = tensors(fp32), tensors(out)
    assert ("backbone.features.0.bias" in old) == bias
    expected = dict(old)
    expected["backbone.features.0.weight"] = old["backbone.features.0.weight"] / s[:, None, None, None]
    expected["backbone.features.2.weight"] = old["backbone.features.2.weight"] * s[None, :, None, None]
    if bias:
        expected["backbone.features.0.bias"] = old["backbone.features.0.bias"] / s
    assert new.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_allclose(new[name], value, rtol=1e-6, err_msg=name)
    x = torch.randn(1, 3, 45, 61, generator=torch.Generator().manual_seed(5))
    a, b = ort_session(fp32)(x), ort_session(out)(x)
    assert float((a - b).abs().max()) <= 1e-5 * float(a.max() - a.min())


def test_int8_quantises_the_rescaled_graph_where_the_weights_have_7_bits_and_the_model_a_pair(monkeypatch, tmp_path):
    from fcnseg.runtime.onnx import int8_source

    calibration = [torch.randn(1, 3, 32, 48, generator=torch.Generator().manual_seed(6))]
    vgg = randomise(get_model("fcn32s", num_classes=3, **TINY), seed=0).eval()
    plain = randomise(get_model("fcn32s", num_classes=3, batch_norm=True, **TINY), seed=0).eval()
    monkeypatch.setenv("FCNSEG_CPU_FEATURES", "avx2,fma,avx512_vnni")
    assert int8_source(vgg, tmp_path / "vnni", calibration).name == "model.onnx"
    monkeypatch.setenv("FCNSEG_CPU_FEATURES", "avx2,fma")
    # named by the calibration images it was ranged on
    assert int8_source(vgg, tmp_path / "vgg", calibration).name == f"model.rescaled.{calibration_tag(calibration)}.onnx"
    assert int8_source(vgg, tmp_path / "vgg", []).name == "model.onnx"  # no images, no ranges
    assert int8_source(plain, tmp_path / "bn", calibration).name == "model.onnx"


@pytest.mark.skipif(not openvino_available(), reason="needs OpenVINO")
@pytest.mark.parametrize("features, fix", [("avx2,fma,avx512_vnni", "disable"), ("avx2,fma", "first_layer_only")])
def test_nncf_overflow_fix_only_without_vnni(monkeypatch, features, fix):
    from fcnseg.runtime.openvino import nncf_parameters

    monkeypatch.setenv("FCNSEG_CPU_FEATURES", features)
    assert nncf_parameters().overflow_fix.value == fix
