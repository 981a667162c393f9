"""Fakes of the model services' parts: a runtime that answers from the mean pixel, and the Keras
modules each base model's reference preprocessing comes from."""

from __future__ import annotations

import threading

import keras
import numpy as np

from common.errors import WeightsUnavailable
from services import inceptionv3, resnet50, vgg16
from serving.runtime import Outputs, RuntimeInfo
from serving.settings import ServiceSettings

SETTINGS = ServiceSettings(max_request_images=4, max_body_bytes=2_000_000, explain_max_passes=50)
"""The service tests' settings: small limits, so refusals are cheap to reach."""

KERAS_MODULES = {
    vgg16.SPEC.name: keras.applications.vgg16,
    resnet50.SPEC.name: keras.applications.resnet50,
    inceptionv3.SPEC.name: keras.applications.inception_v3,
}


class EchoRuntime:
    """Probabilities from the mean pixel value, so different images give different answers."""

    pixels_in = False

    def __init__(self, gate: threading.Event | None = None, fail: bool = False) -> None:
        self.gate, self.fail, self.batches = gate, fail, []

    def load(self) -> RuntimeInfo:
        if self.gate:
            self.gate.wait(10)
        if self.fail:
            raise WeightsUnavailable("no weights here")
        return RuntimeInfo("echo", "random", "seed=0", "abcd", 1000, 0.0)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        self.batches.append(batch.shape)
        logits = np.zeros((len(batch), 1000), np.float32)
        for row, image in zip(logits, batch, strict=True):
            row[int(abs(image.mean())) % 1000] = 5.0
        exp = np.exp(logits)
        return exp / exp.sum(axis=1, keepdims=True)

    def predict_features(self, batch: np.ndarray) -> Outputs:
        return Outputs(self.predict(batch))
