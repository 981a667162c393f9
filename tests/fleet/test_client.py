"""The gateway's HTTP model_client against mocked model services (``responses``)."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from http.client import RemoteDisconnected
from typing import Any

import prometheus_client
import pytest
import requests
import responses
from responses import matchers
from urllib3.exceptions import MaxRetryError, NewConnectionError, ProtocolError

from common.errors import (
    BadUpstreamResponse,
    DeadlineExceeded,
    ModelUnavailable,
    Overloaded,
    ServiceError,
    UpstreamTimeout,
)
from common.labels import load
from common.outcomes import labels_from_json
from common.wire import split_images
from fleet.client import ModelClient, build_client, new_session
from fleet.registry import Registry
from tests.fleet.fakes import R1, R2, reply
from tests.helpers import gateway_settings


class Clock:
    """A clock the test moves: the breakers' resets without waiting for them."""

    def __init__(self) -> None:
        self.now = 1000.0  # binary fractions from here: 1000.5 - 1000.0 is exactly 0.5

    def __call__(self) -> float:
        return self.now


def one_replica(**options: Any) -> ModelClient:
    """A client of ``resnet50`` with the one replica R1, built with ``options``."""
    session = new_session(2)
    return ModelClient(Registry({"resnet50": [R1]}, session), session, **options)


@pytest.fixture
def model_client() -> ModelClient:
    session = new_session(4)
    return ModelClient(
        Registry({"resnet50": [R1, R2]}, session), session, read_timeout_s=5, connect_retries=0
    )


@responses.activate
def test_sends_images_framed_with_params_and_request_id(model_client: ModelClient) -> None:
    call = responses.post(
        f"{R1}/v1/predict",
        json=reply(2),
        match=[
            matchers.query_param_matcher({"top_k": "3", "probabilities": "true"}),
            matchers.header_matcher({"X-Request-ID": "rid-1"}),
        ],
    )
    body = model_client.predict("resnet50", [b"a", b"b"], top_k=3, probabilities=True, request_id="rid-1")
    assert len(body.results) == 2
    sent = call.calls[0].request
    assert sent.headers["Content-Type"] == "application/octet-stream"
    assert (sent.headers["X-Image-Lengths"], sent.body) == ("1,1", b"ab")


@responses.activate
def test_connect_error_fails_over_to_next_replica_and_marks_it_down(model_client: ModelClient) -> None:
    responses.post(f"{R1}/v1/predict", body=requests.ConnectionError("refused"))
    responses.post(f"{R2}/v1/predict", json=reply())
    for replica in model_client.registry.replicas("resnet50"):
        replica.ready = True
    assert model_client.predict("resnet50", [b"a"], top_k=1).results
    first, second = model_client.registry.replicas("resnet50")
    assert (first.ready, second.ready) == (False, True)
    # The failed replica now goes last, so the next request goes straight to r2.
    assert [r.url for r in model_client.registry.candidates("resnet50")][0] == R2


@responses.activate
def test_all_replicas_down_is_503(model_client: ModelClient) -> None:
    responses.post(f"{R1}/v1/predict", body=requests.ConnectionError("refused"))
    responses.post(f"{R2}/v1/predict", body=requests.ConnectionError("refused"))
    with pytest.raises(ModelUnavailable) as info:
        model_client.predict("resnet50", [b"a"], top_k=1)
    assert info.value.status == 503 and info.value.retry_after


@responses.activate
def test_not_ready_replica_is_skipped(model_client: ModelClient) -> None:
    responses.post(f"{R1}/v1/predict", status=503, json={"error": {"code": "model_not_ready"}})
    responses.post(f"{R2}/v1/predict", status=503, json={"error": {"code": "model_not_ready"}})
    with pytest.raises(ModelUnavailable, match="not ready"):
        model_client.predict("resnet50", [b"a"], top_k=1)
    assert len(responses.calls) == 2


