"""The model the peers of ``make bench`` serve (BentoML, LitServe, MLServer): the fleet's own
ResNet50 IR on OpenVINO, fed the way their docs feed an image model - Pillow decodes and resizes,
NumPy does Keras' 'caffe' preprocessing, and the answer is a top-5 of ImageNet labels.

Runs inside each peer's virtualenv, which has NumPy, Pillow and OpenVINO and not the project: this
module imports nothing else. ``PEER_IR`` names the model.xml (bench/baselines.py passes the fp32 or
the int8 IR the fleet serves) and ``PEER_PRECISION`` the arithmetic: ``f32`` (the default) or
``bf16``, as the fleet's service computes the same form.

NOTE: compiled with the arithmetic the fleet's form it is compared with uses, and the latency hint.
OpenVINO's default on a CPU with bf16 is bf16 arithmetic (fp32 ResNet50, batch 8, one call at a
time on the 2-core AMD EPYC: 124 img/s against 64): the fleet's PRECISION=fp32 is compared with a
peer in f32, its PRECISION=auto (bf16 there) with a peer in bf16, so that no side wins by another
arithmetic. And a peer runs one batch at a time (one infer request), for which the throughput
hint's streams leave half the cores idle (int8, batch 8: 117 img/s against 217 on the latency
hint); the fleet's int8 services use those streams because two threads feed them at once.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

IR = "PEER_IR"
SIZE = 224
CONFIG = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": os.environ.get("PEER_PRECISION", "f32")}
MEAN_BGR = np.array([103.939, 116.779, 123.68], np.float32)
LABELS = json.loads(
    (Path(__file__).resolve().parents[1] / "common" / "data" / "imagenet_class_index.json").read_text()
)

Top5 = list[dict[str, Any]]


def pixels(image: Image.Image) -> np.ndarray:
    """A decoded photo as the model's ``(224, 224, 3)`` uint8 RGB input, resized whole."""
    return np.asarray(image.convert("RGB").resize((SIZE, SIZE)), np.uint8)


def decode(data: bytes) -> np.ndarray:
    """A JPEG's (or any Pillow format's) bytes as the model's input pixels."""
    return pixels(Image.open(io.BytesIO(data)))


class ResNet50:
    """The IR named by ``PEER_IR`` (or ``path``), compiled on the CPU; called with a batch of
    uint8 pixels, answers each image's top 5."""

    def __init__(self, path: str | None = None) -> None:
        import openvino as ov

        self.path = path or os.environ[IR]
        self.compiled = ov.Core().compile_model(self.path, "CPU", CONFIG)

    def __call__(self, batch: np.ndarray) -> list[Top5]:
        bgr = batch[..., ::-1].astype(np.float32)  # Keras 'caffe': RGB->BGR, minus the mean
        bgr -= MEAN_BGR
        probabilities = self.compiled(bgr)[0]
        return [
            [{"label": LABELS[str(i)][1], "score": float(row[i])} for i in np.argsort(-row)[:5]]
            for row in probabilities
        ]
