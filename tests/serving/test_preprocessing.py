"""Our NumPy preprocessing is bit-identical to Keras' own ``preprocess_input``."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from common import imaging
from services import inceptionv3, resnet50, vgg16
from serving import preprocessing
from tests.helpers import PHOTOS, photo
from tests.serving.fakes import KERAS_MODULES


@pytest.mark.parametrize("spec", [vgg16.SPEC, resnet50.SPEC, inceptionv3.SPEC], ids=lambda s: s.name)
@pytest.mark.parametrize("name", PHOTOS)
def test_preprocessing_equals_keras_exactly(spec, name: str) -> None:
    pixels = imaging.load_pixels(photo(name), spec.input_size, imaging.ImageLimits())
    ours = preprocessing.get(spec.preprocessing)(pixels[None])
    reference = KERAS_MODULES[spec.name].preprocess_input(pixels[None].copy())
    assert ours.dtype == reference.dtype == np.float32
    assert np.array_equal(ours, reference)


def test_random_pixels_match_keras_in_both_modes() -> None:
    pixels = np.random.default_rng(1).integers(0, 256, (3, 17, 17, 3), dtype=np.uint8)
    for mode in ("caffe", "tf"):
        reference = keras.applications.imagenet_utils.preprocess_input(pixels.copy(), mode=mode)
        assert np.array_equal(preprocessing.get(mode)(pixels), reference)


def test_the_modes_differ_so_the_parity_test_can_fail() -> None:
    pixels = np.full((1, 4, 4, 3), 100, np.uint8)
    assert not np.array_equal(preprocessing.caffe(pixels), preprocessing.tf(pixels))


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="torch"):
        preprocessing.get("torch")