@responses.activate
def test_read_timeout_is_504_and_not_retried(model_client: ModelClient) -> None:
    responses.post(f"{R1}/v1/predict", body=requests.ReadTimeout("slow"))
    responses.post(f"{R2}/v1/predict", json=reply())
    with pytest.raises(UpstreamTimeout) as info:
        model_client.predict("resnet50", [b"a"], top_k=1)
    assert info.value.status == 504 and len(responses.calls) == 1


@responses.activate
def test_member_client_errors_pass_through(model_client: ModelClient) -> None:
    responses.post(
        f"{R1}/v1/predict", status=400, json={"error": {"code": "too_many_images", "message": "33 images"}}
    )
    with pytest.raises(ServiceError) as info:
        model_client.predict("resnet50", [b"a"], top_k=1)
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
        (504, "<html><body>504 Gateway Time-out</body></html>"),  # a proxy's, not the member's verdict
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
def test_garbage_replies_are_502(model_client: ModelClient, status: int, body: str) -> None:
    responses.post(f"{R1}/v1/predict", status=status, body=body)
    with pytest.raises(BadUpstreamResponse):
        model_client.predict("resnet50", [b"a"], top_k=1)


@responses.activate
def test_labels_are_fetched_once_and_checked_against_their_hash(model_client: ModelClient) -> None:
    index = load()
    call = responses.get(f"{R1}/v1/labels", json={"labels": index.to_json(), "labels_hash": index.digest})
    assert model_client.labels("resnet50", index.digest) == index
    assert model_client.labels("resnet50", index.digest) == index
    assert call.call_count == 1
    with pytest.raises(ModelUnavailable):
        model_client.labels("resnet50", "some-other-hash")


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

    from common.wire import encode_vector

    vector = np.linspace(0, 1, 1000, dtype=np.float32)
    payload = encode_vector(vector)
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
def test_one_image_travels_as_the_raw_body_and_its_answer_is_read_as_one_result(
    model_client: ModelClient,
) -> None:
    single = {"model": "resnet50", "weights": "random", "predictions": reply()["results"][0]["predictions"]}
    call = responses.post(
        f"{R1}/v1/predict",
        json=single,
        match=[matchers.header_matcher({"Content-Type": "application/octet-stream"})],
    )
    body = model_client.predict("resnet50", [b"jpeg-bytes"], top_k=1)
    assert call.calls[0].request.body == b"jpeg-bytes"
    assert [result.labels for result in body.results] == [labels_from_json(single["predictions"])]


@responses.activate
def test_connection_failures_are_retried_once_after_a_jittered_backoff() -> None:
    model_client = one_replica(connect_retries=1, retry_backoff_s=0.01)
    responses.post(f"{R1}/v1/predict", body=requests.ConnectionError("restarting"))
    responses.post(f"{R1}/v1/predict", json=reply())
    assert model_client.predict("resnet50", [b"a"], top_k=1).results
    assert len(responses.calls) == 2
    responses.post(f"{R1}/v1/predict", body=requests.ConnectionError("down"))
    responses.post(f"{R1}/v1/predict", body=requests.ConnectionError("still down"))
    with pytest.raises(ModelUnavailable):
        model_client.predict("resnet50", [b"a"], top_k=1)
    assert len(responses.calls) == 4  # one retry, capped


@responses.activate
def test_the_remaining_deadline_travels_to_the_member(model_client: ModelClient) -> None:
    import time

    call = responses.post(f"{R1}/v1/predict", json=reply())
    model_client.predict("resnet50", [b"a"], top_k=1, deadline=time.monotonic() + 2.0)
    sent = int(call.calls[0].request.headers["X-Deadline-Ms"])
    assert 1500 < sent <= 2000
    with pytest.raises(DeadlineExceeded):
        model_client.predict("resnet50", [b"a"], top_k=1, deadline=time.monotonic() - 0.1)
    assert call.call_count == 1  # an expired request is not sent at all


