"""The gateway's HTTP client against mocked model services (``responses``)."""

from __future__ import annotations

import base64
import json

import pytest
import requests
import responses
from responses import matchers

from common.errors import (
    BadUpstreamResponse,
    DeadlineExceeded,
    ModelUnavailable,
    Overloaded,
    ServiceError,
    UpstreamTimeout,
)
from common.labels import load
from gateway.client import ModelClient, new_session
from gateway.registry import Registry

R1, R2 = "http://r1:8502", "http://r2:8502"


def reply(count: int = 1, **extra: object) -> dict:
    results = [
        {"index": i, "predictions": [{"label": "tabby", "class_id": "n02123045", "index": 281, "score": 0.9}]}
        for i in range(count)
    ]
    return {"model": "resnet50", "weights": "random", "results": results, **extra}


@pytest.fixture
def client() -> ModelClient:
    session = new_session(4)
    return ModelClient(
        Registry({"resnet50": [R1, R2]}, session), session, read_timeout_s=5, connect_retries=0
    )


@responses.activate
def test_sends_images_as_multipart_with_params_and_request_id(client: ModelClient) -> None:
    call = responses.post(
        f"{R1}/v1/predict",
        json=reply(2),
        match=[
            matchers.query_param_matcher({"top_k": "3", "probabilities": "true"}),
            matchers.header_matcher({"X-Request-ID": "rid-1"}),
        ],
    )
    body = client.predict("resnet50", [b"a", b"b"], top_k=3, probabilities=True, request_id="rid-1")
    assert len(body["results"]) == 2
    sent = call.calls[0].request
    assert sent.headers["Content-Type"].startswith("multipart/form-data")
    assert sent.body.count(b'name="files"') == 2


@responses.activate
def test_connect_error_fails_over_to_next_replica_and_marks_it_down(client: ModelClient) -> None:
    responses.post(f"{R1}/v1/predict", body=requests.ConnectionError("refused"))
    responses.post(f"{R2}/v1/predict", json=reply())
    for replica in client.registry.replicas("resnet50"):
        replica.ready = True
    assert client.predict("resnet50", [b"a"], top_k=1)["results"]
    first, second = client.registry.replicas("resnet50")
    assert (first.ready, second.ready) == (False, True)
    # The failed replica now goes last, so the next request goes straight to r2.
    assert [r.url for r in client.registry.candidates("resnet50")][0] == R2


@responses.activate
def test_all_replicas_down_is_503(client: ModelClient) -> None:
    responses.post(f"{R1}/v1/predict", body=requests.ConnectionError("refused"))
    responses.post(f"{R2}/v1/predict", body=requests.ConnectionError("refused"))
    with pytest.raises(ModelUnavailable) as info:
        client.predict("resnet50", [b"a"], top_k=1)
    assert info.value.status == 503 and info.value.retry_after


@responses.activate
def test_not_ready_replica_is_skipped(client: ModelClient) -> None:
    responses.post(f"{R1}/v1/predict", status=503, json={"error": {"code": "model_not_ready"}})
    responses.post(f"{R2}/v1/predict", status=503, json={"error": {"code": "model_not_ready"}})
    with pytest.raises(ModelUnavailable, match="not ready"):
        client.predict("resnet50", [b"a"], top_k=1)
    assert len(responses.calls) == 2


@responses.activate
def test_read_timeout_is_504_and_not_retried(client: ModelClient) -> None:
    responses.post(f"{R1}/v1/predict", body=requests.ReadTimeout("slow"))
    responses.post(f"{R2}/v1/predict", json=reply())
    with pytest.raises(UpstreamTimeout) as info:
        client.predict("resnet50", [b"a"], top_k=1)
    assert info.value.status == 504 and len(responses.calls) == 1


@responses.activate
def test_member_client_errors_pass_through(client: ModelClient) -> None:
    responses.post(
        f"{R1}/v1/predict", status=400, json={"error": {"code": "too_many_images", "message": "33 images"}}
    )
    with pytest.raises(ServiceError) as info:
        client.predict("resnet50", [b"a"], top_k=1)
    assert (info.value.status, info.value.code, info.value.message) == (400, "too_many_images", "33 images")


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (502, "<html><body>502 Bad Gateway</body></html>"),
        (200, "not json"),
        (200, json.dumps([1, 2])),
        (200, json.dumps({"results": []})),  # wrong length
        (200, json.dumps({"results": "x"})),
        (500, json.dumps({"error": {"code": "internal_error"}})),
        (
            200,
            json.dumps({"results": [{"predictions": [{"label": "cat", "index": 1, "score": float("nan")}]}]}),
        ),
        (200, json.dumps({"results": [{"predictions": [{"label": "cat", "index": 1, "score": 7.5}]}]})),
        (200, json.dumps({"results": [{"predictions": [{"label": 3, "index": 1, "score": 0.5}]}]})),
        (200, json.dumps({"results": [{"predictions": []}]})),
        (200, json.dumps({"results": ["tabby"]})),
    ],
)
@responses.activate
def test_garbage_replies_are_502(client: ModelClient, status: int, body: str) -> None:
    responses.post(f"{R1}/v1/predict", status=status, body=body)
    with pytest.raises(BadUpstreamResponse):
        client.predict("resnet50", [b"a"], top_k=1)


