import os

import pytest
import torch

# Two cores here and in CI: keep torch from oversubscribing them when pytest runs.
torch.set_num_threads(min(2, os.cpu_count() or 1))

# A width-reduced VGG16 (channels / 16, fc6/fc7 of 16): same geometry as the published network, tiny compute.
TINY = {"width": 1 / 16, "fc_dim": 16}


@pytest.fixture
def tiny() -> dict:
    return dict(TINY)
