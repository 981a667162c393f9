"""The gateway's routes with a fake model gateway: inputs, routing, ensembles, batches, seed routes."""

from __future__ import annotations

import base64
import io
import json
import threading
from datetime import datetime

import numpy as np
import pytest
import responses
from flask.testing import FlaskClient
from PIL import Image

from common.errors import ModelUnavailable, UpstreamTimeout
from fleet.answers import MemberReply
from fleet.client import ModelClient, new_session
from fleet.registry import Registry
from gateway.app import create_app
from tests.gateway.fakes import FakeModelClient, StubFetcher, fake_vector
from tests.helpers import ADMIN_KEY, assert_error, bearer, encode, gateway_settings, photo

CAT = photo("chelsea.jpg")
COFFEE = photo("coffee.jpg")


def top(model: str, data: bytes, k: int = 5) -> list[int]:
    return list(np.argsort(-fake_vector(model, data), kind="stable")[:k])


def indices(predictions: list[dict]) -> list[int]:
    return [p["index"] for p in predictions]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize(
    "send",
    [
        lambda c: c.post("/v1/predict?model=resnet50", data={"file": (io.BytesIO(CAT), "cat.jpg")}),
        lambda c: c.post("/v1/predict?model=resnet50", json={"image": b64(CAT)}),
        lambda c: c.post("/v1/predict?model=resnet50", json={"image": "data:image/jpeg;base64," + b64(CAT)}),
        lambda c: c.post("/v1/predict?model=resnet50", data={"image": b64(CAT)}),
        lambda c: c.post("/v1/predict?model=resnet50", data=CAT, content_type="image/jpeg"),
        lambda c: c.post(
            "/v1/predict?model=resnet50",
            json={"image": "\n".join(b64(CAT)[i : i + 76] for i in range(0, len(b64(CAT)), 76))},
        ),
    ],
    ids=["multipart", "json-base64", "json-data-uri", "form-base64", "raw-body", "json-base64-wrapped"],
)
def test_every_input_kind_reaches_the_model_unchanged(gateway: FlaskClient, send) -> None:
    response = send(gateway)
    body = response.get_json()
    assert response.status_code == 200, body
    assert body["model"] == "resnet50" and body["weights"] == "random"
    assert indices(body["predictions"]) == top("resnet50", CAT)
    assert set(body["timing_ms"]) >= {"ingest", "decode", "inference", "total"}
    assert list(body)[-1] == "timing_ms"


def test_url_input_is_fetched(gateway: FlaskClient, stub_fetcher: StubFetcher) -> None:
    body = gateway.post("/v1/predict?model=vgg16", json={"url": "https://example.com/c.jpg"}).get_json()
    assert stub_fetcher.urls == ["https://example.com/c.jpg"]
    assert indices(body["predictions"]) == top("vgg16", COFFEE)


def test_large_base64_form_field_is_accepted(gateway: FlaskClient) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), "PNG")
    assert len(b64(data)) > 500_000  # over Werkzeug's default form-field limit
    response = gateway.post("/v1/predict?model=resnet50", data={"image": b64(data)})
    assert response.status_code == 200, response.get_json()


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"json": []}, 400, "bad_request"),
        ({"json": "x"}, 400, "bad_request"),
        ({"json": None, "data": "null", "content_type": "application/json"}, 400, "bad_request"),
        ({"data": "1", "content_type": "application/json"}, 400, "bad_request"),
        ({"data": "[" * 100_000, "content_type": "application/json"}, 400, "invalid_json"),
        ({"data": "{not json", "content_type": "application/json"}, 400, "invalid_json"),
        ({"json": {"picture": "x"}}, 400, "bad_request"),
        ({"json": {"image": 5}}, 400, "bad_request"),
        ({"json": {"image": "@@@not-base64@@@"}}, 400, "invalid_base64"),
        ({"json": {"image": "QUJD="}}, 400, "invalid_base64"),
        ({"json": {"image": "data:image/png,rawdata"}}, 400, "bad_request"),
        ({"json": {"image": b64(b"just some text")}}, 415, "unsupported_media_type"),
        ({"data": b"GIF89a-truncated", "content_type": "image/gif"}, 415, "unsupported_media_type"),
        ({"data": b"", "content_type": "image/jpeg"}, 400, "invalid_image"),
        ({"data": "hello", "content_type": "text/plain"}, 415, "unsupported_media_type"),
        ({}, 400, "bad_request"),
        ({"data": {"nothing": "here"}, "content_type": "multipart/form-data"}, 400, "bad_request"),
        ({"data": {"file": (io.BytesIO(b"%PDF-1.4"), "\u6587\u4ef6.pdf")}}, 415, "unsupported_media_type"),
    ],
)
def test_bad_inputs_get_a_json_error_and_never_reach_a_model(
    gateway: FlaskClient, fake: FakeModelClient, kwargs: dict, status: int, code: str
) -> None:
    assert_error(gateway.post("/v1/predict?model=resnet50", **kwargs), status, code)
    assert fake.calls == []


