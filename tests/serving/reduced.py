"""What the reduced-precision tests (int8, bf16) share: the shapes model trained in this run as a
service's spec, image folders written from it, and a served runtime's accuracy."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.models import ModelSpec
from serving.backends import OpenVINORuntime
from tests.e2e import shapes


def spec_of(model: shapes.TrainedModel) -> ModelSpec:
    return ModelSpec("shapes", shapes.INPUT_SIZE, shapes.MODE, labels_path=model.labels_path)


def write_images(folder: Path, images: list[bytes]) -> Path:
    folder.mkdir(parents=True)
    for n, data in enumerate(images):
        (folder / f"{n:04d}.png").write_bytes(data)
    return folder


def accuracy(served: OpenVINORuntime, images: list[bytes], labels: np.ndarray) -> float:
    predicted = served.predict(shapes.to_inputs(images)).argmax(axis=1)
    return float((predicted == labels).mean())
