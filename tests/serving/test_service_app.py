"""The model-service factory with fake runtimes: endpoints, readiness, errors, batches."""

from __future__ import annotations

import base64
import io
import os
import tempfile
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flask.testing import FlaskClient
from PIL import Image
from werkzeug.test import TestResponse

from common import draining
from common.wire import Priority
from services import resnet50
from serving.app import ServiceSettings, create_app
from serving.loaded import WARM_TIMINGS
from serving.runtime import RuntimeInfo
from tests.helpers import assert_error, encode, photo
from tests.serving.fakes import SETTINGS, EchoRuntime


def upload(data: bytes, name: str) -> tuple[io.BytesIO, str]:
    return io.BytesIO(data), name


def test_not_ready_until_loaded_then_ready() -> None:
    gate = threading.Event()
    app = create_app(resnet50.SPEC, SETTINGS, EchoRuntime(gate), background_load=True)
    service = app.test_client()
    assert service.get("/health/live").status_code == 200
    response = service.get("/health/ready")
    assert_error(response, 503, "model_not_ready")
    assert response.headers["Retry-After"]
    assert_error(service.post("/v1/predict", data=photo(), content_type="image/jpeg"), 503, "model_not_ready")
    gate.set()
    for _ in range(200):  # poll, do not sleep-and-hope
        if app.extensions["models"].base.state != "loading":
            break
        threading.Event().wait(0.01)
    assert service.get("/health/ready").status_code == 200


