"""Real recognition through the real stack: the tiny shapes classifier served like any model."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests

from deploy.local.fleet import ROOT
from tests.e2e import shapes
from tests.e2e.running import E2EFleet

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


def test_the_command_line_client_classifies_a_folder(
    fleet: E2EFleet, trained_shapes: shapes.TrainedModel, tmp_path: Path
) -> None:
    images, labels = shapes.dataset(40, seed=4242)
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, data in enumerate(images):
        (folder / f"{i:03d}.png").write_bytes(data)
    out = tmp_path / "results.csv"
    command = [sys.executable, "-m", "client", "--url", fleet.url, "classify-dir", str(folder)]
    command += ["--model", "shapes", "--out", str(out), "--concurrency", "4", "--quiet"]
    env = {**os.environ, "IMAGEREC_API_KEY": fleet.admin_key}  # not the checkout's run/admin.key
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    with out.open() as written:
        rows = sorted(csv.DictReader(written), key=lambda row: row["path"])
    assert len(rows) == 40 and not any(row["error"] for row in rows)
    accuracy = np.mean(
        [row["label"] == shapes.CLASSES[label] for row, label in zip(rows, labels, strict=True)]
    )
    assert accuracy >= 0.95, f"{accuracy:.2%}"
