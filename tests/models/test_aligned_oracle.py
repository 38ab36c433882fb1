"""VGG16 FCNs against an independent forward pass, both alignment modes.

The other geometry tests either compare fcnseg with itself or use pass-through weights and zero biases (the
impulse test), which cannot see what the input padding and the borders do to the numbers: a pad 32 px larger than
needed moved the scores of border pixels and no test noticed. Here the whole forward pass is written out with
``F.pad`` / ``F.conv2d`` / ``F.max_pool2d`` / ``F.conv_transpose2d`` and slicing on the model's own tensors (random
weights and biases everywhere, the score layers and upsampling kernels included), with every padding and crop
hard-coded from the definitions below, never read from fcnseg's geometry.

Aligned mode, derived from the receptive-field centres (input coordinate of the centre of a cell, per layer):
a 3 x 3 convolution with padding 1 keeps a cell on its input pixel (x = y); a 2 x 2 / 2 max pooling puts cell y
at x = 2y + 0.5. Through VGG16's five blocks: pool3 cell y sits at 8y + 3.5, pool4 at 16y + 7.5, pool5 at
32y + 15.5: the centre of its 8 / 16 / 32 block. fc6 (7 x 7, padding 3) and fc7 (1 x 1) keep that.
A transposed convolution with kernel k, stride s, padding p maps its output pixel y to input cell
(y + p - (k - 1) / 2) / s. So:

- 64/32 from pool5's grid: 32 (y + p - 31.5) / 32 + 15.5 = y + p - 16, on input pixel y for p = 16;
- 4/2 from pool5's grid to pool4's: 32 (y + p - 1.5) / 2 + 15.5 = 16y + 16p - 8.5, pool4's 16y + 7.5 for p = 1;
- 4/2 from pool4's grid to pool3's: 16 (y + p - 1.5) / 2 + 7.5 = 8y + 8p - 4.5, pool3's 8y + 3.5 for p = 1;
- 32/16 from pool4's grid: 16 (y + p - 15.5) / 16 + 7.5 = y + p - 8, p = 8;
- 16/8 from pool3's grid: 8 (y + p - 7.5) / 8 + 3.5 = y + p - 4, p = 4.

Every crop is then 0. Sizes: an input of 32n pixels gives 16n / 2n / n cells at stride 2 / 16 / 32 with floor
pooling, and the upsamplers give (n - 1) 2 - 2 + 4 = 2n (the tap's size exactly) and (m - 1) s - 2p + k = 32n
pixels: the output covers the input exactly. An input that is not a multiple of 32 must be zero-padded at the
bottom and right (the top-left origin, and so everything above, is kept) up to the next multiple of 32 and no
further: less drops the last partial block, more changes the scores near the bottom/right border, since the
extra zeros become bias-driven activations that the 3 x 3 and 7 x 7 kernels see. The output is cut to h x w.

Caffe mode is the release: conv1_1 padded by 100, pooling rounding up, fc6 unpadded, unpadded upsamplers, and the
release's crops (Caffe ``crop`` layers): score_pool4 at 5, score_pool3 at 9, each cut to the upsampled scores'
size; the output at 19 (32s), 27 (16s), 31 (8s).
"""

import time

import pytest
import torch
import torch.nn.functional as F

from fcnseg.models import get_model

# torchvision's vgg16().features indices of the 13 convolutions, block by block; a 2 x 2 / 2 max pooling ends
# each block.
VGG16_BLOCKS = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))

# name -> skips fused (coarse to fine) and the factor applied to each tap before its score layer.
VARIANTS = {
    "fcn32s": {},
    "fcn16s": {"pool4": 1.0},
    "fcn8s": {"pool4": 1.0, "pool3": 1.0},
    "fcn8s_atonce": {"pool4": 0.01, "pool3": 1e-4},
}

# Per mode: conv1_1's padding, ceil-mode pooling, fc6's padding.
BODY = {"aligned": (1, False, 3), "caffe": (100, True, 0)}

# Per mode and number of skips: (kernel, stride, padding, crop of the tap) for each skip upsampler, then
# (kernel, stride, padding, crop of the output) for the last one. See the module docstring.
HEAD = {
    ("aligned", 0): ([], (64, 32, 16, 0)),
    ("aligned", 1): ([(4, 2, 1, 0)], (32, 16, 8, 0)),
    ("aligned", 2): ([(4, 2, 1, 0), (4, 2, 1, 0)], (16, 8, 4, 0)),
    ("caffe", 0): ([], (64, 32, 0, 19)),
    ("caffe", 1): ([(4, 2, 0, 5)], (32, 16, 0, 27)),
    ("caffe", 2): ([(4, 2, 0, 5), (4, 2, 0, 9)], (16, 8, 0, 31)),
}

# Multiples of 32 and not. Per mode: which upsampling kernels ("full" C x C or "diagonal", see _randomised) on
# which input sizes. Caffe mode's pad 100 makes every input at least 199 x 199 and the float64 convolutions slow,
# so it gets fewer sizes.
SIZES = [(64, 96), (37, 53), (65, 33), (1, 1), (32, 31)]
CASES = {
    "aligned": [("full", SIZES), ("diagonal", SIZES)],
    "caffe": [("full", [(64, 96), (37, 53), (1, 1)]), ("diagonal", [(65, 33)])],
}
NUM_CLASSES = 3


