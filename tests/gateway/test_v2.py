"""The Open Inference Protocol v2 routes of the gateway, against a fake model client."""

from __future__ import annotations

import base64

import pytest
from flask.testing import FlaskClient

from gateway.app import create_app
from tests.conftest import gateway_settings, photo
from tests.gateway.fakes import FakeModelClient

CAT, COFFEE = photo("chelsea.jpg"), photo("coffee.jpg")


@pytest.fixture
def fake() -> FakeModelClient:
    return FakeModelClient(gateway_settings())


@pytest.fixture
def client(fake: FakeModelClient) -> FlaskClient:
    return create_app(gateway_settings(), client=fake, poll_health=False).test_client()  # type: ignore[arg-type]


def make_ready(fake: FakeModelClient) -> None:
    for name in fake.registry.models:
        for replica in fake.registry.replicas(name):
            replica.ready = True
            replica.metadata = {"ready": True, "backend": "openvino-fp32", "weights": "random"}


def tensor(*images: bytes, **overrides: object) -> dict:
    data = [base64.b64encode(image).decode() for image in images]
    return {"name": "image", "datatype": "BYTES", "shape": [len(data)], "data": data, **overrides}


def assert_v2_error(response, status: int, code: str) -> None:  # type: ignore[no-untyped-def]
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert isinstance(body["error"], str) and body["error"]  # the protocol's shape
    assert body["code"] == code and body["request_id"] == response.headers["X-Request-ID"]


def test_health_and_readiness_follow_the_protocol(client: FlaskClient, fake: FakeModelClient) -> None:
    assert client.get("/v2/health/live").get_json() == {"live": True}
    assert_v2_error(client.get("/v2/health/ready"), 503, "model_unavailable")
    assert_v2_error(client.get("/v2/models/resnet50/ready"), 503, "model_unavailable")
    make_ready(fake)
    assert client.get("/v2/health/ready").get_json() == {"ready": True}
    assert client.get("/v2/models/resnet50/ready").get_json() == {"name": "resnet50", "ready": True}
    assert client.get("/v2/models/ensemble/ready").status_code == 200
    assert client.get("/v2").get_json()["name"] == "imagerec"


def test_model_metadata(client: FlaskClient, fake: FakeModelClient) -> None:
    make_ready(fake)
    meta = client.get("/v2/models/resnet50").get_json()
    assert meta["name"] == "resnet50" and meta["versions"] == ["1"]
    assert meta["platform"] == "imagerec-openvino-fp32"
    assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert [o["name"] for o in meta["outputs"]] == ["labels", "scores", "indices"]
    ensemble = client.get("/v2/models/ensemble").get_json()
    assert ensemble["parameters"]["members"] == ["vgg16", "resnet50", "inceptionv3"]
    assert_v2_error(client.get("/v2/models/alexnet"), 404, "unknown_model")


def test_infer_answers_as_v1_does(client: FlaskClient) -> None:
    response = client.post(
        "/v2/models/resnet50/infer",
        json={"id": "req-7", "inputs": [tensor(CAT, COFFEE)], "parameters": {"top_k": 3}},
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert body["model_name"] == "resnet50" and body["model_version"] == "1" and body["id"] == "req-7"
    outputs = {o["name"]: o for o in body["outputs"]}
    assert {n: (o["datatype"], o["shape"]) for n, o in outputs.items()} == {
        "labels": ("BYTES", [2, 3]),
        "scores": ("FP32", [2, 3]),
        "indices": ("INT64", [2, 3]),
    }
    v1 = client.post("/v1/predict?model=resnet50&top_k=3", data=COFFEE, content_type="image/jpeg").get_json()
    assert outputs["labels"]["data"][3:] == [p["label"] for p in v1["predictions"]]
    assert outputs["scores"]["data"][3:] == [p["score"] for p in v1["predictions"]]
    assert body["parameters"]["weights"] == {"resnet50": "random"}


def test_infer_on_an_ensemble_with_a_subset_of_outputs(client: FlaskClient) -> None:
    body = client.post(
        "/v2/models/ensemble/infer",
        json={
            "inputs": [tensor(CAT, shape=[1])],
            "parameters": {"vote": "hard"},
            "outputs": [{"name": "labels"}],
        },
    ).get_json()
    assert [o["name"] for o in body["outputs"]] == ["labels"] and body["outputs"][0]["shape"] == [1, 5]
    assert body["parameters"]["degraded"] is False and len(body["parameters"]["weights"]) == 3


@pytest.mark.parametrize(
    ("payload", "status", "code"),
    [
        (b"not json", 400, "invalid_json"),
        ({"inputs": []}, 400, "bad_request"),
        ({"inputs": [tensor(CAT, datatype="FP32")]}, 400, "bad_request"),
        ({"inputs": [tensor(CAT, shape=[2])]}, 400, "bad_request"),
        (
            {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["%%%"]}]},
            400,
            "invalid_base64",
        ),
        ({"inputs": [tensor(b"plain text, not an image")]}, 415, "unsupported_media_type"),
        ({"inputs": [tensor(CAT)], "parameters": {"top_k": 0}}, 400, "bad_request"),
        ({"inputs": [tensor(CAT)], "parameters": {"top_k": True}}, 400, "bad_request"),
        ({"inputs": [tensor(CAT)], "outputs": [{"name": "logits"}]}, 400, "bad_request"),
        ({"inputs": [tensor(*[CAT] * 33)]}, 400, "too_many_images"),
    ],
)
def test_bad_infer_requests_get_protocol_errors(
    client: FlaskClient, fake: FakeModelClient, payload: object, status: int, code: str
) -> None:
    kwargs = (
        {"data": payload, "content_type": "application/json"}
        if isinstance(payload, bytes)
        else {"json": payload}
    )
    assert_v2_error(client.post("/v2/models/resnet50/infer", **kwargs), status, code)
    assert fake.calls == []  # refused before any model was asked


def test_versions_come_from_the_model_repository(client: FlaskClient, fake: FakeModelClient) -> None:
    make_ready(fake)
    for replica in fake.registry.replicas("resnet50"):
        replica.metadata["versions"] = ["1", "2"]
    assert client.get("/v2/models/resnet50").get_json()["versions"] == ["1", "2"]
    answer = fake.predict

    def versioned(*args: object, **kwargs: object) -> dict:
        return {**answer(*args, **kwargs), "version": "2"}  # type: ignore[arg-type]

    fake.predict = versioned  # type: ignore[method-assign]
    body = client.post("/v2/models/resnet50/infer", json={"inputs": [tensor(CAT)]}).get_json()
    assert body["model_version"] == "2"