@responses.activate
def test_labels_are_fetched_once_and_checked_against_their_hash(client: ModelClient) -> None:
    index = load()
    call = responses.get(f"{R1}/v1/labels", json={"labels": index.to_json(), "labels_hash": index.digest})
    assert client.labels("resnet50", index.digest) == index
    assert client.labels("resnet50", index.digest) == index
    assert call.call_count == 1
    with pytest.raises(ModelUnavailable):
        client.labels("resnet50", "some-other-hash")


@responses.activate
def test_registry_refresh_reads_readiness_from_metadata() -> None:
    session = new_session(2)
    registry = Registry({"resnet50": [R1, R2]}, session)
    responses.get(f"{R1}/v1/model", json={"ready": True, "weights": "random"})
    responses.get(f"{R2}/v1/model", body=requests.ConnectionError("down"))
    registry.refresh()
    entry = registry.describe("resnet50")
    assert entry["status"] == "ready" and entry["weights"] == "random"
    assert [(r["url"], r["ready"]) for r in entry["replicas"]] == [(R1, True), (R2, False)]


def test_probability_payload_roundtrip_is_compact() -> None:
    import numpy as np

    from common.service import encode_probabilities

    vector = np.linspace(0, 1, 1000, dtype=np.float32)
    payload = encode_probabilities(vector)
    assert len(payload["data"]) < 5400  # 4000 bytes of float32, base64
    assert np.array_equal(np.frombuffer(base64.b64decode(payload["data"]), "<f4"), vector)


@responses.activate
def test_a_busy_replica_is_not_marked_down_by_one_slow_probe() -> None:
    registry = Registry({"resnet50": [R1]}, new_session(2))
    responses.get(f"{R1}/v1/model", json={"ready": True})
    registry.refresh()
    responses.replace(responses.GET, f"{R1}/v1/model", body=requests.ReadTimeout("busy"))
    registry.refresh()
    registry.refresh()
    assert registry.replicas("resnet50")[0].ready  # two slow probes: still in rotation
    registry.refresh()
    assert not registry.replicas("resnet50")[0].ready  # the third: out
    responses.replace(responses.GET, f"{R1}/v1/model", json={"ready": True})
    registry.refresh()
    assert registry.replicas("resnet50")[0].ready  # answering again: back in
    responses.replace(responses.GET, f"{R1}/v1/model", body=requests.ConnectionError("refused"))
    registry.refresh()
    assert not registry.replicas("resnet50")[0].ready  # a refused connection: out at once


@responses.activate
def test_one_image_travels_as_the_raw_body_and_its_answer_is_read_as_one_result(client: ModelClient) -> None:
    single = {"model": "resnet50", "weights": "random", "predictions": reply()["results"][0]["predictions"]}
    call = responses.post(
        f"{R1}/v1/predict",
        json=single,
        match=[matchers.header_matcher({"Content-Type": "application/octet-stream"})],
    )
    body = client.predict("resnet50", [b"jpeg-bytes"], top_k=1)
    assert call.calls[0].request.body == b"jpeg-bytes"
    assert body["results"] == [{"index": 0, "predictions": single["predictions"]}]


@responses.activate
def test_connection_failures_are_retried_once_after_a_jittered_backoff() -> None:
    session = new_session(2)
    client = ModelClient(
        Registry({"resnet50": [R1]}, session), session, connect_retries=1, retry_backoff_s=0.01
    )
    responses.post(f"{R1}/v1/predict", body=requests.ConnectionError("restarting"))
    responses.post(f"{R1}/v1/predict", json=reply())
    assert client.predict("resnet50", [b"a"], top_k=1)["results"]
    assert len(responses.calls) == 2
    responses.post(f"{R1}/v1/predict", body=requests.ConnectionError("down"))
    responses.post(f"{R1}/v1/predict", body=requests.ConnectionError("still down"))
    with pytest.raises(ModelUnavailable):
        client.predict("resnet50", [b"a"], top_k=1)
    assert len(responses.calls) == 4  # one retry, capped