def test_a_draining_service_says_not_ready_to_predictions_and_probes(
    service: FlaskClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its Gunicorn master marked the drain (SIGTERM): gateways are told to go elsewhere, while
    liveness and everything else still answer."""
    assert service.post("/v1/predict", data=photo(), content_type="image/jpeg").status_code == 200
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    draining.marker(os.getppid()).touch()
    assert_error(service.post("/v1/predict", data=photo(), content_type="image/jpeg"), 503, "model_not_ready")
    assert_error(service.get("/health/ready"), 503, "model_not_ready")
    described = service.get("/v1/model").get_json()
    assert (described["ready"], described["state"]) == (False, "draining")
    assert service.get("/health/live").status_code == 200
    draining.marker(os.getppid()).unlink()
    assert service.post("/v1/predict", data=photo(), content_type="image/jpeg").status_code == 200


def test_failed_load_is_reported_by_liveness_and_metadata() -> None:
    service = create_app(resnet50.SPEC, SETTINGS, EchoRuntime(fail=True), background_load=False).test_client()
    assert_error(service.get("/health/live"), 503, "load_failed")
    assert_error(service.get("/health/ready"), 503, "model_not_ready")
    meta = service.get("/v1/model").get_json()
    assert meta["state"] == "failed" and "no weights here" in meta["error"]


def test_metadata(service: FlaskClient) -> None:
    meta = service.get("/v1/model").get_json()
    assert meta["name"] == "resnet50" and meta["ready"] is True
    assert (meta["input_size"], meta["preprocessing"], meta["classes"]) == (224, "caffe", 1000)
    assert (meta["weights"], meta["weights_hash"], meta["backend"]) == ("random", "abcd", "echo")
    # what a trainer needs to build the same model and read photos the same way (no import of it)
    assert meta["builder"] == "ResNet50"
    assert (meta["max_image_bytes"], meta["max_image_pixels"]) == (
        SETTINGS.max_image_bytes,
        SETTINGS.max_image_pixels,
    )


@pytest.mark.parametrize("how", ["multipart", "raw"])
def test_predict_single_image(service: FlaskClient, how: str) -> None:
    if how == "multipart":
        response = service.post("/v1/predict?top_k=3", data={"file": upload(photo(), "cat.jpg")})
    else:
        response = service.post("/v1/predict?top_k=3", data=photo(), content_type="image/jpeg")
    body = response.get_json()
    assert response.status_code == 200, body
    assert body["model"] == "resnet50" and body["weights"] == "random"
    assert [p["score"] for p in body["predictions"]] == sorted(
        (p["score"] for p in body["predictions"]), reverse=True
    )
    assert len(body["predictions"]) == 3
    assert set(body["predictions"][0]) == {"label", "class_id", "index", "score"}
    assert set(body["timing_ms"]) == {"decode", "queue", "inference", "total"}


def test_batch_keeps_order_and_isolates_a_bad_image(service: FlaskClient, runtime: EchoRuntime) -> None:
    black, white = (encode(Image.new("RGB", (50, 50), c)) for c in ("black", "white"))
    parts = [upload(black, "a.png"), upload(b"nope", "b.txt"), upload(white, "c.png")]
    response = service.post("/v1/predict", data={"files": parts})
    body = response.get_json()
    assert response.status_code == 200
    results = body["results"]
    assert [r["index"] for r in results] == [0, 1, 2]
    assert results[1]["error"]["code"] == "unsupported_media_type" and results[1]["error"]["status"] == 415
    assert results[0]["predictions"][0]["index"] != results[2]["predictions"][0]["index"]
    assert runtime.batches == [(2, 224, 224, 3)]  # the two good images ran as one batch


def test_a_framed_body_answers_like_multipart(service: FlaskClient, runtime: EchoRuntime) -> None:
    black, white = (encode(Image.new("RGB", (50, 50), c)) for c in ("black", "white"))
    images = [black, b"nope", white]
    framed = service.post(
        "/v1/predict",
        data=b"".join(images),
        content_type="application/octet-stream",
        headers={"X-Image-Lengths": ",".join(str(len(i)) for i in images)},
    )
    multipart = service.post("/v1/predict", data={"files": [upload(i, f"{n}") for n, i in enumerate(images)]})
    assert framed.status_code == 200

    def strip(response: Any) -> list[dict[str, Any]]:
        return [{k: v for k, v in r.items() if k != "timing_ms"} for r in response.get_json()["results"]]

    assert strip(framed) == strip(multipart)
    assert strip(framed)[1]["error"]["code"] == "unsupported_media_type"
    assert runtime.batches == [(2, 224, 224, 3)] * 2


@pytest.mark.parametrize("lengths", ["3,5", "1,x", "", "2,-1", "5,3,0,1", "٣,4", ",".join(["0"] * 5 + ["7"])])
def test_framed_lengths_that_do_not_add_up_or_are_too_many_are_400s(
    service: FlaskClient, runtime: EchoRuntime, lengths: str
) -> None:
    framing = {"X-Image-Lengths": lengths}
    response = service.post("/v1/predict", data=b"1234567", content_type="image/jpeg", headers=framing)
    code = "too_many_images" if lengths.count(",") >= 4 else "bad_image_lengths"
    assert_error(response, 400, code)
    assert runtime.batches == []


def test_probabilities_are_returned_compactly(service: FlaskClient) -> None:
    body = service.post("/v1/predict?probabilities=true", data=photo(), content_type="image/jpeg").get_json()
    vector = np.frombuffer(base64.b64decode(body["probabilities"]["data"]), "<f4")
    assert vector.shape == (1000,) and vector.sum() == pytest.approx(1.0, abs=1e-5)
    assert int(vector.argmax()) == body["predictions"][0]["index"]


@pytest.mark.parametrize(
    ("query", "data", "status", "code"),
    [
        ("", b"", 400, "invalid_image"),
        ("", b"plain text", 415, "unsupported_media_type"),
        ("?top_k=0", None, 400, "bad_request"),
        ("?top_k=1001", None, 400, "bad_request"),
        ("?top_k=abc", None, 400, "bad_request"),
        ("", b"\xff" * 2_100_000, 413, "request_entity_too_large"),
    ],
)
def test_bad_requests_get_json_errors(
    service: FlaskClient, query: str, data: bytes | None, status: int, code: str
) -> None:
    response = service.post(
        f"/v1/predict{query}", data=photo() if data is None else data, content_type="image/jpeg"
    )
    assert_error(response, status, code)


def test_too_many_images_is_refused_before_decoding(service: FlaskClient, runtime: EchoRuntime) -> None:
    response = service.post("/v1/predict", data={"files": [upload(b"x", f"{i}.jpg") for i in range(5)]})
    assert_error(response, 400, "too_many_images")
    assert runtime.batches == []


def test_multipart_without_a_file_part(service: FlaskClient) -> None:
    response = service.post("/v1/predict", data={"other": "x"}, content_type="multipart/form-data")
    assert_error(response, 400, "bad_request")


def test_labels_endpoint(service: FlaskClient) -> None:
    body = service.get("/v1/labels").get_json()
    assert body["labels"][281] == ["n02123045", "tabby"] and len(body["labels_hash"]) == 12


def test_request_id_is_echoed(service: FlaskClient) -> None:
    response = service.get("/v1/model", headers={"X-Request-ID": "abc-123"})
    assert response.headers["X-Request-ID"] == "abc-123"
    response = service.get("/v1/model", headers={"X-Request-ID": 'bad"id'})
    assert response.headers["X-Request-ID"] != 'bad"id'


class SlowRuntime(EchoRuntime):
    def predict(self, batch: np.ndarray) -> np.ndarray:
        threading.Event().wait(0.3)
        return super().predict(batch)


def test_a_request_past_its_deadline_gets_504_and_bad_deadlines_400() -> None:
    service = create_app(resnet50.SPEC, SETTINGS, SlowRuntime(), background_load=False).test_client()
    response = service.post(
        "/v1/predict", data=photo(), content_type="image/jpeg", headers={"X-Deadline-Ms": "50"}
    )
    assert response.status_code == 504 and response.get_json()["error"]["code"] in {
        "deadline_exceeded",
        "inference_timeout",
    }
    ok = service.post(
        "/v1/predict", data=photo(), content_type="image/jpeg", headers={"X-Deadline-Ms": "5000"}
    )
    assert ok.status_code == 200
    for bad in ("soon", "0", "-5", "999999999"):
        response = service.post(
            "/v1/predict", data=photo(), content_type="image/jpeg", headers={"X-Deadline-Ms": bad}
        )
        assert_error(response, 400, "bad_request")


def test_an_overloaded_service_refuses_with_503_before_reading_the_body(runtime: EchoRuntime) -> None:
    app = create_app(resnet50.SPEC, ServiceSettings(max_queue_images=16), runtime, background_load=False)
    batcher = app.extensions["models"].base.batcher
    batcher.times.observe(1, 0.040)
    batcher.times.observe(8, 0.320)
    runtime.batches.clear()
    service = app.test_client()
    image = encode(Image.new("RGB", (64, 64), (9, 9, 9)), "PNG")
    batcher.admission.enqueue(16, float("inf"))  # a full queue: 640 ms of work ahead
    shed = service.post("/v1/predict", data=image, content_type="image/png")
    assert_error(shed, 503, "overloaded")
    assert 1 <= int(shed.headers["Retry-After"]) <= 2  # 640 ms drained, jittered by up to 50 %
    late = service.post("/v1/predict", data=image, content_type="image/png", headers={"X-Deadline-Ms": "300"})
    assert_error(late, 503, "overloaded")
    assert runtime.batches == []  # refused: nothing reached the model
    batcher.admission.dropped(16)
    assert service.post("/v1/predict", data=image, content_type="image/png").status_code == 200
    batching = service.get("/v1/model").get_json()["batching"]
    assert batching["shed"] == 2 and batching["queued_images"] == 0
    assert batching["max_queue_images"] == 16 and set(batching["batch_ms"]) >= {"1", "8"}


def test_renamed_settings_are_refused_at_start_up_naming_their_successor() -> None:
    with pytest.raises(ValueError, match="DEFAULT_DEADLINE_MS"):
        ServiceSettings.from_env("resnet50", {"MAX_QUEUE_DELAY_MS": "100"})
    with pytest.raises(ValueError, match="BATCH_WINDOW_MS"):
        ServiceSettings.from_env("resnet50", {"RESNET50_MAX_BATCH_WAIT_MS": "5"})
    for old, new in (
        ("CUSTOM_POLL_S", "REPOSITORY_POLL_S"),
        ("BATCH_PRIORITY_MAX_WAIT_MS", "BACKGROUND_MAX_WAIT_MS"),
        ("MAX_BATCH_IMAGES", "MAX_REQUEST_IMAGES"),
    ):
        with pytest.raises(ValueError, match=f"{old} is no longer read: use {new}"):
            ServiceSettings.from_env("resnet50", {old: "1"})


def test_priority_header_is_interactive_or_background_and_nothing_else(
    service: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    batcher = service.application.extensions["models"].base.batcher
    submitted, submit = [], batcher.submit

    def spy(*args: object, **kwargs: object) -> object:
        submitted.append(kwargs["priority"])
        return submit(*args, **kwargs)

    monkeypatch.setattr(batcher, "submit", spy)

    def post(priority: str) -> TestResponse:
        return service.post(
            "/v1/predict", data=photo(), content_type="image/jpeg", headers={"X-Priority": priority}
        )

    for priority in ("background", "interactive", "batch"):  # batch: background's name before
        response = post(priority)
        assert response.status_code == 200, response.get_data(as_text=True)
        assert response.get_json()["predictions"]
    assert service.post("/v1/predict", data=photo(), content_type="image/jpeg").status_code == 200
    assert submitted == [Priority.BACKGROUND, Priority.INTERACTIVE, Priority.BACKGROUND, Priority.INTERACTIVE]
    refused = post("bogus")
    assert_error(refused, 400, "bad_request")
    assert "interactive, background" in refused.get_json()["error"]["message"]
    assert len(submitted) == 4  # refused before it reached the model
    assert service.get("/v1/model").get_json()["batching"]["queued_background_images"] == 0


def test_every_batch_size_is_warmed_and_timed_before_the_service_is_ready() -> None:
    """A runtime's first call at a new shape compiles for it: no request should pay for that, and
    admission has a measured time for every size the batcher can form."""
    runtime = EchoRuntime()
    app = create_app(resnet50.SPEC, SETTINGS, runtime, background_load=False)
    sizes = [shape[0] for shape in runtime.batches]
    # each size warmed (its compiling call), then every size timed in WARM_TIMINGS passes, the
    # fastest kept
    assert sizes == [*range(1, 9)] * (1 + WARM_TIMINGS)
    batching = app.test_client().get("/v1/model").get_json()["batching"]
    assert set(batching["batch_ms"]) == {str(n) for n in range(1, 9)}
    assert batching["streams"] == 1
    # /v1/model says each figure is the warm-up's, and when it was taken
    taken = batching["batch_ms_taken"]
    assert set(taken) == set(batching["batch_ms"]) and {t["from"] for t in taken.values()} == {"warm-up"}
    assert all(t["at"].endswith("Z") for t in taken.values())


class TwoStreamRuntime(EchoRuntime):
    """Says it computes two batches at once. Its warm-up calls (the first ``warm_calls``) each wait
    for another to run beside them (a barrier of two): a warm-up that called them one at a time
    would break the barrier and fail the load."""

    def __init__(self, warm_calls: int) -> None:
        super().__init__()
        self.warm_calls = warm_calls
        self.together = threading.Barrier(2, timeout=5)
        self.threads: set[str] = set()

    def load(self) -> RuntimeInfo:
        return replace(super().load(), streams=2)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        if len(self.batches) < self.warm_calls:
            self.threads.add(threading.current_thread().name)
            self.together.wait()
        return super().predict(batch)


def test_with_two_streams_every_size_is_warmed_on_both_at_once_and_two_batchers_run() -> None:
    calls = 2 * (1 + WARM_TIMINGS)  # on each stream: its compiling call, then the timed ones
    runtime = TwoStreamRuntime(warm_calls=8 * calls)
    app = create_app(resnet50.SPEC, SETTINGS, runtime, background_load=False)
    sizes = [shape[0] for shape in runtime.batches]
    assert sizes == [n for _ in range(1 + WARM_TIMINGS) for n in range(1, 9) for _ in range(2)]
    assert len(runtime.threads) == 2
    model = app.test_client().get("/v1/model").get_json()
    assert model["state"] == "ready" and model["streams"] == 2 and model["batching"]["streams"] == 2
    assert app.extensions["models"].base.batcher.admission.streams == 2
    answer = app.test_client().post("/v1/predict", data=photo("chelsea.jpg"), content_type="image/jpeg")
    assert answer.status_code == 200


def test_a_negative_stream_count_is_refused_at_start_up() -> None:
    with pytest.raises(ValueError, match="INFERENCE_STREAMS"):
        ServiceSettings.from_env("resnet50", {"INFERENCE_STREAMS": "-1"})
    assert ServiceSettings.from_env("resnet50", {"RESNET50_INFERENCE_STREAMS": "2"}).inference_streams == 2


class LatencyFormRuntime(EchoRuntime):
    """Two streams and a latency form beside them: records how many calls ran beside each."""

    def __init__(self) -> None:
        super().__init__()
        self.running, self.beside = 0, []
        self.lock = threading.Lock()

    def load(self) -> RuntimeInfo:
        return replace(super().load(), streams=2, latency_form=True)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        with self.lock:
            self.beside.append((len(batch), self.running))
            self.running += 1
        try:
            return super().predict(batch)
        finally:
            with self.lock:
                self.running -= 1


def test_a_latency_form_is_warmed_at_every_size_by_a_call_alone() -> None:
    runtime = LatencyFormRuntime()
    create_app(resnet50.SPEC, SETTINGS, runtime, background_load=False)
    firsts: dict[int, int] = {}
    for size, beside in runtime.beside:
        firsts.setdefault(size, beside)
    assert firsts == {n: 0 for n in range(1, 9)}  # each size's first call ran alone
    per_size = [sum(1 for size, _ in runtime.beside if size == n) for n in range(1, 9)]
    assert per_size == [1 + 2 * (1 + WARM_TIMINGS)] * 8  # then both streams, as without the form