def oracle(sd: dict[str, torch.Tensor], x: torch.Tensor, name: str, mode: str) -> torch.Tensor:
    """The FCN's scores for ``x``, computed from the state dict ``sd`` by the definitions alone."""
    h, w = x.shape[-2:]
    pad1, ceil, pad6 = BODY[mode]

    def conv(t: torch.Tensor, layer: str, padding: int) -> torch.Tensor:
        return F.conv2d(t, sd[f"{layer}.weight"], sd[f"{layer}.bias"], padding=padding)

    t = F.pad(x, (0, (-w) % 32, 0, (-h) % 32)) if mode == "aligned" else x
    pools = []
    for block in VGG16_BLOCKS:
        for i in block:
            t = F.relu(conv(t, f"backbone.features.{i}", pad1 if i == 0 else 1))
        t = F.max_pool2d(t, 2, 2, ceil_mode=ceil)
        pools.append(t)
    taps = {"pool3": pools[2], "pool4": pools[3]}
    fc6 = F.relu(conv(pools[4], "backbone.fc6", pad6))
    fc7 = F.relu(conv(fc6, "backbone.fc7", 0))

    scales = VARIANTS[name]
    ups, (k, s, p, crop) = HEAD[mode, len(scales)]
    score = conv(fc7, "score_fr", 0)
    for (tap, scale), (uk, us, up, o) in zip(scales.items(), ups, strict=True):
        kernel = sd[f"upsample_skip.{tap}.weight"]
        assert kernel.shape[2:] == (uk, uk), kernel.shape
        score = F.conv_transpose2d(score, kernel, stride=us, padding=up)
        skip = conv(taps[tap] * scale, f"score_skip.{tap}", 0)
        sh, sw = score.shape[2:]
        if mode == "aligned":
            assert skip.shape[2:] == score.shape[2:], (skip.shape, score.shape)
        else:  # Caffe's crop layer: the tap cut at offset o to the upsampled scores' size, which must fit
            assert skip.shape[2] >= o + sh and skip.shape[3] >= o + sw, (skip.shape, score.shape, o)
        score = score + skip[:, :, o : o + sh, o : o + sw]
    assert sd["upsample_out.weight"].shape[2:] == (k, k), sd["upsample_out.weight"].shape
    out = F.conv_transpose2d(score, sd["upsample_out.weight"], stride=s, padding=p)
    if mode == "aligned":
        assert out.shape[2:] == (h + (-h) % 32, w + (-w) % 32), out.shape
    assert out.shape[2] >= crop + h and out.shape[3] >= crop + w, (out.shape, crop)
    return out[:, :, crop : crop + h, crop : crop + w]


_MODELS: dict = {}


def _randomised(name: str, mode: str, upsampling: str) -> torch.nn.Module:
    """A tiny float64 model with random weights and biases in every layer.

    ``upsampling="full"``: random C x C upsampling kernels (the plain transposed convolution); ``"diagonal"``:
    random kernels on the channel diagonal only (the per-channel fast path of ``BilinearUpsample``).
    """
    key = name, mode, upsampling
    if key in _MODELS:
        return _MODELS[key]
    gen = torch.Generator().manual_seed(sum(map(ord, "".join(key))))
    model = get_model(name, num_classes=NUM_CLASSES, alignment=mode, width=1 / 32, fc_dim=8).double().eval()
    scales = VARIANTS[name]
    with torch.no_grad():
        for full_name, p in model.named_parameters():
            pname = full_name.removeprefix("score_heads.out.")  # the one head's layers, named as released
            if pname.startswith("upsample_"):
                rand = torch.randn(p.shape, generator=gen, dtype=p.dtype)
                if upsampling == "diagonal":
                    rand *= torch.eye(NUM_CLASSES, dtype=p.dtype)[:, :, None, None]
                p.copy_(rand)
            elif pname.endswith(".weight"):  # He-like scale keeps the activations O(1) through 13 layers
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * (2 / fan_in) ** 0.5)
                tap = pname.removeprefix("score_skip.").removesuffix(".weight")
                if tap in scales:  # undo the at-once scaling so that the skips weigh as much as score_fr
                    p /= scales[tap]
            else:  # biases: large enough that zero padding and bias-driven activations differ clearly
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
    _MODELS[key] = model
    return model


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("mode", ["aligned", "caffe"])
def test_forward_matches_the_written_out_computation(mode, name):
    gen = torch.Generator().manual_seed(1)
    for upsampling, sizes in CASES[mode]:
        model = _randomised(name, mode, upsampling)
        sd = {k.removeprefix("score_heads.out."): v.detach() for k, v in model.state_dict().items()}
        for h, w in sizes:
            x = torch.randn(1, 3, h, w, generator=gen, dtype=torch.float64)
            with torch.no_grad():
                got = model(x)
            want = oracle(sd, x, name, mode)
            assert got.shape == want.shape == (1, NUM_CLASSES, h, w)
            spread = (want.max() - want.min()).item()
            assert spread > 0.1, (name, mode, upsampling, (h, w), spread)  # not a degenerate, constant output
            err = (got - want).abs().max().item()
            assert err <= 1e-10 * max(spread, 1.0), (name, mode, upsampling, (h, w), err, spread)


if __name__ == "__main__":  # observed differences and timing: python -m tests.models.test_aligned_oracle
    torch.set_num_threads(2)
    start = time.perf_counter()
    for mode in BODY:
        for name in VARIANTS:
            for upsampling, sizes in CASES[mode]:
                model = _randomised(name, mode, upsampling)
                sd = {k.removeprefix("score_heads.out."): v for k, v in model.state_dict().items()}
                for h, w in sizes:
                    x = torch.randn(1, 3, h, w, dtype=torch.float64)
                    with torch.no_grad():
                        got = model(x)
                    want = oracle(sd, x, name, mode)
                    spread = (want.max() - want.min()).item()
                    print(
                        f"{mode:8} {name:13} {upsampling:9} {h:3}x{w:<3} max|diff| {(got - want).abs().max():.2e}"
                        f" range {spread:.3g}"
                    )
    print(f"{time.perf_counter() - start:.2f} s")