def test_model_selection_errors(gateway: FlaskClient) -> None:
    assert_error(gateway.post("/v1/predict", data=CAT, content_type="image/jpeg"), 400, "bad_request")
    response = gateway.post("/v1/predict?model=alexnet", data=CAT, content_type="image/jpeg")
    assert_error(response, 404, "unknown_model")
    assert all(name in response.get_json()["error"]["message"] for name in ("vgg16", "resnet50", "ensemble"))
    assert_error(
        gateway.post("/v1/predict?models=vgg16,alexnet", data=CAT, content_type="image/jpeg"),
        404,
        "unknown_model",
    )
    assert_error(
        gateway.post("/v1/predict?model=ensemble&vote=plurality", data=CAT, content_type="image/jpeg"),
        400,
        "bad_request",
    )
    assert_error(
        gateway.post(
            "/v1/predict?model=ensemble&member_weights=vgg16:2", data=CAT, content_type="image/jpeg"
        ),
        400,
        "bad_request",
    )
    assert_error(
        gateway.post("/v1/predict?model=resnet50&top_k=0", data=CAT, content_type="image/jpeg"),
        400,
        "bad_request",
    )


def test_soft_ensemble_merges_every_member(gateway: FlaskClient, fake: FakeModelClient) -> None:
    body = gateway.post("/v1/predict?model=ensemble&top_k=3", data=CAT, content_type="image/jpeg").get_json()
    members = ["vgg16", "resnet50", "inceptionv3"]
    assert body["members"] == members and body["vote"] == "soft" and body["degraded"] is False
    assert body["weights"] == dict.fromkeys(members, "random")
    mean = np.mean([fake_vector(m, CAT) for m in members], axis=0)
    assert indices(body["predictions"]) == list(np.argsort(-mean, kind="stable")[:3])
    assert body["predictions"][0]["score"] == pytest.approx(float(mean.max()), rel=1e-6)
    assert {m: indices(p) for m, p in body["member_predictions"].items()} == {
        m: top(m, CAT, 3) for m in members
    }
    assert sorted(call[0] for call in fake.calls) == sorted(members)
    assert all(call[2] for call in fake.calls)  # probabilities were requested


def test_weighted_and_hard_votes_on_a_subset(gateway: FlaskClient) -> None:
    url = "/v1/predict?models=vgg16,resnet50&vote=weighted&member_weights=resnet50:3"
    body = gateway.post(url, data=CAT, content_type="image/jpeg").get_json()
    merged = (fake_vector("vgg16", CAT) + 3 * fake_vector("resnet50", CAT)) / 4
    assert body["members"] == ["vgg16", "resnet50"]
    assert body["member_weights"] == {"vgg16": 1.0, "resnet50": 3.0}
    assert indices(body["predictions"]) == list(np.argsort(-merged, kind="stable")[:5])
    hard = gateway.post(
        "/v1/predict?model=ensemble&vote=hard", data=CAT, content_type="image/jpeg"
    ).get_json()
    winners = {int(fake_vector(m, CAT).argmax()) for m in ("vgg16", "resnet50", "inceptionv3")}
    assert hard["predictions"][0]["index"] in winners and hard["predictions"][0]["votes"] >= 1


def test_ensemble_degrades_when_a_member_fails(gateway: FlaskClient, fake: FakeModelClient) -> None:
    fake.failures["vgg16"] = ModelUnavailable("vgg16 is unavailable: connection refused")
    response = gateway.post("/v1/predict?model=ensemble", data=CAT, content_type="image/jpeg")
    body = response.get_json()
    assert response.status_code == 200
    assert body["degraded"] is True
    assert body["failed_members"] == [
        {"model": "vgg16", "code": "model_unavailable", "reason": "vgg16 is unavailable: connection refused"}
    ]
    assert set(body["member_predictions"]) == {"resnet50", "inceptionv3"}
    assert body["weights"]["vgg16"] is None