@responses.activate
def test_a_failing_replica_opens_its_circuit_and_is_probed_back() -> None:
    clock = Clock()
    model_client = one_replica(connect_retries=0, breaker_fail_max=3, breaker_reset_s=0.5, clock=clock)
    garbage = responses.post(f"{R1}/v1/predict", status=502, body="<html>Bad Gateway</html>")
    for _ in range(3):
        with pytest.raises(BadUpstreamResponse):
            model_client.predict("resnet50", [b"a"], top_k=1)
    with pytest.raises(ModelUnavailable, match="circuit open"):
        model_client.predict("resnet50", [b"a"], top_k=1)  # answered at once, nothing sent
    assert garbage.call_count == 3
    responses.replace(responses.POST, f"{R1}/v1/predict", json=reply())
    clock.now += 0.25
    with pytest.raises(ModelUnavailable, match="circuit open"):
        model_client.predict("resnet50", [b"a"], top_k=1)  # half the reset time: still open
    clock.now += 0.25
    assert model_client.predict("resnet50", [b"a"], top_k=1).results  # the trial call closes the circuit
    assert model_client.predict("resnet50", [b"a"], top_k=1).results


@responses.activate
def test_client_errors_do_not_open_the_circuit(model_client: ModelClient) -> None:
    responses.post(
        f"{R1}/v1/predict", status=400, json={"error": {"code": "too_many_images", "message": "x"}}
    )
    for _ in range(8):
        with pytest.raises(ServiceError):
            model_client.predict("resnet50", [b"a"], top_k=1)
    assert model_client._breaker(R1).state == "closed"


def overloaded_reply() -> dict:
    return {"json": {"error": {"code": "overloaded", "message": "at capacity"}}, "status": 503}


@responses.activate
def test_an_overloaded_replica_passes_the_call_on_and_stays_in_rotation(model_client: ModelClient) -> None:
    busy = responses.post(f"{R1}/v1/predict", **overloaded_reply())
    responses.post(f"{R2}/v1/predict", json=reply())
    for replica in model_client.registry.replicas("resnet50"):
        replica.ready = True
    assert model_client.predict("resnet50", [b"a"], top_k=1).results
    assert busy.call_count == 1  # r1 was asked first and said it was full
    assert all(r.ready for r in model_client.registry.replicas("resnet50"))


@responses.activate
def test_every_replica_overloaded_is_503_at_once_without_retries_or_tripping_the_circuit() -> None:
    session = new_session(4)
    model_client = ModelClient(
        Registry({"resnet50": [R1, R2]}, session), session, connect_retries=3, breaker_fail_max=1
    )
    first = responses.post(f"{R1}/v1/predict", **overloaded_reply())
    second = responses.post(f"{R2}/v1/predict", **overloaded_reply())
    for _ in range(3):
        with pytest.raises(Overloaded) as info:
            model_client.predict("resnet50", [b"a"], top_k=1)
        assert info.value.status == 503 and info.value.retry_after == 1
    assert first.call_count == second.call_count == 3  # one round per request, circuits closed


@responses.activate
def test_an_answer_cut_off_in_transit_moves_to_the_next_replica(model_client: ModelClient) -> None:
    """Not a 500: the prediction is idempotent, so the next replica is asked; none left is a 503."""
    responses.post(f"{R1}/v1/predict", body=requests.exceptions.ChunkedEncodingError("connection broken"))
    responses.post(f"{R2}/v1/predict", json=reply())
    for replica in model_client.registry.replicas("resnet50"):
        replica.ready = True
    assert model_client.predict("resnet50", [b"a"], top_k=1).results
    assert all(r.ready for r in model_client.registry.replicas("resnet50"))  # still in rotation
    responses.replace(responses.POST, f"{R2}/v1/predict", body=requests.exceptions.ChunkedEncodingError("x"))
    with pytest.raises(ModelUnavailable, match="broken response"):
        model_client.predict("resnet50", [b"a"], top_k=1)


