"""The Winograd path (fcnseg.runtime.kernels): each kernel's values against F.conv2d / the eager model, the measured
choice and its cache, 2 x 2 max pooling, and agreement with eager fp32 on the trained demo model."""

import copy
import functools
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fcnseg
import fcnseg.engine.config
from fcnseg.runtime import agreement, kernels, make_runner, winograd
from fcnseg.runtime.kernels import KernelChoices, MeasuredConv2d, PairMaxPool2d, with_measured_kernels
from tests.helpers import TINY, randomise

needs_nnpack = pytest.mark.skipif(not kernels.nnpack_ready(), reason="this torch build has no NNPACK")
NNPACK_KERNELS = ("nnpack", "nnpack-backward")  # the same forward; PyTorch's backward and fcnseg's


def _pin(monkeypatch, kernel: str) -> None:
    """Make the measurement find ``kernel`` the fastest, oneDNN next: each layer then runs ``kernel`` where it
    applies and oneDNN elsewhere. The timer is the one thing faked; the choice, its tolerance check and its cache
    are the real ones. (Each test needs a cache of its own, or an earlier test's choices are read back.)"""
    speed = {kernel: 1000.0, "onednn": 2000.0}  # ms: far above any real first run, which measure() also reads
    # The candidate's name is in the default argument of the lambda that measure() times.
    monkeypatch.setattr(kernels, "median_ms", lambda fn, **_: speed.get(fn.__defaults__[0], 9000.0))


def _used(model: torch.nn.Module) -> dict[str, str]:
    """``{layer name: kernel}`` of each MeasuredConv2d of ``model`` at its latest call."""
    return {name: m.last for name, m in model.named_modules() if isinstance(m, MeasuredConv2d) and m.last}


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach(), ref.detach()
    return float((out - ref).abs().max() / (ref.max() - ref.min()))


GEOMETRIES = pytest.mark.parametrize(
    "cin, cout, k, stride, padding, dilation, size",
    [
        (5, 7, 3, 1, 1, 1, (13, 17)),  # VGG's 3x3
        (4, 6, 3, 1, 100, 1, (9, 11)),  # the release's conv1_1: pad 100, more than NNPACK pads
        (6, 9, 7, 1, 3, 1, (5, 6)),  # fc6 in aligned mode
        (6, 9, 7, 1, 0, 1, (11, 8)),  # fc6 in caffe mode
        (8, 5, 1, 1, 0, 1, (7, 9)),  # fc7 and the score layers
        (3, 4, 11, 4, 5, 1, (31, 29)),  # AlexNet's conv1: no NNPACK (stride 4), GEMM over strided columns
        (4, 4, 3, 1, 2, 2, (15, 14)),  # dilated: GEMM only
        (6, 5, 3, 1, 1, 1, (2, 3)),  # a map smaller than one Winograd tile
        (3, 8, 3, 1, 0, 1, (10, 7)),  # no padding: the last tiles reach past the output
        (3, 4, 3, 1, 1, 1, (47, 53)),  # over kernels.ONE_BY_ONE_AREA: the batch runs image by image
        (4, 5, (3, 5), 1, (1, 2), 1, (9, 12)),  # a kernel and padding unequal in height and width
    ],
)


@GEOMETRIES
@pytest.mark.parametrize("kernel", ["nnpack", "winograd6", "winograd8", "gemm"])
def test_each_kernel_gives_the_convolution_at_odd_sizes(
    kernel, cin, cout, k, stride, padding, dilation, size, tmp_path, monkeypatch
):
    _pin(monkeypatch, kernel)
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, dilation=dilation)
    x = torch.randn(2, cin, *size)
    expected = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), stride, padding, dilation)
    fast = MeasuredConv2d.adopt(conv, KernelChoices(tmp_path / "c.json"))
    applies = kernel in fast.candidates
    if kernel == "nnpack" and not kernels.nnpack_ready():
        assert not applies
        return
    unit = (stride, dilation) == (1, 1)
    # fcnseg's Winograd tiles: 6 x 6 for 3x3 (and 5x5) kernels, 8 x 8 for 3x3, 5x5 and 7x7 (fc6)
    assert (
        applies
        == {"gemm": True, "nnpack": unit, "winograd6": unit and k == 3, "winograd8": unit and k in (3, 7)}[kernel]
    )
    with torch.no_grad():
        out = fast(x)
    assert fast.last == (kernel if applies else "onednn")
    assert out.shape == expected.shape
    assert _relative_error(out, expected) < 1e-5


