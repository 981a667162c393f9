"""Keras ``preprocess_input`` modes, re-implemented in NumPy so services need no TF op for it.

Each mode performs the same float32 operations in the same order as
``keras.applications.imagenet_utils.preprocess_input``, so results are bit-identical
(``tests/common/test_preprocessing.py`` checks this against Keras itself).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], dtype=np.float32)


def caffe(pixels: np.ndarray) -> np.ndarray:
    """RGB->BGR, subtract the ImageNet mean per channel, no scaling (VGG16, ResNet50)."""
    x = pixels[..., ::-1].astype(np.float32)  # the one float copy; the rest is in place
    x -= CAFFE_MEAN_BGR
    return x


def tf(pixels: np.ndarray) -> np.ndarray:
    """Scale to [-1, 1]: ``x / 127.5 - 1`` (InceptionV3)."""
    x = pixels.astype(np.float32)
    x /= 127.5
    x -= 1.0
    return x


MODES: dict[str, Callable[[np.ndarray], np.ndarray]] = {"caffe": caffe, "tf": tf}


def get(mode: str) -> Callable[[np.ndarray], np.ndarray]:
    """The preprocessing function for a mode name."""
    try:
        return MODES[mode]
    except KeyError:
        raise ValueError(f"unknown preprocessing mode {mode!r}; choose from {sorted(MODES)}") from None