@pytest.mark.parametrize("code", ["deadline_exceeded", "inference_timeout"])
@responses.activate
def test_a_members_504_is_deadline_exceeded_never_retried_and_never_a_breaker_failure(code: str) -> None:
    model_client = one_replica(connect_retries=2, breaker_fail_max=1)
    late = responses.post(
        f"{R1}/v1/predict", status=504, json={"error": {"code": code, "message": "the budget ran out"}}
    )
    for _ in range(3):
        with pytest.raises(DeadlineExceeded) as info:
            model_client.predict("resnet50", [b"a"], top_k=1)
        assert (info.value.status, info.value.code) == (504, "deadline_exceeded")
    assert late.call_count == 3  # one call per request, and the circuit (fail_max=1) never opened
    assert model_client._breaker(R1).state == "closed"


SENT_THEN_LOST = {
    "reset": requests.ConnectionError(
        ProtocolError("Connection aborted.", ConnectionResetError(104, "Connection reset by peer"))
    ),
    "closed": requests.ConnectionError(
        ProtocolError("Connection aborted.", RemoteDisconnected("Remote end closed connection"))
    ),
    "cut-off": requests.exceptions.ChunkedEncodingError(ProtocolError("Connection broken: IncompleteRead")),
}
NOTHING_SENT = {
    "connect-timeout": requests.ConnectTimeout("connect timed out"),
    "refused": requests.ConnectionError(
        MaxRetryError(None, "/v1/predict", NewConnectionError(None, "Connection refused"))  # type: ignore[arg-type]
    ),
}


@pytest.mark.parametrize("lost", SENT_THEN_LOST.values(), ids=SENT_THEN_LOST.keys())
@responses.activate
def test_a_reply_lost_after_sending_is_asked_again_elsewhere_and_the_replica_stays_up(
    model_client: ModelClient, lost: Exception
) -> None:
    first = responses.post(f"{R1}/v1/predict", body=lost)
    responses.post(f"{R2}/v1/predict", json=reply())
    for replica in model_client.registry.replicas("resnet50"):
        replica.ready = True
    assert model_client.predict("resnet50", [b"a"], top_k=1).results
    assert first.call_count == 1
    assert all(r.ready for r in model_client.registry.replicas("resnet50"))  # not a connect failure


@responses.activate
def test_the_retry_of_a_lost_reply_goes_out_on_a_new_connection(model_client: ModelClient) -> None:
    """A pooled keep-alive connection to a replica that is shutting down may lose the retry too; a new
    connection to it would be refused unsent, and the next replica asked."""
    responses.post(f"{R1}/v1/predict", body=SENT_THEN_LOST["closed"])
    responses.post(f"{R2}/v1/predict", json=reply())
    for replica in model_client.registry.replicas("resnet50"):
        replica.ready = True
    pooled, sent = model_client.transport.adapter, []
    send = pooled.send

    def counted(request: requests.PreparedRequest, **options: Any) -> requests.Response:
        sent.append(str(request.url).split("?")[0])
        return send(request, **options)

    pooled.send = counted  # type: ignore[method-assign]
    assert model_client.predict("resnet50", [b"a"], top_k=1).results
    assert [call.request.url.split("/v1")[0] for call in responses.calls] == [R1, R2]
    assert sent == [f"{R1}/v1/predict"]  # the retry to R2 did not use the pool


@pytest.mark.parametrize("lost", SENT_THEN_LOST.values(), ids=SENT_THEN_LOST.keys())
@responses.activate
def test_a_lost_reply_is_retried_exactly_once_even_on_the_only_replica(lost: Exception) -> None:
    model_client = one_replica(connect_retries=3, retry_backoff_s=0.001)
    model_client.registry.replicas("resnet50")[0].ready = True
    responses.post(f"{R1}/v1/predict", body=lost)
    responses.post(f"{R1}/v1/predict", json=reply())
    assert model_client.predict("resnet50", [b"a"], top_k=1).results
    assert len(responses.calls) == 2
    responses.replace(responses.POST, f"{R1}/v1/predict", body=lost)
    with pytest.raises(ModelUnavailable, match="broken response"):
        model_client.predict("resnet50", [b"a"], top_k=1)
    assert len(responses.calls) == 4  # one retry, not a round per connect retry
    assert model_client.registry.replicas("resnet50")[0].ready