@GEOMETRIES
@pytest.mark.parametrize("kernel", [*(pytest.param(k, marks=needs_nnpack) for k in NNPACK_KERNELS), "gemm"])
def test_each_training_kernel_gives_the_convolutions_gradients_at_odd_sizes(
    kernel, cin, cout, k, stride, padding, dilation, size, tmp_path, monkeypatch
):
    """The input's, weight's and bias's gradients through each kernel that training measures (their backwards are
    fcnseg's own) against float64 autograd through F.conv2d, for a batch of two and an uneven output gradient."""
    _pin(monkeypatch, kernel)
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, dilation=dilation)
    x = torch.randn(2, cin, *size)
    reference = [t.detach().double().requires_grad_() for t in (x, conv.weight, conv.bias)]
    expected = F.conv2d(*reference, stride, padding, dilation)
    upstream = torch.randn(expected.shape, dtype=torch.float64)
    expected.backward(upstream)
    fast = MeasuredConv2d.adopt(conv, KernelChoices(tmp_path / "c.json"))
    leaf = x.clone().requires_grad_()
    out = fast(leaf)
    out.backward(upstream.float())
    assert fast.last == (kernel if kernel in fast.candidates else "onednn")
    for got, ref in zip((leaf.grad, conv.weight.grad, conv.bias.grad), (t.grad for t in reference), strict=True):
        assert got.shape == ref.shape and _relative_error(got, ref) < 1e-5


@pytest.mark.parametrize("alignment", ["aligned", "caffe"])
@pytest.mark.parametrize("kernel", [pytest.param("nnpack", marks=needs_nnpack), "winograd6", "winograd8", "gemm", None])
def test_fcn8s_on_every_kernel_is_within_1e4_of_the_range_at_odd_sizes(alignment, kernel, tmp_path, monkeypatch):
    if kernel:
        _pin(monkeypatch, kernel)
    torch.manual_seed(1)
    model = randomise(fcnseg.get_model("fcn8s", num_classes=5, alignment=alignment, **TINY), seed=1).eval()
    fast = with_measured_kernels(model, KernelChoices(tmp_path / "c.json"))
    for size in [(67, 93), (101, 75)]:
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            ref, out = model(x), fast(x)
        assert out.shape == ref.shape == (1, 5, *size)
        assert _relative_error(out, ref) < 1e-4, (size, _relative_error(out, ref))
    used = set(_used(fast).values())
    if kernel == "nnpack":  # every 3x3 layer ran NNPACK; fc6 (7x7, pad < 7) too
        assert _used(fast)["backbone.features.2"] == "nnpack" and "nnpack" in used
    elif kernel in ("winograd6", "winograd8"):  # every 3x3 layer, caffe mode's pad 100 included; 1x1s on oneDNN
        square = ((3, 3),) if kernel == "winograd6" else ((3, 3), (7, 7))  # fc6 too on 8 x 8 tiles
        ran = {name for name, m in fast.named_modules() if isinstance(m, MeasuredConv2d) and m.kernel_size in square}
        assert {name for name, k in _used(fast).items() if k == kernel} == ran
        assert _used(fast)["backbone.fc6"] == ("winograd8" if kernel == "winograd8" else "onednn")
    elif kernel == "gemm":
        assert used == {"gemm"}
    assert not any(isinstance(m, MeasuredConv2d) for m in model.modules()), "the model itself is left as it was"


def test_training_after_a_first_winograd_call_under_inference_mode(tmp_path, monkeypatch):
    """The transform matrices are made once per process; made during a prediction (inference mode) they must still
    serve a training step's backward."""
    _pin(monkeypatch, "winograd8")
    monkeypatch.setattr(winograd, "toom_cook", functools.cache(winograd.toom_cook.__wrapped__))
    monkeypatch.setattr(winograd, "_tile_transforms", functools.cache(winograd._tile_transforms.__wrapped__))
    fast = MeasuredConv2d.adopt(nn.Conv2d(3, 4, 3, padding=1), KernelChoices(tmp_path / "c.json"))
    x = torch.randn(1, 3, 10, 9)
    with torch.inference_mode():
        fast(x)
    assert fast.last == "winograd8"
    fast.run("winograd8", x).square().sum().backward()  # the kernel itself: training measures it out (below)
    plain = nn.Conv2d(3, 4, 3, padding=1)
    plain.load_state_dict(fast.state_dict())
    plain(x).square().sum().backward()
    assert _relative_error(fast.weight.grad, plain.weight.grad) < 1e-4


