import pytest

from tests.helpers import TINY

# A tiny configuration shared by the training tests: 7 classes of synthetic shapes at 48 x 48, a width-1/16 VGG16.
TINY_TRAIN = dict(
    dataset="synthetic",
    data_options={"size": 48, "num_images": 8},
    model="fcn32s",
    **TINY,
    preset="modern",
    batch_size=2,
    crop_size=0,
    scale_min=1.0,
    scale_max=1.0,
    num_workers=0,
    val_images=4,
    progress=False,
    deterministic=True,
)


@pytest.fixture
def tiny_train() -> dict:
    return dict(TINY_TRAIN)