@pytest.mark.parametrize("refusal", NOTHING_SENT.values(), ids=NOTHING_SENT.keys())
@responses.activate
def test_the_retry_of_a_lost_reply_refused_unsent_goes_on_to_the_next_ready_replica(
    refusal: Exception,
) -> None:
    """Scaling in: the reply is lost on a leaving replica and the retry is refused by another leaving
    one. Nothing reached that one, so the retry is not spent: the replica that stays answers."""
    r3 = "http://r3:8502"
    session = new_session(4)
    model_client = ModelClient(Registry({"resnet50": [R1, R2, r3]}, session), session, connect_retries=0)
    for replica in model_client.registry.replicas("resnet50"):
        replica.ready = True
    lost = responses.post(f"{R1}/v1/predict", body=SENT_THEN_LOST["closed"])
    refused = responses.post(f"{R2}/v1/predict", body=refusal)
    stays = responses.post(f"{r3}/v1/predict", json=reply())
    assert model_client.predict("resnet50", [b"a"], top_k=1).results
    assert (lost.call_count, refused.call_count, stays.call_count) == (1, 1, 1)
    assert [r.ready for r in model_client.registry.replicas("resnet50")] == [True, False, True]
    responses.replace(responses.POST, f"{r3}/v1/predict", body=SENT_THEN_LOST["reset"])
    for replica in model_client.registry.replicas("resnet50"):
        replica.ready = True
    with pytest.raises(ModelUnavailable):  # a second lost reply still ends the call
        model_client.predict("resnet50", [b"a"], top_k=1)


@pytest.mark.parametrize("refusal", NOTHING_SENT.values(), ids=NOTHING_SENT.keys())
@responses.activate
def test_nothing_sent_marks_the_replica_down_and_fails_over(
    model_client: ModelClient, refusal: Exception
) -> None:
    responses.post(f"{R1}/v1/predict", body=refusal)
    responses.post(f"{R2}/v1/predict", json=reply())
    for replica in model_client.registry.replicas("resnet50"):
        replica.ready = True
    assert model_client.predict("resnet50", [b"a"], top_k=1).results
    assert [r.ready for r in model_client.registry.replicas("resnet50")] == [False, True]


@responses.activate
def test_overloaded_neither_counts_against_nor_resets_the_circuit() -> None:
    model_client = one_replica(connect_retries=0, breaker_fail_max=3)
    garbage = {"status": 502, "body": "<html>Bad Gateway</html>"}
    for answer in (garbage, garbage, overloaded_reply(), garbage):
        responses.post(f"{R1}/v1/predict", **answer)
    for expected in (BadUpstreamResponse, BadUpstreamResponse, Overloaded, BadUpstreamResponse):
        with pytest.raises(expected):
            model_client.predict("resnet50", [b"a"], top_k=1)
    with pytest.raises(ModelUnavailable, match="circuit open"):  # three failures in a row, busy aside
        model_client.predict("resnet50", [b"a"], top_k=1)
    assert len(responses.calls) == 4


@responses.activate
def test_an_overloaded_trial_call_leaves_the_next_call_to_be_the_trial() -> None:
    clock = Clock()
    model_client = one_replica(connect_retries=0, breaker_fail_max=1, breaker_reset_s=0.5, clock=clock)
    responses.post(f"{R1}/v1/predict", status=502, body="<html>Bad Gateway</html>")
    responses.post(f"{R1}/v1/predict", **overloaded_reply())
    responses.post(f"{R1}/v1/predict", json=reply())
    with pytest.raises(BadUpstreamResponse):
        model_client.predict("resnet50", [b"a"], top_k=1)
    clock.now += 0.5
    with pytest.raises(Overloaded):
        model_client.predict("resnet50", [b"a"], top_k=1)  # the trial: busy, no verdict
    assert model_client.predict("resnet50", [b"a"], top_k=1).results  # the next trial goes out
    assert model_client._breaker(R1).state == "closed"


