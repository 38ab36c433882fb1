"""Checkpoints written before heads became parts of the FCN (schema 1: the first head's layers at the top level,
further heads under ``extra_heads.``) load into today's models and compute what they computed then.

The files in ``fixtures/`` were saved by the code of that time (``fixtures/make_schema1.py`` at commit 784d5e5),
with the logits it computed for a fixed input: the oracle is the old code's own output, not today's. Those logits
came from one CPU's kernels; on another the convolutions round differently, so the values are compared within
float32's epsilon per layer (relative to their range) and the argmax exactly wherever it is decided.
"""

from pathlib import Path

import pytest
import torch

import fcnseg
from fcnseg.checkpoint import SCHEMA_VERSION, read_checkpoint, upgrade_state_dict
from tests.helpers import assert_same_output_across_kernels

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("name", ["fcn8s", "fcn16s_twohead", "fcn16s_rgb_hha"])
def test_a_schema_1_checkpoint_loads_and_computes_what_it_did(name):
    raw = torch.load(FIXTURES / f"schema1_{name}.pt", weights_only=True)
    assert raw["schema_version"] == 1 and not any(k.startswith("score_heads.") for k in raw["state_dict"])
    ckpt = read_checkpoint(FIXTURES / f"schema1_{name}.pt")
    assert ckpt["schema_version"] == SCHEMA_VERSION == 2
    model = fcnseg.load(FIXTURES / f"schema1_{name}.pt")
    assert set(model.state_dict()) == set(ckpt["state_dict"])  # every tensor found its place, none left over
    expected = torch.load(FIXTURES / "schema1_expected.pt", weights_only=True)
    x = expected["input"][:, : model.in_channels]
    with torch.no_grad():
        assert_same_output_across_kernels(model, model(x), expected["logits"][name])
    if name == "fcn16s_twohead":
        assert model.head_classes["geometric"] == ["sky", "horizontal", "vertical"]


def test_the_filter_by_hand():
    t = torch.zeros(1)
    old = {
        "backbone.fc7.weight": t,
        "score_fr.weight": t,
        "upsample_skip.pool4.weight": t,
        "extra_heads.geometric.score_fr.bias": t,
        "streams.hha.score_skip.pool4.bias": t,
        "streams.hha.backbone.features.0.weight": t,
        "score_heads.semantic.upsample_out.weight": t,  # already new: kept
    }
    assert list(upgrade_state_dict(old, ["semantic", "geometric"])) == [
        "backbone.fc7.weight",
        "score_heads.semantic.score_fr.weight",
        "score_heads.semantic.upsample_skip.pool4.weight",
        "score_heads.geometric.score_fr.bias",
        "streams.hha.score_heads.semantic.score_skip.pool4.bias",
        "streams.hha.backbone.features.0.weight",
        "score_heads.semantic.upsample_out.weight",
    ]


def test_the_comparison_takes_another_cpu_s_rounding_but_not_a_changed_bias():
    model = fcnseg.load(FIXTURES / "schema1_fcn8s.pt")
    x = torch.load(FIXTURES / "schema1_expected.pt", weights_only=True)["input"][:, :3]
    with torch.no_grad():
        out = model(x)
        # What another CPU's kernels gave: up to 1.5e-8 off (about 0.08 epsilon of the 0.18 range) on most elements.
        other_cpu = out + 1.5e-8 * torch.sign(torch.randn(out.shape, generator=torch.Generator().manual_seed(0)))
        assert_same_output_across_kernels(model, other_cpu, out)
        with pytest.raises(AssertionError):
            torch.testing.assert_close(other_cpu, out, rtol=0, atol=0)  # what an exact comparison made of it
        model.score_heads["out"].score_fr.bias[0] += 1e-3  # one bias off by a thousandth
        with pytest.raises(AssertionError, match="over the tolerance"):
            assert_same_output_across_kernels(model, model(x), out)
