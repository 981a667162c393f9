"""BentoML serving the same ResNet50 (random weights, seed 0) as the comparison point: TF compiled
call, BentoML's adaptive batching up to 8. Runs in its own virtualenv (bench/.venv-bento), started
by bench/run.py with ``bentoml serve bench.bento_service:ResNet50``."""

from __future__ import annotations

import json
from pathlib import Path

import bentoml
import numpy as np
from PIL.Image import Image

INDEX = json.loads(
    (Path(__file__).resolve().parents[1] / "common" / "data" / "imagenet_class_index.json").read_text()
)


@bentoml.service(workers=1)
class ResNet50:
    def __init__(self) -> None:
        import keras
        import tensorflow as tf

        keras.utils.set_random_seed(0)
        model = keras.applications.ResNet50(weights=None)
        self.preprocess = keras.applications.resnet50.preprocess_input
        self.call = tf.function(
            lambda x: model(x, training=False),
            input_signature=[tf.TensorSpec([None, 224, 224, 3], tf.float32)],
        )

    @bentoml.api(batchable=True, max_batch_size=8, max_latency_ms=10000)
    def predict(self, images: list[Image]) -> list[list[dict]]:
        pixels = np.stack([np.asarray(i.convert("RGB").resize((224, 224)), np.float32) for i in images])
        probabilities = np.asarray(self.call(self.preprocess(pixels)))
        return [
            [{"label": INDEX[str(i)][1], "score": float(row[i])} for i in np.argsort(-row)[:5]]
            for row in probabilities
        ]