@pytest.mark.parametrize(
    ("retry_afters", "expected"),
    [(("7", "3"), 3), (("5", "5"), 5), (("12", None), 1), (("9", "soon"), 1)],
)
@responses.activate
def test_every_replica_overloaded_answers_the_soonest_retry_after_any_gave(
    model_client: ModelClient, retry_afters: tuple[str | None, str | None], expected: int
) -> None:
    for url, retry_after in zip((R1, R2), retry_afters, strict=True):
        headers = {"Retry-After": retry_after} if retry_after else {}
        responses.post(f"{url}/v1/predict", headers=headers, **overloaded_reply())
    with pytest.raises(Overloaded) as info:
        model_client.predict("resnet50", [b"a"], top_k=1)
    assert info.value.retry_after == expected


def test_the_connection_pool_holds_every_member_call_of_every_request_thread() -> None:
    model_client = build_client(gateway_settings(request_threads=4))  # 3 models
    adapter = model_client.session.get_adapter("http://r1:8502")
    assert adapter.poolmanager.connection_pool_kw["maxsize"] >= 12  # type: ignore[attr-defined]


def sent_images(request: requests.PreparedRequest) -> list[bytes]:
    """The images of one member call: the raw body, or each image of a framed body."""
    assert isinstance(request.body, bytes)
    if "X-Image-Lengths" not in request.headers:
        return [request.body]
    return split_images(request.body, request.headers["X-Image-Lengths"])