@responses.activate
def test_the_remaining_deadline_travels_to_the_member(client: ModelClient) -> None:
    import time

    call = responses.post(f"{R1}/v1/predict", json=reply())
    client.predict("resnet50", [b"a"], top_k=1, deadline=time.monotonic() + 2.0)
    sent = int(call.calls[0].request.headers["X-Deadline-Ms"])
    assert 1500 < sent <= 2000
    with pytest.raises(DeadlineExceeded):
        client.predict("resnet50", [b"a"], top_k=1, deadline=time.monotonic() - 0.1)
    assert call.call_count == 1  # an expired request is not sent at all


@responses.activate
def test_a_failing_replica_opens_its_circuit_and_is_probed_back() -> None:
    import time

    session = new_session(2)
    client = ModelClient(
        Registry({"resnet50": [R1]}, session),
        session,
        connect_retries=0,
        breaker_fail_max=3,
        breaker_reset_s=0.3,
    )
    garbage = responses.post(f"{R1}/v1/predict", status=502, body="<html>Bad Gateway</html>")
    for _ in range(3):
        with pytest.raises(BadUpstreamResponse):
            client.predict("resnet50", [b"a"], top_k=1)
    with pytest.raises(ModelUnavailable, match="circuit open"):
        client.predict("resnet50", [b"a"], top_k=1)  # answered at once, nothing sent
    assert garbage.call_count == 3
    responses.replace(responses.POST, f"{R1}/v1/predict", json=reply())
    time.sleep(0.35)
    assert client.predict("resnet50", [b"a"], top_k=1)["results"]  # the trial call closes the circuit
    assert client.predict("resnet50", [b"a"], top_k=1)["results"]


@responses.activate
def test_client_errors_do_not_open_the_circuit(client: ModelClient) -> None:
    responses.post(
        f"{R1}/v1/predict", status=400, json={"error": {"code": "too_many_images", "message": "x"}}
    )
    for _ in range(8):
        with pytest.raises(ServiceError):
            client.predict("resnet50", [b"a"], top_k=1)
    assert client._breaker(R1).state == "closed"


def overloaded_reply() -> dict:
    return {"json": {"error": {"code": "overloaded", "message": "at capacity"}}, "status": 503}


@responses.activate
def test_an_overloaded_replica_passes_the_call_on_and_stays_in_rotation(client: ModelClient) -> None:
    busy = responses.post(f"{R1}/v1/predict", **overloaded_reply())
    responses.post(f"{R2}/v1/predict", json=reply())
    for replica in client.registry.replicas("resnet50"):
        replica.ready = True
    assert client.predict("resnet50", [b"a"], top_k=1)["results"]
    assert busy.call_count == 1  # r1 was asked first and said it was full
    assert all(r.ready for r in client.registry.replicas("resnet50"))


@responses.activate
def test_every_replica_overloaded_is_503_at_once_without_retries_or_tripping_the_circuit() -> None:
    session = new_session(4)
    client = ModelClient(
        Registry({"resnet50": [R1, R2]}, session), session, connect_retries=3, breaker_fail_max=1
    )
    first = responses.post(f"{R1}/v1/predict", **overloaded_reply())
    second = responses.post(f"{R2}/v1/predict", **overloaded_reply())
    for _ in range(3):
        with pytest.raises(Overloaded) as info:
            client.predict("resnet50", [b"a"], top_k=1)
        assert info.value.status == 503 and info.value.retry_after == 1
    assert first.call_count == second.call_count == 3  # one round per request, circuits closed


@responses.activate
def test_an_answer_cut_off_in_transit_moves_to_the_next_replica(client: ModelClient) -> None:
    """Not a 500: the prediction is idempotent, so the next replica is asked; none left is a 503."""
    responses.post(f"{R1}/v1/predict", body=requests.exceptions.ChunkedEncodingError("connection broken"))
    responses.post(f"{R2}/v1/predict", json=reply())
    for replica in client.registry.replicas("resnet50"):
        replica.ready = True
    assert client.predict("resnet50", [b"a"], top_k=1)["results"]
    assert all(r.ready for r in client.registry.replicas("resnet50"))  # still in rotation
    responses.replace(responses.POST, f"{R2}/v1/predict", body=requests.exceptions.ChunkedEncodingError("x"))
    with pytest.raises(ModelUnavailable, match="broken response"):
        client.predict("resnet50", [b"a"], top_k=1)
