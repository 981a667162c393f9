"""Prometheus metrics: what each process counts, label hygiene, and sums across worker processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from gateway.app import create_app as create_gateway
from services import resnet50
from serving.app import ServiceSettings
from serving.app import create_app as create_service
from tests.gateway.fakes import FakeModelClient
from tests.helpers import gateway_settings, metric_value, photo
from tests.serving.fakes import EchoRuntime

CAT = photo("chelsea.jpg")
ROOT = Path(__file__).resolve().parents[2]


def test_a_service_counts_requests_batches_and_load() -> None:
    client = create_service(
        resnet50.SPEC, ServiceSettings(), EchoRuntime(), background_load=False
    ).test_client()
    before = client.get("/metrics").get_data(as_text=True)
    assert client.post("/v1/predict", data=CAT, content_type="image/jpeg").status_code == 200
    assert client.post("/v1/predict", data=b"nope", content_type="image/jpeg").status_code == 415
    response = client.get("/metrics")
    assert response.content_type.startswith("text/plain")
    after = response.get_data(as_text=True)

    def grew(name: str, **labels: str) -> float:
        return metric_value(after, name, **labels) - metric_value(before, name, **labels)

    labels = {"component": "service", "route": "/v1/predict", "model": "resnet50"}
    assert grew("imagerec_requests_total", **labels, status="200") == 1
    assert grew("imagerec_requests_total", **labels, status="415") == 1
    assert grew("imagerec_request_duration_seconds_count", **labels) == 2
    assert grew("imagerec_inference_images_total", model="resnet50") == 1
    assert grew("imagerec_inference_batches_total", model="resnet50") == 1
    assert grew("imagerec_batch_size_count", model="resnet50") == 1
    assert grew("imagerec_queue_duration_seconds_count", model="resnet50") == 1
    assert metric_value(after, "imagerec_model_ready", model="resnet50") == 1
    assert metric_value(after, "imagerec_requests_total", route="/metrics") == 0  # scrapes are not counted


def test_the_gateway_labels_only_known_models() -> None:
    settings = gateway_settings()
    client = create_gateway(settings, client=FakeModelClient(settings), poll_health=False).test_client()  # type: ignore[arg-type]
    before = client.get("/metrics").get_data(as_text=True)
    client.post("/v1/predict?model=vgg16", data=CAT, content_type="image/jpeg")
    client.post("/v1/predict?model=ensemble", data=CAT, content_type="image/jpeg")
    client.post("/v1/predict?model=%00drop-table", data=CAT, content_type="image/jpeg")
    after = client.get("/metrics").get_data(as_text=True)
    for model, status in (("vgg16", "200"), ("ensemble", "200"), ("other", "404")):
        labels = {"component": "gateway", "route": "/v1/predict", "model": model, "status": status}
        assert (
            metric_value(after, "imagerec_requests_total", **labels)
            - metric_value(before, "imagerec_requests_total", **labels)
            == 1
        )
    assert "drop-table" not in after


def test_worker_processes_are_summed(tmp_path: Path) -> None:
    """As under Gunicorn: two processes count into one folder; a scrape from a third sees the sum."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    count = (
        "from common import metrics; "
        "metrics.REQUESTS.labels('gateway', '/v1/predict', 'vgg16', '200').inc({})"
    )
    for n in (3, 4):
        subprocess.run([sys.executable, "-c", count.format(n)], env=env, check=True, cwd=ROOT)
    scrape = "from common import metrics; print(metrics.scrape().decode())"
    text = subprocess.run(
        [sys.executable, "-c", scrape], env=env, check=True, cwd=ROOT, capture_output=True, text=True
    ).stdout
    assert (
        metric_value(text, "imagerec_requests_total", component="gateway", model="vgg16", status="200") == 7
    )