def echo_member(bodies: list[int]) -> Callable[[requests.PreparedRequest], tuple[int, dict[str, str], str]]:
    """A member that labels each image with its first byte, answering raw and framed calls."""

    def answer(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        images = sent_images(request)
        bodies.append(len(request.body or b""))
        predictions = [[{"label": image[:1].decode(), "index": 1, "score": 0.5}] for image in images]
        if "X-Image-Lengths" not in request.headers:
            return 200, {}, json.dumps({"weights_hash": "w1", "predictions": predictions[0]})
        results = [{"index": i, "predictions": p} for i, p in enumerate(predictions)]
        return 200, {}, json.dumps({"weights_hash": "w1", "results": results})

    return answer


@responses.activate
def test_a_batch_over_the_members_body_limit_is_split_in_order_and_a_huge_image_answers_413(
    model_client: ModelClient,
) -> None:
    for replica in model_client.registry.replicas("resnet50"):
        replica.ready, replica.metadata = True, {"ready": True, "max_body_bytes": 2000}
    bodies: list[int] = []
    for url in (R1, R2):
        responses.add_callback(responses.POST, f"{url}/v1/predict", callback=echo_member(bodies))
    images = [bytes([ord("A") + i]) * 600 for i in range(6)]
    images.insert(3, b"Z" * 2500)  # alone over the member's limit
    body = model_client.predict("resnet50", images, top_k=1)
    results = body.results
    assert len(results) == 7
    labels = [r.labels[0].label if r.labels else None for r in results]
    assert labels == ["A", "B", "C", None, "D", "E", "F"]
    error = results[3].error
    assert error is not None and (error.code, error.status) == ("image_too_large", 413)
    assert len(bodies) >= 3 and max(bodies) <= 2000  # every call fits, the huge image never left
    assert body.served.weights_hash == "w1"


@responses.activate
def test_a_member_that_states_no_body_limit_is_assumed_to_take_16_mib(model_client: ModelClient) -> None:
    bodies: list[int] = []
    responses.add_callback(responses.POST, f"{R1}/v1/predict", callback=echo_member(bodies))
    responses.add_callback(responses.POST, f"{R2}/v1/predict", callback=echo_member(bodies))
    nine_mib = 9 * 1024 * 1024
    body = model_client.predict("resnet50", [b"A" * nine_mib, b"B" * nine_mib], top_k=1)
    assert [r.labels[0].label for r in body.results if r.labels] == ["A", "B"]
    assert len(bodies) == 2 and max(bodies) <= 16 * 1024 * 1024


@responses.activate
@pytest.mark.parametrize(
    ("priority", "sent"), [(None, None), ("interactive", None), ("background", "background")]
)
def test_only_a_background_call_carries_x_priority(
    model_client: ModelClient, priority: str | None, sent: str | None
) -> None:
    call = responses.post(f"{R1}/v1/predict", json=reply())
    options = {"priority": priority} if priority else {}
    model_client.predict("resnet50", [b"a"], top_k=1, **options)
    assert call.calls[0].request.headers.get("X-Priority") == sent


@responses.activate
def test_member_call_metrics_name_the_base_never_a_custom_model() -> None:
    """A custom model may be private: the gateway's /metrics count its calls under its base."""
    responses.get(
        f"{R1}/v1/model",
        json={
            "name": "resnet50",
            "state": "ready",
            "ready": True,
            "custom_models": [
                {"name": "alices-secret-pets", "version": "1", "base": "resnet50", "state": "ready"}
            ],
        },
    )
    responses.post(f"{R1}/v1/predict", body=requests.ConnectionError("refused"))
    client = one_replica(connect_retries=0)
    client.registry.refresh()
    with pytest.raises(ModelUnavailable):
        client.predict("alices-secret-pets", [b"a"], top_k=1)
    exposed = prometheus_client.generate_latest().decode()
    assert 'imagerec_gateway_member_failures_total{model="resnet50",reason="unreachable"}' in exposed
    assert "alices-secret-pets" not in exposed


def explanation(grid: int = 2, **overrides: object) -> dict:
    return {
        "model": "resnet50",
        "class": {"label": "x", "class_id": "n0", "index": 3, "score": 0.5},
        "grid": grid,
        "drops": [[0.1] * grid for _ in range(grid)],
        "passes": grid * grid + 1,
        **overrides,
    }


@responses.activate
def test_the_client_sends_the_photo_and_parameters_and_checks_the_answer(model_client: ModelClient) -> None:
    call = responses.post(f"{R1}/v1/explain", json=explanation())
    found = model_client.explain("resnet50", b"img", {"grid": "2"}, request_id="rid-9", deadline=float("inf"))
    assert found["grid"] == 2
    sent = call.calls[0].request
    assert sent.body == b"img" and "grid=2" in sent.url and sent.headers["X-Request-ID"] == "rid-9"
    for bad in (
        explanation(drops=[[0.1, float("nan")], [0.1, 0.1]]),
        explanation(drops=[[0.1]]),
        explanation(passes="5"),
        {"error": "nope"},
    ):
        responses.replace(responses.POST, f"{R1}/v1/explain", json=bad)
        with pytest.raises(BadUpstreamResponse):
            model_client.explain("resnet50", b"img", {}, deadline=float("inf"))
    responses.replace(
        responses.POST,
        f"{R1}/v1/explain",
        status=400,
        json={"error": {"code": "unknown_class", "message": "no"}},
    )
    with pytest.raises(ServiceError) as refused:
        model_client.explain("resnet50", b"img", {"class_id": "n9"}, deadline=float("inf"))
    assert refused.value.code == "unknown_class" and refused.value.status == 400


@responses.activate
def test_the_explanation_fails_over_like_a_prediction(model_client: ModelClient) -> None:
    responses.post(f"{R1}/v1/explain", body=requests.ConnectionError("refused"))
    responses.post("http://r2:8502/v1/explain", json=explanation(3))
    for replica in model_client.registry.replicas("resnet50"):
        replica.ready = True
    assert model_client.explain("resnet50", b"img", {}, deadline=float("inf"))["grid"] == 3