def test_ensemble_below_quorum_is_503(gateway: FlaskClient, fake: FakeModelClient) -> None:
    fake.failures["vgg16"] = ModelUnavailable("down")
    fake.failures["inceptionv3"] = UpstreamTimeout("slow")
    response = gateway.post("/v1/predict?model=ensemble", data=CAT, content_type="image/jpeg")
    assert_error(response, 503, "ensemble_quorum_not_met")
    assert response.headers["Retry-After"]


def test_single_model_failure_is_passed_on(gateway: FlaskClient, fake: FakeModelClient) -> None:
    fake.failures["resnet50"] = ModelUnavailable("resnet50 is unavailable")
    response = gateway.post("/v1/predict?model=resnet50", data=CAT, content_type="image/jpeg")
    assert_error(response, 503, "model_unavailable")
    assert response.headers["Retry-After"]


def test_batch_keeps_order_and_one_bad_image_spares_the_rest(
    gateway: FlaskClient, fake: FakeModelClient
) -> None:
    files = [
        (io.BytesIO(CAT), "cat.jpg"),
        (io.BytesIO(b"not an image"), "bad.txt"),
        (io.BytesIO(COFFEE), "c.jpg"),
    ]
    body = gateway.post("/v1/predict?model=inceptionv3", data={"files": files}).get_json()
    results = body["results"]
    assert [r["name"] for r in results] == ["cat.jpg", "bad.txt", "c.jpg"]
    assert indices(results[0]["predictions"]) == top("inceptionv3", CAT)
    assert results[1]["error"]["code"] == "unsupported_media_type" and "predictions" not in results[1]
    assert indices(results[2]["predictions"]) == top("inceptionv3", COFFEE)
    assert fake.calls == [("inceptionv3", 2, False)]  # the bad image never left the gateway


def test_json_batch_mixes_base64_and_urls(gateway: FlaskClient, stub_fetcher: StubFetcher) -> None:
    images = [b64(CAT), {"url": "https://example.com/c.jpg"}, "!!!", {"image": b64(COFFEE)}]
    body = gateway.post("/v1/predict?model=ensemble&top_k=1", json={"images": images}).get_json()
    results = body["results"]
    assert [("error" in r) for r in results] == [False, False, True, False]
    assert results[2]["error"]["code"] == "invalid_base64"
    assert set(results[0]["member_predictions"]) == {"vgg16", "resnet50", "inceptionv3"}


def test_batch_of_only_bad_images_answers_each_error(gateway: FlaskClient, fake: FakeModelClient) -> None:
    response = gateway.post("/v1/predict?model=ensemble", json={"images": ["!!!", b64(b"text")]})
    assert response.status_code == 200, response.get_json()
    codes = [r["error"]["code"] for r in response.get_json()["results"]]
    assert codes == ["invalid_base64", "unsupported_media_type"]
    assert fake.calls == []


def test_batch_cap_is_checked_before_reading_any_image(gateway: FlaskClient, fake: FakeModelClient) -> None:
    files = [(io.BytesIO(CAT), f"{i}.jpg") for i in range(5)]
    assert_error(gateway.post("/v1/predict?model=vgg16", data={"files": files}), 400, "too_many_images")
    assert_error(gateway.post("/v1/predict?model=vgg16", json={"images": ["x"] * 5}), 400, "too_many_images")
    assert fake.calls == []


def test_seed_routes_keep_their_shape(gateway: FlaskClient) -> None:
    body = gateway.post("/predict", data={"file": (io.BytesIO(CAT), "cat.jpg")}).get_json()
    assert list(body) == ["predictions"] and len(body["predictions"]) == 3
    assert set(body["predictions"][0]) == {"label", "prob"}
    for prefix in ("", "data:image/jpeg;base64,"):
        again = gateway.post("/predict", data={"image": prefix + b64(CAT)}).get_json()
        assert again == body
    files = [(io.BytesIO(CAT), "a.jpg"), (io.BytesIO(b"zzz"), "b.jpg")]
    batch = gateway.post("/batch_predict", data={"files": files}).get_json()
    assert batch["results"][0] == {"filename": "a.jpg", "predictions": body["predictions"]}
    assert batch["results"][1]["filename"] == "b.jpg" and "error" in batch["results"][1]


