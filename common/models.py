"""What a model service is: a small spec on top of the shared service factory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.labels import IMAGENET_INDEX

KERAS_WEIGHTS_BASE = "https://storage.googleapis.com/tensorflow/keras-applications/"
BASE_MODELS = ("vgg16", "resnet50", "inceptionv3")
"""The fleet's base models, in the order it lists them; each is a service in ``services/``."""
BACKBONE_LAYERS = {"vgg16": 21, "resnet50": 175, "inceptionv3": 311}
"""Layers below each base's classifier (``model.layers[1:-1]``: neither the input nor the ImageNet
softmax) - the most ``fine_tune_layers`` may name. Checked against Keras by the tests."""


@dataclass(frozen=True)
class ModelSpec:
    """Everything that differs between model services."""

    name: str
    """Name clients use (``?model=resnet50``)."""
    input_size: int
    """Square input side in pixels."""
    preprocessing: str
    """``serving.preprocessing`` mode: ``caffe`` or ``tf``."""
    builder: str | None = None
    """``keras.applications`` constructor; ``None`` for a custom model saved as a ``.keras`` file."""
    imagenet_file: str | None = None
    """File name of the ImageNet weights in the Keras cache (``$KERAS_HOME/models``)."""
    imagenet_url: str | None = None
    """Where Keras downloads that file from (for ``make weights`` and error messages)."""
    imagenet_md5: str | None = None
    """The file's hash as Keras checks it after downloading."""
    labels_path: Path = IMAGENET_INDEX
    """Labels file; the shipped ImageNet index by default."""


def keras_application(
    name: str, builder: str, input_size: int, preprocessing: str, weights_path: str, md5: str
) -> ModelSpec:
    """Spec of a ``keras.applications`` ImageNet classifier."""
    return ModelSpec(
        name=name,
        input_size=input_size,
        preprocessing=preprocessing,
        builder=builder,
        imagenet_file=weights_path.rsplit("/", 1)[-1],
        imagenet_url=KERAS_WEIGHTS_BASE + weights_path,
        imagenet_md5=md5,
    )
