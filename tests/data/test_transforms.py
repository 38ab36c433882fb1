"""Paired transforms keep image and mask aligned; Normalize is Preprocessing; pad_collate keeps the loss exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as tF
from hypothesis import given, note, settings
from hypothesis import strategies as st
from torchvision import tv_tensors
from torchvision.transforms import v2

from fcnseg.data.transforms import Normalize, RandomScale, eval_transforms, pad_collate, train_transforms
from fcnseg.preprocessing import CAFFE, IMAGENET, Preprocessing

# Identity-like preprocessing: the normalised image holds the 0-255 pixel values as floats, so we can read the
# painted colours back exactly.
PLAIN = Preprocessing(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), value_range=255.0)
CLASSES = list(range(21)) + [255]

# Colour painted for each label: injective, different in every channel, never 0 in channel 0 (0 = padding).
PAINT = np.zeros((256, 3), dtype=np.uint8)
for _c in range(21):
    PAINT[_c] = (10 * _c + 5, 200 - 7 * _c, (37 * _c) % 200 + 20)
PAINT[255] = (252, 251, 250)  # void pixels get a colour too: they must move with their (void) labels


def paint(mask: np.ndarray) -> tv_tensors.Image:
    """The image whose every pixel is the colour of its label."""
    return tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(PAINT[mask].transpose(2, 0, 1))))


def blocky_mask(grid: np.ndarray, block_h: int, block_w: int) -> np.ndarray:
    """A piecewise-constant mask: every grid cell becomes a block_h x block_w block."""
    return np.kron(grid, np.ones((block_h, block_w), dtype=np.int64))


def alignment_errors(image: torch.Tensor, mask: torch.Tensor, radius: int) -> tuple[int, int]:
    """(pixels checked, pixels wrong) of a transformed painted pair.

    Wrong: a padded pixel (image 0) whose label is not void, or a checked pixel whose colour is not its label's.
    Checked: non-void pixels whose (2 * radius + 1)^2 neighbourhood lies inside the output and has one label —
    with ``radius`` >= 1 bilinear blur across block edges (and across crop edges, whose outer side is unseen) is
    excluded; ``radius=0`` checks every non-void pixel.
    """
    padded = image[0] == 0
    wrong = int((mask[padded] != 255).sum())
    m = tF.pad(mask.double()[None, None], (radius,) * 4, value=-1.0)  # -1: outside counts as another label
    k = 2 * radius + 1
    constant = (tF.max_pool2d(m, k, 1) == -tF.max_pool2d(-m, k, 1))[0, 0]
    checked = constant & (mask != 255) & ~padded
    expected = torch.from_numpy(PAINT[mask[checked].numpy()].T.astype(np.float32))
    wrong += int((image[:, checked] != expected).any(0).sum())
    return int(checked.sum()), wrong


grids = st.integers(1, 6).flatmap(
    lambda h: st.integers(1, 6).flatmap(
        lambda w: st.lists(st.sampled_from(CLASSES), min_size=h * w, max_size=h * w).map(
            lambda v: np.array(v, dtype=np.int64).reshape(h, w)
        )
    )
)
crop_sizes = st.one_of(
    st.none(), st.integers(4, 64), st.tuples(st.integers(4, 64), st.integers(4, 64)).map(lambda t: tuple(t))
)


def _run(mask: np.ndarray, seed: int, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    image, out_mask = train_transforms(PLAIN, **kwargs)(paint(mask), tv_tensors.Mask(torch.from_numpy(mask)))
    assert image.dtype == torch.float32 and out_mask.dtype == torch.int64
    assert image.shape[-2:] == out_mask.shape
    crop = kwargs.get("crop_size")
    if crop is not None:
        assert tuple(out_mask.shape) == ((crop, crop) if isinstance(crop, int) else crop)
    return image, out_mask


@settings(max_examples=30, deadline=None)
@given(
    grid=grids,
    block=st.tuples(st.integers(4, 9), st.integers(4, 9)),
    scale=st.tuples(st.floats(0.5, 2.0), st.floats(0.5, 2.0)).map(sorted),
    crop_size=crop_sizes,
    seed=st.integers(0, 2**31 - 1),
)
def test_train_transforms_keep_image_and_mask_aligned_bilinear(grid, block, scale, crop_size, seed):
    # The real training path (bilinear image, nearest mask). Blocks of >= 4 pixels and scales in [0.5, 2] keep
    # every blurred pixel next to a label change within its 3x3 neighbourhood, so only those are skipped.
    mask = blocky_mask(grid, *block)
    image, out_mask = _run(mask, seed, crop_size=crop_size, scale_range=tuple(scale))
    checked, wrong = alignment_errors(image, out_mask, radius=1)
    note(f"checked {checked} pixels")
    assert wrong == 0


@settings(max_examples=30, deadline=None)
@given(
    grid=grids,
    block=st.tuples(st.integers(2, 6), st.integers(2, 6)),
    scale=st.tuples(st.floats(0.25, 3.0), st.floats(0.25, 3.0)).map(sorted),
    crop_size=crop_sizes,
    seed=st.integers(0, 2**31 - 1),
)
def test_train_transforms_keep_image_and_mask_aligned_nearest(grid, block, scale, crop_size, seed):
    # Image resized with nearest-exact too (the masks' mode): no blur, so every non-void pixel is checked.
    mask = blocky_mask(grid, *block)
    image, out_mask = _run(
        mask, seed, crop_size=crop_size, scale_range=tuple(scale), interpolation=v2.InterpolationMode.NEAREST_EXACT
    )
    checked, wrong = alignment_errors(image, out_mask, radius=0)
    assert checked == int(((out_mask != 255) & (image[0] != 0)).sum())
    assert wrong == 0


ASYMMETRIC = blocky_mask(np.array([[1, 2, 3], [4, 255, 6]]), 5, 4)


def test_alignment_check_fails_when_only_the_image_is_flipped():
    mask = tv_tensors.Mask(torch.from_numpy(ASYMMETRIC))
    image = v2.RandomHorizontalFlip(p=1.0)(paint(ASYMMETRIC))
    out_image, out_mask = train_transforms(PLAIN, scale_range=None, flip=False)(image, mask)
    checked, wrong = alignment_errors(out_image, out_mask, radius=1)
    assert checked > 0 and wrong > 0
    # ...and the same check passes when both are flipped together.
    both = v2.RandomHorizontalFlip(p=1.0)(paint(ASYMMETRIC), mask)
    assert alignment_errors(*train_transforms(PLAIN, scale_range=None, flip=False)(*both), radius=1)[1] == 0


def test_alignment_check_fails_when_only_the_mask_is_cropped_differently():
    image = paint(ASYMMETRIC)[:, :, 2:]  # image shifted by 2 columns relative to its mask
    mask = tv_tensors.Mask(torch.from_numpy(ASYMMETRIC[:, :-2].copy()))
    out_image, out_mask = eval_transforms(PLAIN)(image, mask)
    assert alignment_errors(out_image, out_mask, radius=1)[1] > 0


def test_crop_pads_small_images_with_zero_and_void():
    mask = blocky_mask(np.array([[1, 2]]), 3, 4)  # 3 x 8
    torch.manual_seed(0)
    image, out_mask = train_transforms(PLAIN, crop_size=(10, 12), scale_range=None, flip=False)(
        paint(mask), tv_tensors.Mask(torch.from_numpy(mask))
    )
    assert out_mask.shape == (10, 12)
    padded = image[0] == 0
    assert int(padded.sum()) == 10 * 12 - 3 * 8
    assert bool((out_mask[padded] == 255).all()) and bool((image[:, padded] == 0).all())
    assert int((out_mask == 255).sum()) == 10 * 12 - 3 * 8
    assert sorted(torch.unique(out_mask).tolist()) == [1, 2, 255]


def test_train_transforms_reproducible_with_torch_seed():
    mask = tv_tensors.Mask(torch.from_numpy(ASYMMETRIC))
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        outs.append(train_transforms(PLAIN, crop_size=7, jitter=0.4)(paint(ASYMMETRIC), mask))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_jitter_changes_the_image_only():
    mask = tv_tensors.Mask(torch.from_numpy(ASYMMETRIC))
    torch.manual_seed(0)
    image, out_mask = train_transforms(PLAIN, scale_range=None, flip=False, jitter=0.5)(paint(ASYMMETRIC), mask)
    assert torch.equal(out_mask, mask)
    assert not torch.equal(image, paint(ASYMMETRIC).float())


def test_whole_image_training_without_augmentation_is_eval():
    mask = tv_tensors.Mask(torch.from_numpy(ASYMMETRIC))
    got = train_transforms(CAFFE, scale_range=None, flip=False)(paint(ASYMMETRIC), mask)
    want = eval_transforms(CAFFE)(paint(ASYMMETRIC), mask)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_random_scale_size_and_mask_labels():
    mask = tv_tensors.Mask(torch.from_numpy(ASYMMETRIC))  # 10 x 12
    image, out_mask = RandomScale((1.5, 1.5))(paint(ASYMMETRIC), mask)
    assert image.shape == (3, 15, 18) and out_mask.shape == (15, 18)
    assert set(torch.unique(out_mask).tolist()) == {1, 2, 3, 4, 6, 255}  # nearest: no invented labels


@pytest.mark.parametrize(
    "kwargs",
    [{"scale_range": (0.0, 1.0)}, {"scale_range": (2.0, 1.0)}, {"jitter": -0.1}, {"crop_size": 0}],
)
def test_train_transforms_reject_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        train_transforms(PLAIN, **kwargs)


# -- Normalize ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pre", [IMAGENET, CAFFE], ids=["imagenet", "caffe"])
def test_normalize_is_preprocessing(pre):
    g = torch.Generator().manual_seed(0)
    image = tv_tensors.Image(torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8, generator=g))
    mask = tv_tensors.Mask(torch.randint(0, 21, (5, 7), generator=g))
    out_image, out_mask = Normalize(pre)(image, mask)
    assert isinstance(out_image, tv_tensors.Image) and out_image.dtype == torch.float32
    assert torch.equal(out_image.as_subclass(torch.Tensor), pre(image.as_subclass(torch.Tensor)))
    assert out_mask is mask and out_mask.dtype == torch.int64


def test_normalize_flips_channels_for_bgr():
    red = tv_tensors.Image(torch.tensor([255, 0, 0], dtype=torch.uint8).view(3, 1, 1))
    caffe = Normalize(CAFFE)(red).flatten().tolist()
    assert caffe == pytest.approx([0 - 104.00699, 0 - 116.66877, 255 - 122.67892], abs=1e-4)
    imagenet = Normalize(IMAGENET)(red).flatten().tolist()
    assert imagenet == pytest.approx([(1 - 0.485) / 0.229, -0.456 / 0.224, -0.406 / 0.225], abs=1e-5)


def test_normalize_more_channels_flips_color_only():
    # RGB-D / RGB-HHA input: BGR reverses the colour channels, the others keep their place (the release's readers).
    pre = CAFFE.with_extra_channels((65.0, 132.431))
    assert pre.channels == 5 and pre.std == (1.0,) * 5 and pre.mean[3:] == (65.0, 132.431)
    pixel = tv_tensors.Image(torch.tensor([255, 10, 0, 100, 200], dtype=torch.uint8).view(5, 1, 1))
    out = Normalize(pre)(pixel).flatten().tolist()
    expected = [0 - 104.00699, 10 - 116.66877, 255 - 122.67892, 100 - 65.0, 200 - 132.431]
    assert out == pytest.approx(expected, abs=1e-4)
    # ImageNet-style input: the extra channels on [0, 1], divided by the colour channels' mean std.
    pre = IMAGENET.with_extra_channels((51.0,))
    assert pre.mean[3] == pytest.approx(0.2) and pre.std[3] == pytest.approx((0.229 + 0.224 + 0.225) / 3)
    out = pre(np.full((1, 1, 4), 102, np.uint8)).flatten().tolist()
    assert out[3] == pytest.approx((0.4 - 0.2) / pre.std[3], abs=1e-6) and pre.color() == IMAGENET
    with pytest.raises(ValueError, match="H x W x 4"):
        pre(np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(ValueError, match="one value per channel"):
        Preprocessing(mean=(0.0,) * 4, std=(1.0,) * 3)


def test_normalize_plain_tensor_and_rejects_float():
    image = torch.full((3, 2, 2), 255, dtype=torch.uint8)
    out = Normalize(PLAIN)(image)
    assert type(out) is torch.Tensor and bool((out == 255).all())
    with pytest.raises(TypeError, match="uint8"):
        Normalize(PLAIN)(tv_tensors.Image(torch.zeros(3, 2, 2)))  # normalised twice would be garbage


# -- pad_collate -------------------------------------------------------------------------------------------------
def _pair(h: int, w: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(3, h, w, generator=g) + 0.5  # never 0, so padding is recognisable
    mask = torch.randint(0, 5, (h, w), generator=g)
    mask[0, 0] = 255  # some void inside the image too
    return tv_tensors.Image(image), tv_tensors.Mask(mask)


def test_pad_collate_pads_bottom_right():
    batch = [_pair(4, 6, 0), _pair(7, 3, 1), _pair(5, 5, 2)]
    images, masks = pad_collate(batch)
    assert images.shape == (3, 3, 7, 6) and masks.shape == (3, 7, 6)
    assert images.dtype == torch.float32 and masks.dtype == torch.int64
    assert type(images) is torch.Tensor and type(masks) is torch.Tensor
    for i, (image, mask) in enumerate(batch):
        h, w = mask.shape
        assert torch.equal(images[i, :, :h, :w], image.as_subclass(torch.Tensor))
        assert torch.equal(masks[i, :h, :w], mask.as_subclass(torch.Tensor))
        assert int((images[i] == 0).sum()) == 3 * (7 * 6 - h * w)
        assert bool((images[i, :, h:] == 0).all()) and bool((images[i, :, :, w:] == 0).all())
        assert bool((masks[i, h:] == 255).all()) and bool((masks[i, :, w:] == 255).all())


def test_pad_collate_same_size_is_stack():
    batch = [_pair(4, 6, 0), _pair(4, 6, 1)]
    images, masks = pad_collate(batch)
    assert torch.equal(images, torch.stack([b[0] for b in batch]))
    assert torch.equal(masks, torch.stack([b[1] for b in batch]))


def test_pad_collate_rejects_mismatched_pairs():
    image, _ = _pair(4, 6, 0)
    with pytest.raises(ValueError, match="batch item 0"):
        pad_collate([(image, torch.zeros(4, 5, dtype=torch.int64))])
    with pytest.raises(ValueError, match="empty"):
        pad_collate([])


def test_padded_batch_loss_equals_per_image_loss():
    # A 1x1 convolution is pointwise: a pixel's scores depend on that pixel only, so padding cannot leak in and
    # the padded pixels (void) must add exactly nothing.
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 5, kernel_size=1)
    batch = [_pair(4, 6, 0), _pair(7, 3, 1), _pair(5, 5, 2)]
    images, masks = pad_collate(batch)
    with torch.no_grad():
        logits = model(images)
        total = tF.cross_entropy(logits, masks, ignore_index=255, reduction="sum")
        singles = [
            tF.cross_entropy(model(image[None]), mask[None], ignore_index=255, reduction="sum") for image, mask in batch
        ]
        mean = tF.cross_entropy(logits, masks, ignore_index=255, reduction="mean")
    expected = torch.stack(singles).sum()
    assert float(total) == pytest.approx(float(expected), rel=1e-4)
    valid = sum(int((mask != 255).sum()) for _, mask in batch)
    assert valid == 4 * 6 + 7 * 3 + 5 * 5 - 3
    assert float(mean) == pytest.approx(float(expected) / valid, rel=1e-4)