def test_models_listing(gateway: FlaskClient) -> None:
    body = gateway.get("/v1/models").get_json()
    assert [m["name"] for m in body["models"]] == ["vgg16", "resnet50", "inceptionv3"]
    resnet = body["models"][1]
    assert len(resnet["replicas"]) == 2 and all("url" not in r for r in resnet["replicas"])  # admin's alone
    assert body["ensemble"]["members"] == ["vgg16", "resnet50", "inceptionv3"]
    admin = gateway.get("/v1/models", headers=bearer(ADMIN_KEY)).get_json()["models"][1]
    assert [r["url"] for r in admin["replicas"]] == ["http://r1:8502", "http://r2:8502"]


def test_health(gateway: FlaskClient) -> None:
    assert gateway.get("/health/live").status_code == 200
    assert gateway.get("/health/ready").status_code == 200
    assert_error(gateway.get("/nowhere"), 404, "not_found")
    assert_error(gateway.get("/v1/predict"), 405, "method_not_allowed")


def test_body_cap_is_413_json(fake: FakeModelClient) -> None:
    app = create_app(gateway_settings(max_body_bytes=1000), client=fake, poll_health=False)  # type: ignore[arg-type]
    response = app.test_client().post("/v1/predict?model=vgg16", data=CAT, content_type="image/jpeg")
    assert_error(response, 413, "request_entity_too_large")
    assert json.loads(response.get_data())["error"]["message"]


def test_ensembles_send_members_one_small_canonical_copy_of_a_large_photo(fake: FakeModelClient) -> None:
    for name, size in (("vgg16", 224), ("resnet50", 224), ("inceptionv3", 299)):
        for replica in fake.registry.replicas(name):
            replica.ready, replica.metadata = True, {"ready": True, "input_size": size, "center_crop": 0.875}
    app = create_app(gateway_settings(), client=fake, poll_health=False)  # type: ignore[arg-type]
    big = encode(
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (1500, 2000, 3), dtype=np.uint8)),
        "JPEG",
        quality=90,
    )
    seen: list[bytes] = []
    original_predict = fake.predict

    def recording_predict(model: str, images: list[bytes], **kwargs):  # type: ignore[no-untyped-def]
        seen.extend(images)
        return original_predict(model, images, **kwargs)

    fake.predict = recording_predict  # type: ignore[method-assign]
    gateway = app.test_client()
    assert gateway.post("/v1/predict?model=ensemble", data=big, content_type="image/jpeg").status_code == 200
    assert len(seen) == 3 and len(set(seen)) == 1  # one canonical copy for every member
    canonical = Image.open(io.BytesIO(seen[0]))
    assert canonical.format == "PNG" and min(canonical.size) == 342  # 299 / 0.875, rounded up
    seen.clear()
    assert gateway.post("/v1/predict?model=resnet50", data=big, content_type="image/jpeg").status_code == 200
    assert seen == [big]  # a single model decodes the original itself


def test_client_deadline_reaches_the_members_and_is_validated(
    gateway: FlaskClient, fake: FakeModelClient
) -> None:
    import time

    before = time.monotonic()
    assert (
        gateway.post(
            "/v1/predict?model=resnet50&timeout_ms=1500", data=CAT, content_type="image/jpeg"
        ).status_code
        == 200
    )
    assert before + 1.0 < fake.deadlines[-1] <= time.monotonic() + 1.5
    gateway.post(
        "/v1/predict?model=resnet50", data=CAT, content_type="image/jpeg", headers={"X-Deadline-Ms": "800"}
    )
    assert fake.deadlines[-1] <= time.monotonic() + 0.8
    before = time.monotonic()
    gateway.post("/v1/predict?model=resnet50", data=CAT, content_type="image/jpeg")
    # no budget given: the default deadline (30 s) applies, counted from the request's arrival
    assert before + 29 < fake.deadlines[-1] <= time.monotonic() + 30
    arrived = time.time() - 10  # Nginx saw it 10 s ago: that wait counts against the deadline
    gateway.post(
        "/v1/predict?model=resnet50",
        data=CAT,
        content_type="image/jpeg",
        headers={"X-Request-Start": f"t={arrived:.3f}"},
    )
    assert fake.deadlines[-1] <= time.monotonic() + 20.1
    assert_error(
        gateway.post("/v1/predict?model=resnet50&timeout_ms=later", data=CAT, content_type="image/jpeg"),
        400,
        "bad_request",
    )