def test_the_built_f4x3_matrices_are_lavin_and_grays():
    """Section 4.2 of Lavin and Gray (CVPR 2016), typed in from the paper."""
    b_t = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0]]
    b_t += [[0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]
    g = [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6]]
    g += [[1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]
    a_t = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]
    built = winograd.toom_cook(4, 3)
    for ours, paper in zip(built, (a_t, g, b_t), strict=True):
        assert torch.allclose(ours, torch.tensor(paper, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("m, r", [(2, 3), (4, 3), (6, 3), (4, 5), (2, 7), (3, 2)])
def test_each_built_transform_computes_a_1d_correlation(m, r):
    """A^T [(G g) * (B^T d)] is the correlation of an n-sample signal with an r-tap filter, exactly (float64)."""
    a_t, g_t, b_t = winograd.toom_cook(m, r)
    gen = torch.Generator().manual_seed(m * 10 + r)
    d, g = (
        torch.randn(m + r - 1, generator=gen, dtype=torch.float64),
        torch.randn(r, generator=gen, dtype=torch.float64),
    )
    expected = torch.tensor([sum(float(d[i + k] * g[k]) for k in range(r)) for i in range(m)], dtype=torch.float64)
    assert torch.allclose(a_t @ ((g_t @ g) * (b_t @ d)), expected, atol=1e-10)


@pytest.mark.parametrize("columns", [1, 25, 10**6])  # each image alone, two images a chunk, the batch at once
@pytest.mark.parametrize("m, r, padding", [(4, 3, 1), (2, 7, 0)])  # VGG's 3x3 on 6 x 6 tiles, fc6 on 8 x 8
def test_winograd_gives_each_image_of_a_batch_its_own_convolution(columns, m, r, padding, monkeypatch):
    """Images share the GEMMs' columns in chunks of at most ``winograd.COLUMNS`` tiles: every chunking gives each
    image the float64 convolution of that image alone, and the images stay in their order."""
    monkeypatch.setattr(winograd, "COLUMNS", columns)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 4, 19, 23, generator=gen)  # 5 images of 5 x 6 = 30 tiles (3x3), 7 x 9 = 63 (7x7)
    weight, bias = torch.randn(6, 4, r, r, generator=gen), torch.randn(6, generator=gen)
    out = winograd.winograd_conv2d(x, winograd.transform_filters(weight, m), bias, (padding, padding), m)
    for i in range(len(x)):
        alone = F.conv2d(x[i : i + 1].double(), weight.double(), bias.double(), padding=padding)
        assert out[i : i + 1].shape == alone.shape
        assert _relative_error(out[i : i + 1], alone) < 1e-5, i


def test_a_tile_with_more_points_than_the_table_is_refused():
    with pytest.raises(ValueError, match="F\\(6, 5\\)"):
        winograd.toom_cook(6, 5)


def test_winograd_follows_weights_changed_after_its_first_call(tmp_path, monkeypatch):
    """The transformed filters are kept between calls; loading other weights (in place, as load_state_dict does) or
    putting new ones in place must not leave the old ones in use."""
    _pin(monkeypatch, "winograd6")
    torch.manual_seed(3)
    fast = MeasuredConv2d.adopt(nn.Conv2d(4, 6, 3, padding=1), KernelChoices(tmp_path / "c.json"))
    x = torch.randn(1, 4, 9, 10)
    with torch.no_grad():
        fast(x)
        fast.load_state_dict({"weight": torch.randn(6, 4, 3, 3), "bias": torch.randn(6)})
        out = fast(x)
    assert fast.last == "winograd6"
    assert _relative_error(out, F.conv2d(x, fast.weight, fast.bias, padding=1)) < 1e-5
    with torch.inference_mode():  # a copy made while predicting: its weights have no version counter
        copy = MeasuredConv2d.adopt(nn.Conv2d(4, 6, 3, padding=1), fast.choices)
        first = copy(x)
        copy.weight = nn.Parameter(-copy.weight)
        flipped = copy(x)
        expected = F.conv2d(x, copy.weight, copy.bias, padding=1)
    assert copy.last == "winograd6"
    assert _relative_error(flipped, expected) < 1e-5
    assert not torch.allclose(first, flipped)


def test_the_fastest_kernel_is_chosen_and_cached_per_cpu_and_shape(tmp_path, monkeypatch):
    cache = tmp_path / "conv-kernels.json"
    speed = {"onednn": 5000.0, "nnpack": 3000.0, "nnpack-backward": 2500.0, "winograd6": 2000.0, "winograd8": 1500.0,
             "gemm": 1000.0}  # fmt: skip
    timed = []

    def fake_median_ms(fn, **_):  # the candidate's name is in the lambda's default argument
        kernel = fn.__defaults__[0]
        timed.append(kernel)
        return speed[kernel]

    monkeypatch.setattr(kernels, "median_ms", fake_median_ms)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    fast = MeasuredConv2d.adopt(conv, KernelChoices(cache))
    x = torch.randn(1, 4, 9, 10)
    fast(x)
    assert fast.last == "gemm" and set(timed) == {k for k in fast.candidates if not k.startswith("winograd")}
    doc = json.loads(cache.read_text())
    assert list(doc) == [kernels.kernels_key()]
    assert doc[kernels.kernels_key()] == {"4->6 k3x3 s1x1 p1x1 d1x1 in 1x~91px torch.float32+grad": "gemm"}  # 90 px
    # A new process (new choices read from the file) measures nothing for a shape it has seen ...
    timed.clear()
    again = MeasuredConv2d.adopt(nn.Conv2d(4, 6, 3, padding=1), KernelChoices(cache))
    again(x)
    assert timed == [] and again.last == "gemm"
    # ... nor for one of about the same area (the size class is the area to a half power of two) ...
    again(torch.randn(1, 4, 10, 10))
    assert timed == []
    # ... and measures a new size class, keeping both in the file.
    again(torch.randn(1, 4, 12, 12))
    assert timed and len(json.loads(cache.read_text())[kernels.kernels_key()]) == 2


def test_a_kernel_that_strays_from_onednn_is_never_chosen(tmp_path, monkeypatch):
    monkeypatch.setitem(kernels._RUN, "gemm", lambda conv, x: kernels._onednn(conv, x) * 1.001)  # 0.1% off
    monkeypatch.setattr(kernels, "median_ms", lambda fn, **_: {"gemm": 0.1}.get(fn.__defaults__[0], 9.0))
    fast = MeasuredConv2d.adopt(nn.Conv2d(4, 6, 3, padding=1), KernelChoices(tmp_path / "c.json"))
    with torch.no_grad():
        fast(torch.randn(1, 4, 9, 10))
    assert fast.last != "gemm"


def test_training_never_measures_the_winograd_kernels(tmp_path, monkeypatch):
    _pin(monkeypatch, "winograd6")
    fast = MeasuredConv2d.adopt(nn.Conv2d(4, 6, 3, padding=1), KernelChoices(tmp_path / "c.json"))
    x = torch.randn(1, 4, 9, 10)
    fast(x).sum().backward()
    assert fast.last == "onednn"
    with torch.no_grad():
        fast(x)
    assert fast.last == "winograd6"


@needs_nnpack
def test_inference_never_measures_the_nnpack_kernel_that_differs_in_its_backward_only(tmp_path, monkeypatch):
    _pin(monkeypatch, "nnpack-backward")
    fast = MeasuredConv2d.adopt(nn.Conv2d(4, 6, 3, padding=1), KernelChoices(tmp_path / "c.json"))
    x = torch.randn(1, 4, 9, 10)
    with torch.no_grad():
        fast(x)
    assert fast.last == "onednn"
    fast(x).sum().backward()
    assert fast.last == "nnpack-backward"


def test_training_times_forward_and_backward_without_touching_the_gradients(tmp_path, monkeypatch):
    # Wrong code caught: training choosing by the forward alone (fc6's oneDNN backward is several times the GEMM's,
    # its forward not), and a measurement that leaves gradients in .grad for the first optimiser step to apply.
    calls = {"grad": 0}
    fast = MeasuredConv2d.adopt(nn.Conv2d(4, 6, 3, padding=1), KernelChoices(tmp_path / "c.json"))
    fast.weight.register_hook(lambda g: calls.__setitem__("grad", calls["grad"] + 1))
    monkeypatch.setattr(kernels, "median_ms", lambda fn, **_: fn() is None or 20.0)
    x = torch.randn(1, 4, 9, 10)
    with torch.no_grad():
        fast(x)
    assert calls["grad"] == 0
    out = fast(x.requires_grad_())
    measured = calls["grad"]
    assert measured >= len(fast.candidates) - 2 and fast.weight.grad is None  # all but the Winograd two
    out.sum().backward()
    assert calls["grad"] == measured + 1  # the step's own backward, once
    w = fast.weight.detach().requires_grad_()
    (want,) = torch.autograd.grad(F.conv2d(x.detach(), w, fast.bias.detach(), padding=1).sum(), [w])
    torch.testing.assert_close(fast.weight.grad, want, rtol=1e-5, atol=1e-5)  # one gradient, not one per trial


def test_a_kernel_far_slower_on_its_first_run_is_not_timed_further(tmp_path, monkeypatch):
    import time

    def slow_gemm(conv, x):
        time.sleep(0.2)  # 200 ms, over 3x oneDNN's (faked) 20 ms
        return kernels._gemm(conv, x)

    timed = []
    monkeypatch.setitem(kernels._RUN, "gemm", slow_gemm)
    monkeypatch.setattr(kernels, "median_ms", lambda fn, **_: timed.append(fn.__defaults__[0]) or 20.0)
    fast = MeasuredConv2d.adopt(nn.Conv2d(4, 6, 3, padding=1), KernelChoices(tmp_path / "c.json"))
    with torch.no_grad():
        fast(torch.randn(1, 4, 9, 10))
    assert "gemm" not in timed and "onednn" in timed and fast.last != "gemm"


def test_an_unwritable_cache_costs_only_the_measurement(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    fast = MeasuredConv2d.adopt(nn.Conv2d(3, 4, 3, padding=1), KernelChoices(blocker / "conv-kernels.json"))
    x = torch.randn(1, 3, 8, 8)
    assert torch.allclose(fast(x), F.conv2d(x, fast.weight, fast.bias, padding=1), atol=1e-5)


@pytest.mark.parametrize("ceil_mode", [True, False])
@pytest.mark.parametrize("size", [(8, 10), (7, 10), (8, 9), (375, 501), (2, 3)])
def test_pair_max_pooling_equals_max_pool2d(size, ceil_mode):
    x = torch.randn(2, 3, *size)
    pool = nn.MaxPool2d(2, 2, ceil_mode=ceil_mode)
    expected = pool(x)
    fast = PairMaxPool2d.adopt(nn.MaxPool2d(2, 2, ceil_mode=ceil_mode))
    assert type(fast) is PairMaxPool2d
    with torch.no_grad():
        assert torch.equal(fast(x), expected)
    assert type(PairMaxPool2d.adopt(nn.MaxPool2d(3, 2))) is nn.MaxPool2d  # other geometries are left alone


def test_winograd_agrees_with_eager_fp32_on_the_demo_model(quick_demo):
    out, _ = quick_demo
    model = fcnseg.load(out / "fcn8s" / "best.pt")
    ds = fcnseg.data.get_dataset("synthetic", split="val")
    images = [model.preprocessing(ds[i][0].as_subclass(torch.Tensor)).unsqueeze(0) for i in range(24)]
    share = agreement(make_runner(model, "winograd"), make_runner(model, "eager"), images)
    print(f"winograd agrees with eager fp32 on {100 * share:.4f}% of {len(images)} demo images' pixels")
    assert share >= 0.9999


@pytest.mark.parametrize("kernel", [pytest.param("nnpack", marks=needs_nnpack), "winograd6", "winograd8", "gemm"])
def test_gradients_through_the_measured_kernels_equal_the_plain_models(kernel, tmp_path, monkeypatch):
    _pin(monkeypatch, kernel)
    torch.manual_seed(2)
    plain = randomise(fcnseg.get_model("fcn8s", num_classes=4, **TINY), seed=2).eval()  # eval: no dropout masks
    fast = with_measured_kernels(plain, KernelChoices(tmp_path / "c.json"))
    x, y = torch.randn(2, 3, 61, 77), torch.randint(0, 4, (2, 61, 77))
    winograd = kernel.startswith("winograd")
    if winograd:  # training does not measure them (their backward is slow); their gradients must still be right
        for m in fast.modules():
            if isinstance(m, MeasuredConv2d) and kernel in m.candidates:
                m.forward = lambda x, m=m: m.run(kernel, x)
                m.last = kernel
    for net in (plain, fast):
        F.cross_entropy(net(x), y).backward()
    assert set(_used(fast).values()) >= {kernel}
    for (name, p), q in zip(plain.named_parameters(), fast.parameters(), strict=True):
        if p.grad is not None:
            assert _relative_error(q.grad, p.grad) < 1e-4, name


def test_the_gemm_backward_is_the_products_derivative():
    """The GEMM kernel's own backward (its gradients taken as products of other operands than autograd's) against
    finite differences in float64, for a batch of two."""
    from fcnseg.runtime.kernels import _ColumnsProduct

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(5, 12, dtype=torch.float64, generator=g, requires_grad=True)
    columns = torch.randn(2, 12, 7, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(_ColumnsProduct.apply, (weight, columns))


def _fp32_convolutions(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose Conv2d layers compute F.conv2d in fp32 even under autocast; the rest as it was."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if type(m) is nn.Conv2d:

            def fp32(x, m=m):
                with torch.autocast("cpu", enabled=False):
                    return F.conv2d(x.float(), m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups)

            m.forward = fp32
    return model


@pytest.mark.parametrize("kernel", ["onednn", "gemm"])
def test_under_autocast_the_gemm_runs_in_fp32_and_onednn_in_bf16(kernel, tmp_path, monkeypatch):
    # bf16 training (CPU autocast) measures oneDNN's bf16 convolution against the GEMM in fp32. Pinned to the GEMM,
    # each convolution equals an fp32 F.conv2d, gradients included (the upsampling stays in autocast's bf16 in
    # both); pinned to oneDNN, the model is the plain one under autocast. Wrong code caught: the GEMM left to
    # autocast (bf16 products), Winograd or NNPACK measured in bf16 training, and the autocast choice read from
    # the fp32 one's cache entry.
    _pin(monkeypatch, kernel)
    plain = randomise(fcnseg.get_model("fcn8s", num_classes=4, **TINY), seed=3).eval()
    choices = KernelChoices(tmp_path / "c.json")
    fast = with_measured_kernels(plain, choices)
    x, y = torch.randn(1, 3, 45, 53), torch.randint(0, 4, (1, 45, 53))

    def loss_and_grads(net):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = net(x)
        loss = F.cross_entropy(logits.float(), y)
        return [loss.detach(), *torch.autograd.grad(loss, [p for p in net.parameters() if p.requires_grad])]

    got = loss_and_grads(fast)
    assert set(_used(fast).values()) == {kernel}
    assert choices.choices and all(key.endswith("+grad+autocast torch.bfloat16") for key in choices.choices)
    want = loss_and_grads(plain if kernel == "onednn" else _fp32_convolutions(plain))
    tolerance = 0 if kernel == "onednn" else 1e-4
    assert abs(float(got[0] - want[0])) <= tolerance * float(want[0])
    assert all(_relative_error(g, w) <= tolerance for g, w in zip(got[1:], want[1:], strict=True))
    if kernel == "gemm":  # and the test tells the two apart: bf16 convolutions move these gradients far more
        bf16 = loss_and_grads(plain)
        assert max(_relative_error(g, w) for g, w in zip(bf16[1:], want[1:], strict=True)) > 1e-3


@pytest.mark.parametrize(
    "features, conv_kernels, deterministic, wanted",
    [
        ("avx2 fma", "auto", False, True),
        ("sse4_2", "auto", False, False),
        ("sse4_2", "measured", False, True),
        ("avx2 fma", "onednn", False, False),
        ("avx2 fma", "auto", True, False),  # the choice depends on timing: not in deterministic mode
    ],
)
def test_training_takes_the_measured_kernels_as_documented(
    tmp_path, monkeypatch, features, conv_kernels, deterministic, wanted
):
    from fcnseg.engine.train import train
    from tests.engine.conftest import TINY_TRAIN

    if wanted and not kernels.nnpack_ready() and features != "sse4_2":
        pytest.skip("this torch build has no NNPACK")
    monkeypatch.setenv("FCNSEG_CPU_FEATURES", features)
    common = {**TINY_TRAIN, "iters": 2, "val_every": 2, "deterministic": deterministic, "seed": 5}
    state = train(fcnseg.engine.config.TrainConfig(**common, conv_kernels=conv_kernels, out=str(tmp_path / "a")))
    model = fcnseg.load(tmp_path / "a" / "last.pt")  # saved under the usual names, loads as a plain model
    assert not any(isinstance(m, MeasuredConv2d) for m in model.modules())
    seen = []
    monkeypatch.setattr(MeasuredConv2d, "forward", lambda self, x: seen.append(1) or nn.Conv2d.forward(self, x))
    train(fcnseg.engine.config.TrainConfig(**common, conv_kernels=conv_kernels, out=str(tmp_path / "b")))
    assert bool(seen) == wanted
    assert state.history and state.history[-1]["mean_iu"] >= 0
