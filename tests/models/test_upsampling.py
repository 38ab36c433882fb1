import pytest
import torch
import torch.nn.functional as F

from fcnseg.models import get_model
from fcnseg.models.upsampling import BilinearUpsample, bilinear_kernel, matrix_upsampling
from tests.helpers import TINY


def _closed_form(k: int) -> torch.Tensor:
    # upsample_filt of the Caffe release's surgery.py, written out element by element.
    f = (k + 1) // 2
    c = f - 1 if k % 2 else f - 0.5
    return torch.tensor(
        [[(1 - abs(i - c) / f) * (1 - abs(j - c) / f) for j in range(k)] for i in range(k)],
        dtype=torch.float64,
    )


@pytest.mark.parametrize("k", [4, 16, 32, 63, 64])
def test_bilinear_kernel_closed_form(k):
    torch.testing.assert_close(bilinear_kernel(k), _closed_form(k), rtol=0, atol=1e-15)


def test_bilinear_kernel_literal_values():
    row4 = torch.tensor([0.25, 0.75, 0.75, 0.25], dtype=torch.float64)
    torch.testing.assert_close(bilinear_kernel(4), row4[:, None] * row4[None, :])
    k63 = bilinear_kernel(63)  # AlexNet's upsampler: factor 32, centre 31
    assert k63[31, 31] == 1.0
    assert k63[0, 31] == 1 / 32
    assert k63[0, 0] == (1 / 32) ** 2
    # An even kernel 2f is a partition of unity at stride f: it sums to f^2.
    for k in (4, 16, 32, 64):
        assert bilinear_kernel(k).sum().item() == pytest.approx((k // 2) ** 2, abs=1e-9)


@pytest.mark.parametrize("padding", [0, 1])
def test_fixed_2x_upsampler_keeps_a_constant_in_the_interior(padding):
    up = BilinearUpsample(3, 4, 2, padding=padding)
    x = torch.full((1, 3, 6, 5), 7.0)
    y = up(x)
    # Border pixels see only part of the kernel; every interior one gets weights summing to 1.
    interior = y[:, :, 3 - padding : -3 + padding, 3 - padding : -3 + padding]
    assert interior.numel() > 0
    torch.testing.assert_close(interior, torch.full_like(interior, 7.0))
    # Class c feeds class c only.
    z = up(torch.cat([torch.ones(1, 1, 4, 4), torch.zeros(1, 2, 4, 4)], 1))
    assert z[:, 1:].abs().max() == 0


def test_upsampler_matches_bilinear_interpolation_in_aligned_mode():
    # With padding (k - s) / 2 the 2x upsampler is bilinear interpolation with half-pixel centres
    # (align_corners=False) away from the border.
    up = BilinearUpsample(1, 4, 2, padding=1)
    x = torch.randn(1, 1, 5, 7, dtype=torch.float64)
    up = up.double()
    ref = torch.nn.functional.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(up(x)[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1])


@pytest.mark.parametrize("learnable", [False, True])
def test_upsampling_stays_fixed_unless_learnable(learnable):
    torch.manual_seed(0)
    model = get_model("fcn16s", num_classes=3, learnable_upsampling=learnable, **TINY)
    with torch.no_grad():  # non-zero score layers so that the upsamplers receive a gradient
        for conv in [model.head.score_fr, *model.head.score_skip.values()]:
            conv.weight.normal_()
    ups = [model.head.upsample_out, *model.head.upsample_skip.values()]
    before = [u.weight.detach().clone() for u in ups]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    loss = model(torch.randn(1, 3, 40, 36)).square().mean()
    loss.backward()
    opt.step()
    changed = [not torch.equal(b, u.weight) for b, u in zip(before, ups, strict=True)]
    assert changed == [learnable] * len(ups)


def test_frozen_diagonal_upsampler_runs_per_channel_with_the_same_numbers():
    up = BilinearUpsample(5, 16, 8, padding=4)
    x = torch.randn(2, 5, 6, 7)
    full = torch.nn.functional.conv_transpose2d(x, up.weight, None, 8, 4)
    assert up._diagonal_kernel() is not None
    torch.testing.assert_close(up(x), full, rtol=1e-5, atol=1e-6)
    # Loading a learned, non-diagonal kernel falls back to the full transposed convolution.
    learned = up.weight.detach() + 0.01 * torch.randn_like(up.weight)
    up.load_state_dict({"weight": learned})
    assert up._diagonal_kernel() is None
    torch.testing.assert_close(up(x), torch.nn.functional.conv_transpose2d(x, learned, None, 8, 4))


def test_a_copy_made_under_inference_mode_upsamples_per_channel():
    # A model copied while predicting (the winograd path builds its copy on the first input) holds inference tensors,
    # which have no version counter: the per-channel kernel's cache key must not ask for it.
    up = BilinearUpsample(3, 4, 2)
    x = torch.randn(1, 3, 5, 6)
    expected = F.conv_transpose2d(x, up.weight.detach(), None, 2)
    with torch.inference_mode():
        copy = BilinearUpsample(3, 4, 2)
        assert copy.weight.is_inference()
        got = copy(x)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("k", "stride", "padding", "start"),
    [(16, 8, 4, 0), (64, 32, 16, 0), (16, 8, 0, 31), (64, 32, 0, 19), (63, 32, 15, 0), (4, 2, 1, 0), (3, 2, 0, 2)],
)  # aligned FCN-8s / FCN-32s, their caffe-mode crops, FCN-AlexNet's odd kernel, the 2x ones
def test_matrix_upsampling_is_the_transposed_convolution_cropped(k, stride, padding, start):
    # The oracle: the transposed convolution over the full C x C weight of the release's kernel, then the crop.
    classes, n, m = 3, 5, 7
    weight = torch.zeros(classes, classes, k, k, dtype=torch.float64)
    for c in range(classes):
        weight[c, c] = _closed_form(k)
    x = torch.randn(2, classes, n, m, dtype=torch.float64)
    full = F.conv_transpose2d(x, weight, None, stride, padding)
    h, w = full.shape[2] - start - 3, full.shape[3] - start - 1  # a window short of the end on both axes
    up = BilinearUpsample(classes, k, stride, padding=padding)
    assert up.is_fixed_bilinear()
    up.as_matrices = True
    got = up.cropped(x, start, h, w)
    torch.testing.assert_close(got, full[:, :, start : start + h, start : start + w], rtol=0, atol=1e-12)


def test_only_the_fixed_bilinear_kernel_is_upsampled_by_matrices():
    up = BilinearUpsample(4, 16, 8, padding=4)
    # Caffe's filler computes the kernel in float32: within 1e-6 of the float64 one, the same layer.
    f32 = bilinear_kernel(16).float()
    with torch.no_grad():
        up.weight.zero_()
        for c in range(4):
            up.weight[c, c] = f32
    assert up.is_fixed_bilinear()
    with torch.no_grad():
        up.weight[1, 1, 3, 3] += 1e-3  # one class's kernel changed
    assert not up.is_fixed_bilinear()
    up.reset_parameters()
    with torch.no_grad():
        up.weight[0, 1] = up.weight[0, 0]  # class 1 feeding class 0 as well
    assert not up.is_fixed_bilinear()
    assert BilinearUpsample(4, 16, 8, padding=4).is_fixed_bilinear()
    assert not BilinearUpsample(4, 16, 8, padding=4, learnable=True).is_fixed_bilinear()


def test_matrix_upsampling_is_set_for_export_only():
    model = get_model("fcn8s", num_classes=3, **TINY).eval()
    model.head.upsample_skip["pool4"].weight.requires_grad_(True)  # a learned 2x upsampling stays a convolution
    layers = [model.head.upsample_out, *model.head.upsample_skip.values()]
    with model.export_form():  # what the ONNX export runs within
        assert [m.as_matrices for m in layers] == [True, False, True]
    assert [m.as_matrices for m in layers] == [False, False, False]
    with pytest.raises(RuntimeError), matrix_upsampling(model):
        raise RuntimeError  # an export that fails leaves the layers as they were too
    assert not any(m.as_matrices for m in layers)