def test_per_client_rate_limit_is_a_json_429_with_retry_after(fake: FakeModelClient) -> None:
    app = create_app(gateway_settings(rate_limit="3/minute"), client=fake, poll_health=False)  # type: ignore[arg-type]
    gateway = app.test_client()
    alice, bob = {"X-Real-IP": "203.0.113.7"}, {"X-Real-IP": "203.0.113.8"}
    for _ in range(3):
        assert (
            gateway.post(
                "/v1/predict?model=vgg16", data=CAT, content_type="image/jpeg", headers=alice
            ).status_code
            == 200
        )
    response = gateway.post("/v1/predict?model=vgg16", data=CAT, content_type="image/jpeg", headers=alice)
    assert_error(response, 429, "too_many_requests")
    assert int(response.headers["Retry-After"]) > 0
    assert (
        gateway.post("/v1/predict?model=vgg16", data=CAT, content_type="image/jpeg", headers=bob).status_code
        == 200
    )
    assert gateway.get("/v1/models", headers=alice).status_code == 200  # metadata and health are not limited
    assert gateway.get("/health/ready", headers=alice).status_code == 200


def test_concurrent_ensembles_never_queue_a_member_call_behind_another() -> None:
    """Four request threads x three members: all twelve member calls are in flight at once."""
    settings = gateway_settings(request_threads=4)
    fake = FakeModelClient(settings)
    every_member_of_every_request = threading.Barrier(12, timeout=10)
    answer = fake.predict

    def slow_member(model: str, images: list[bytes], **kwargs):  # type: ignore[no-untyped-def]
        every_member_of_every_request.wait()  # breaks if any member call waits for a pool thread
        return answer(model, images, **kwargs)

    fake.predict = slow_member  # type: ignore[method-assign]
    app = create_app(settings, client=fake, poll_health=False)  # type: ignore[arg-type]
    statuses: list[int] = []

    def ensemble() -> None:
        response = app.test_client().post("/v1/predict?model=ensemble", data=CAT, content_type="image/jpeg")
        statuses.append(response.status_code)

    threads = [threading.Thread(target=ensemble) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert statuses == [200] * 4 and not every_member_of_every_request.broken


@responses.activate
def test_models_listing_answers_from_the_last_probes_without_calling_any_replica() -> None:
    settings = gateway_settings()
    session = new_session(2)
    registry = Registry(settings.replicas, session)
    probe = responses.get("http://r1:8502/v1/model", json={"ready": True, "weights": "random"})
    registry.refresh()  # what the poller did last; unregistered replicas refuse
    probed = len(responses.calls)
    app = create_app(settings, client=ModelClient(registry, session), poll_health=False)
    body = app.test_client().get("/v1/models").get_json()
    assert len(responses.calls) == probed and probe.call_count == 1
    resnet = body["models"][1]
    assert resnet["status"] == "ready" and resnet["weights"] == "random"
    assert [r["ready"] for r in resnet["replicas"]] == [True, False]
    assert all(datetime.fromisoformat(r["checked_at"]) for r in resnet["replicas"])


def test_an_ensemble_whose_members_answered_only_item_errors_passes_the_error_on(
    gateway: FlaskClient, fake: FakeModelClient
) -> None:
    """E.g. an image over every member's body limit: no member predicted, so there is nothing to vote on."""

    def too_large(model: str, images: list[bytes], **kwargs):  # type: ignore[no-untyped-def]
        error = {"code": "image_too_large", "message": "over the member's limit", "status": 413}
        return MemberReply.from_json(
            {"model": model, "results": [{"index": i, "error": error} for i in range(len(images))]}
        )

    fake.predict = too_large  # type: ignore[method-assign]
    response = gateway.post("/v1/predict?model=ensemble", data=CAT, content_type="image/jpeg")
    assert_error(response, 413, "image_too_large")
