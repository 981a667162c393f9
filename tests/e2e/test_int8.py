"""PRECISION=int8 on a running fleet, through Nginx: a model trained in this run is quantized at
start-up (calibrated and gated on images of its own kind), answers say int8, and it still
classifies fresh images right; a new version in its repository is quantized before it is swapped
in."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from deploy.local.fleet import ExtraService, Fleet
from deploy.local.running import RunningFleet, free_port, on_free_ports, running, wait_until
from tests.e2e import shapes
from tests.e2e.running import publish
from tests.helpers import is_project_variable

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def int8_fleet(trained_shapes: shapes.TrainedModel) -> Iterator[RunningFleet]:
    run_dir = Path(tempfile.mkdtemp(prefix="imagerec-int8-"))
    run_dir.chmod(0o755)
    for name, seed in (("calibration", 31), ("validation", 32)):
        (run_dir / name).mkdir()
        for n, data in enumerate(shapes.dataset(48, seed)[0]):
            (run_dir / name / f"{n:03d}.png").write_bytes(data)
    service = ExtraService.custom(
        "shapes",
        free_port(),
        str(trained_shapes.model_path),
        str(trained_shapes.labels_path),
        shapes.INPUT_SIZE,
        shapes.MODE,
    )
    repository = run_dir / "repository"
    (repository / "shapes" / "1").mkdir(parents=True)
    shutil.copy(trained_shapes.model_path, repository / "shapes" / "1" / "model.keras")
    service.env.update(
        SHAPES_MODEL_REPOSITORY=str(repository),
        SHAPES_REPOSITORY_POLL_S="1",
        SHAPES_PRECISION="int8",
        SHAPES_CALIBRATION_DIR=str(run_dir / "calibration"),
        SHAPES_VALIDATION_DIR=str(run_dir / "validation"),
    )
    env = {k: v for k, v in os.environ.items() if not is_project_variable(k)}
    env.update(MODEL_CACHE=str(run_dir / "converted"), TF_CPP_MIN_LOG_LEVEL="2", GATEWAY_CACHE_SIZE="0")
    settings = on_free_ports(run_dir, models=(), workers=False)
    try:
        with running(Fleet(settings, [service]), env, timeout_s=300) as handle:
            yield handle
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def test_an_int8_model_answers_through_nginx_and_says_so(int8_fleet: RunningFleet) -> None:
    listed = requests.get(f"{int8_fleet.url}/v1/models", timeout=10).json()["models"]
    assert [(m["name"], m["precision"]) for m in listed] == [("shapes", "int8")]
    model = requests.get(f"{int8_fleet.service_url('shapes')}/v1/model", timeout=10).json()
    assert model["precision"] == "int8" and "precision_note" not in model
    images, labels = shapes.dataset(60, seed=33)
    right = 0
    for data, label in zip(images, labels, strict=True):
        body = requests.post(
            f"{int8_fleet.url}/v1/predict?model=shapes&top_k=1",
            data=data,
            headers={"Content-Type": "image/png"},
            timeout=60,
        ).json()
        assert body["precision"] == "int8", body
        right += body["predictions"][0]["label"] == shapes.CLASSES[label]
    assert right >= 54, right  # 90 % of fresh images, as fp32 gets
    metrics = requests.get(f"{int8_fleet.service_url('shapes')}/metrics", timeout=10).text
    assert 'imagerec_model_precision_bits{model="shapes"} 8.0' in metrics


def test_a_new_version_is_quantized_before_it_is_swapped_in(
    int8_fleet: RunningFleet, trained_shapes: shapes.TrainedModel
) -> None:
    repository = int8_fleet.fleet.run_dir / "repository"
    publish(repository, 2, trained_shapes.model_path, 1e-3)

    def served() -> tuple[str, str]:
        model = requests.get(f"{int8_fleet.service_url('shapes')}/v1/model", timeout=10).json()
        return model["version"], model["precision"]

    wait_until(lambda: served() == ("2", "int8"), 180, "version 2 to be quantized and served")
    data = shapes.dataset(1, seed=34)[0][0]
    body = requests.post(
        f"{int8_fleet.url}/v1/predict?model=shapes",
        data=data,
        headers={"Content-Type": "image/png"},
        timeout=60,
    ).json()
    assert (body["version"], body["precision"]) == ("2", "int8"), body
