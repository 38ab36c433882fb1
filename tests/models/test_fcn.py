"""Registry-wide model tests: every registered model, both alignment modes."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fcnseg
from fcnseg.errors import FcnsegError
from fcnseg.models import FCN, VGG16Backbone, get_model, list_models, register_model
from tests.helpers import TINY, tiny_options

MODES = ["caffe", "aligned"]
MODELS = list_models()


def _is_vgg16(name: str) -> bool:
    with torch.device("meta"):  # shapes only: instant
        return isinstance(getattr(get_model(name, **tiny_options(name)), "backbone", None), VGG16Backbone)


def _out_channels(model: torch.nn.Module) -> int:
    return sum(model.heads.values())  # every head's scores, concatenated (two-headed models)


# The impulse test counts cells in VGG16's grid by hand; test_backbones_tv.py checks every model's output
# geometry (test_output_pixels_sit_on_their_input_pixels). Late fusion (two VGG16 streams) is left to both through
# its streams, which are fcn32s / fcn16s; test_multi.py checks that it sums them.
VGG16_MODELS = [m for m in MODELS if _is_vgg16(m)]


def test_registry_lists_the_paper_variants():
    assert {"fcn32s", "fcn16s", "fcn8s", "fcn8s_atonce"} <= set(MODELS)
    assert fcnseg.list_models() == MODELS


def test_registry_refuses_duplicates_and_positional_builders():
    with pytest.raises(ValueError, match="already registered"):
        register_model("fcn8s")(lambda *, num_classes=1: None)
    with pytest.raises(TypeError, match="keyword-only"):
        register_model("positional_builder")(lambda num_classes: None)
    with pytest.raises(TypeError):
        fcnseg.models.fcn8s(21)  # builders are keyword-only


def test_get_model_errors_name_the_problem():
    with pytest.raises(FcnsegError, match="unknown model 'fcn4s'"):
        get_model("fcn4s")
    with pytest.raises(FcnsegError, match="no option.*depth"):
        get_model("fcn8s", depth=3)
    with pytest.raises(FcnsegError, match="alignment must be one of"):
        get_model("fcn8s", alignment="tight", **TINY)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", MODELS)
@settings(max_examples=12, deadline=None)
@given(h=st.integers(1, 300), w=st.integers(1, 300))
def test_output_size_equals_input_size(name, mode, h, w):
    model = _tiny(name, mode)
    with torch.no_grad():
        y = model(torch.randn(1, model.in_channels, h, w))
    assert y.shape == (1, _out_channels(model), h, w)


_CACHE: dict = {}


def _tiny(name: str, mode: str) -> FCN:
    if (name, mode) not in _CACHE:
        torch.manual_seed(0)
        _CACHE[name, mode] = get_model(name, num_classes=5, alignment=mode, **tiny_options(name)).eval()
    return _CACHE[name, mode]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", MODELS)
def test_backward_reaches_every_trainable_layer(name, mode):
    torch.manual_seed(0)
    model = get_model(name, num_classes=4, alignment=mode, **tiny_options(name))
    with torch.no_grad():  # zero score layers block the gradient to the backbone; open them for the test
        for p in model.parameters():
            if p.requires_grad and p.abs().sum() == 0 and p.dim() == 4:
                p.normal_(0, 0.1)
    x = torch.randn(2, model.in_channels, 37, 29)
    target = torch.randint(0, 4, (2, 37, 29))
    target[0, :5] = 255
    # Over every head's channels at once: the softmax couples them, so each head's layers get a gradient.
    loss = torch.nn.functional.cross_entropy(model(x), target, ignore_index=255)
    loss.backward()
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        else:
            assert p.grad is None, pname
    scores = [p for n, p in model.named_parameters() if n.endswith("score_fr.weight")]
    assert scores and all(p.grad.abs().sum() > 0 for p in scores)


def _impulse_model(name: str, mode: str) -> FCN:
    """Every layer passes channel 0 straight through (centre tap 1), so the stride-s cell that holds a bright
    pixel lights up in every tap; the score layers copy it into class 1."""
    model = get_model(name, num_classes=2, alignment=mode, **tiny_options(name)).eval()
    with torch.no_grad():
        convs = [m for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d)]
        for conv in convs:
            conv.weight.zero_()
            conv.bias.zero_()
            kh, kw = conv.kernel_size
            conv.weight[0, 0, kh // 2, kw // 2] = 1.0
        for score in [model.head.score_fr, *model.head.score_skip.values()]:
            score.weight.zero_()
            score.weight[1, 0] = 1.0 / (model.head.skip_scales.get(_tap_of(model, score), 1.0))
    return model


def _tap_of(model: FCN, score: torch.nn.Module) -> str:
    for name, s in model.head.score_skip.items():
        if s is score:
            return name
    return model.head.top


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", VGG16_MODELS)
def test_impulse_lands_where_it_was(name, mode):
    # With pass-through weights a bright pixel lights the finest-stride cell that holds it, and the bilinear
    # upsamplers put the output peak at that cell's centre. The cells are counted by hand here: stride-s blocks of
    # conv1_1's output grid, whose pixel j is centred on input pixel j - 99 with the release's pad 100 (3x3
    # kernel) and on j itself in aligned mode. A crop off by even one pixel moves the peak off the centre.
    model = _impulse_model(name, mode)
    s = 8 if "pool3" in model.head.skips else 16 if "pool4" in model.head.skips else 32
    origin = -99 if mode == "caffe" else 0
    h, w = 97, 131
    for r, c in [(0, 0), (50, 70), (96, 130), (33, 5), (64, 100), (7, 120)]:
        x = torch.zeros(1, 3, h, w)
        x[0, 0, r, c] = 1.0
        with torch.no_grad():
            heat = model(x)[0, 1]
        centres = [origin + s * ((v - origin) // s) + (s - 1) / 2 for v in (r, c)]
        peak = heat.max()
        # The maxima are the two pixels around the centre (centre +- 0.5, tied), or the nearest border pixel
        # when the centre of a cell cut by the image border lies outside the image.
        rows, cols = torch.nonzero(heat >= peak - 1e-6 * peak.abs(), as_tuple=True)
        for coords, centre, size in ((rows, centres[0], h), (cols, centres[1], w)):
            lo, hi = (min(max(round(v), 0), size - 1) for v in (centre - 0.5, centre + 0.5))
            assert coords.min() >= lo and coords.max() <= hi, (name, mode, r, c, centre, coords.unique())


@pytest.mark.parametrize("mode", MODES)
def test_batch_norm_variant_keeps_the_geometry(mode):
    plain = get_model("fcn8s", alignment=mode, **TINY)
    bn = get_model("fcn8s", alignment=mode, batch_norm=True, **TINY)
    assert bn.head.crop_offsets == plain.head.crop_offsets
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in bn.modules()) == 13
    with torch.no_grad():
        assert bn.eval()(torch.randn(1, 3, 19, 23)).shape == (1, 21, 19, 23)


def test_atonce_scales_the_skips():
    model = get_model("fcn8s_atonce", **TINY)
    assert model.head.skip_scales == {"pool4": 0.01, "pool3": 1e-4}
    assert get_model("fcn8s", **TINY).head.skip_scales == {"pool4": 1.0, "pool3": 1.0}


def test_score_layers_start_at_zero():
    model = get_model("fcn8s", num_classes=7, **TINY)
    for conv in [model.head.score_fr, *model.head.score_skip.values()]:
        assert conv.weight.abs().sum() == 0 and conv.bias.abs().sum() == 0
    with torch.no_grad():
        assert model(torch.randn(1, 3, 20, 20)).abs().max() == 0


def test_build_config_records_the_builder_arguments():
    model = get_model("fcn16s", num_classes=3, alignment="caffe", **TINY)
    assert model.build_config == {
        "name": "fcn16s",
        "kwargs": {
            "num_classes": 3,
            "alignment": "caffe",
            "width": 1 / 16,
            "fc_dim": 16,
            "batch_norm": False,
            "dropout": 0.5,
            "learnable_upsampling": False,
            "backbone_weights": None,
            "in_channels": 3,
        },
    }
