"""Real recognition through the real stack: the tiny shapes classifier served like any model."""

from __future__ import annotations

import numpy as np
import pytest
import requests

from tests.e2e import shapes
from tests.e2e.conftest import E2EFleet

pytestmark = pytest.mark.e2e
FRESH_IMAGES = 100
BATCH = 25


def test_trained_model_recognises_fresh_shapes_through_nginx(
    fleet: E2EFleet, trained_shapes: shapes.TrainedModel
) -> None:
    images, labels = shapes.dataset(FRESH_IMAGES, seed=2026)  # never seen in training
    answers: list[str] = []
    for start in range(0, FRESH_IMAGES, BATCH):
        files = [
            ("files", (f"{i}.png", data, "image/png"))
            for i, data in enumerate(images[start : start + BATCH], start)
        ]
        response = requests.post(f"{fleet.url}/v1/predict?model=shapes&top_k=1", files=files, timeout=60)
        assert response.status_code == 200, response.text
        answers += [r["predictions"][0]["label"] for r in response.json()["results"]]
    accuracy = float(
        np.mean([answer == shapes.CLASSES[label] for answer, label in zip(answers, labels, strict=True)])
    )
    assert accuracy >= 0.95, (
        f"accuracy {accuracy:.2%} through the stack (holdout {trained_shapes.holdout_accuracy:.2%})"
    )


def test_single_shape_request_names_its_weights(fleet: E2EFleet) -> None:
    images, labels = shapes.dataset(4, seed=77)
    for data, label in zip(images, labels, strict=True):
        body = requests.post(
            f"{fleet.url}/v1/predict?model=shapes", files={"file": ("s.png", data)}, timeout=60
        ).json()
        assert body["weights"] == "file" and body["model"] == "shapes"
        assert [p["label"] for p in body["predictions"]] and len(body["predictions"]) == 4
        assert body["predictions"][0]["label"] == shapes.CLASSES[label]
