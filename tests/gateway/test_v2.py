"""The Open Inference Protocol v2 routes of the gateway, against a fake model gateway."""

from __future__ import annotations

import base64
import json
import re
import struct
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from flask.testing import FlaskClient

from fleet.answers import MemberReply
from gateway import docs
from gateway.app import create_app
from tests.gateway.fakes import FakeModelClient
from tests.helpers import assert_error, gateway_settings, photo

CAT, COFFEE = photo("chelsea.jpg"), photo("coffee.jpg")


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


def test_server_readiness_never_names_a_custom_model(gateway: FlaskClient, fake: FakeModelClient) -> None:
    """Anonymous callers may ask: a private custom model whose base is down stays unnamed."""
    make_ready(fake)
    for replica in fake.registry.replicas("resnet50"):
        replica.ready = False
        replica.metadata = {"custom_models": [{"name": "alices-secret", "version": "1", "state": "ready"}]}
    fake.registry._custom = fake.registry._find_custom()  # what the next round of probes would find
    assert "alices-secret" in fake.registry.models
    answer = gateway.get("/v2/health/ready")
    assert_v2_error(answer, 503, "model_unavailable")
    assert answer.get_json()["error"] == "not ready: resnet50"


def test_health_and_readiness_follow_the_protocol(gateway: FlaskClient, fake: FakeModelClient) -> None:
    assert gateway.get("/v2/health/live").get_json() == {"live": True}
    assert_v2_error(gateway.get("/v2/health/ready"), 503, "model_unavailable")
    assert_v2_error(gateway.get("/v2/models/resnet50/ready"), 503, "model_unavailable")
    make_ready(fake)
    assert gateway.get("/v2/health/ready").get_json() == {"ready": True}
    assert gateway.get("/v2/models/resnet50/ready").get_json() == {"name": "resnet50", "ready": True}
    assert gateway.get("/v2/models/ensemble/ready").status_code == 200
    assert gateway.get("/v2").get_json()["name"] == "imagerec"


def test_model_metadata(gateway: FlaskClient, fake: FakeModelClient) -> None:
    make_ready(fake)
    meta = gateway.get("/v2/models/resnet50").get_json()
    assert meta["name"] == "resnet50" and meta["versions"] == ["1"]
    assert meta["platform"] == "imagerec-openvino-fp32"
    assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert [o["name"] for o in meta["outputs"]] == ["labels", "scores", "indices"]
    ensemble = gateway.get("/v2/models/ensemble").get_json()
    assert ensemble["parameters"]["members"] == ["vgg16", "resnet50", "inceptionv3"]
    assert_v2_error(gateway.get("/v2/models/alexnet"), 404, "unknown_model")


def test_model_configuration_is_tritons_extension(gateway: FlaskClient, fake: FakeModelClient) -> None:
    """What perf_analyzer reads before it sends a request: the metadata's tensors in Triton's
    configuration types, a whole tensor per request (max_batch_size 0)."""
    make_ready(fake)
    assert gateway.get("/v2/models/resnet50/config").get_json() == {
        "name": "resnet50",
        "platform": "imagerec-openvino-fp32",
        "backend": "imagerec",
        "max_batch_size": 0,
        "input": [{"name": "image", "data_type": "TYPE_STRING", "dims": [-1]}],
        "output": [
            {"name": "labels", "data_type": "TYPE_STRING", "dims": [-1, -1]},
            {"name": "scores", "data_type": "TYPE_FP32", "dims": [-1, -1]},
            {"name": "indices", "data_type": "TYPE_INT64", "dims": [-1, -1]},
        ],
    }
    assert gateway.get("/v2/models/resnet50/versions/1/config").status_code == 200
    assert gateway.get("/v2/models/ensemble/config").get_json()["platform"] == "imagerec-ensemble"
    assert_v2_error(gateway.get("/v2/models/alexnet/config"), 404, "unknown_model")
    assert_v2_error(gateway.get("/v2/models/resnet50/versions/7/config"), 404, "unknown_version")
    assert "model_configuration" in gateway.get("/v2").get_json()["extensions"]


def test_infer_answers_as_v1_does(gateway: FlaskClient) -> None:
    response = gateway.post(
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
    v1 = gateway.post("/v1/predict?model=resnet50&top_k=3", data=COFFEE, content_type="image/jpeg").get_json()
    assert outputs["labels"]["data"][3:] == [p["label"] for p in v1["predictions"]]
    assert outputs["scores"]["data"][3:] == [p["score"] for p in v1["predictions"]]
    assert body["parameters"]["weights"] == {"resnet50": "random"}


def test_infer_on_an_ensemble_with_a_subset_of_outputs(gateway: FlaskClient) -> None:
    body = gateway.post(
        "/v2/models/ensemble/infer",
        json={
            "inputs": [tensor(CAT, shape=[1])],
            "parameters": {"vote": "hard"},
            "outputs": [{"name": "labels"}],
        },
    ).get_json()
    assert [o["name"] for o in body["outputs"]] == ["labels"] and body["outputs"][0]["shape"] == [1, 5]
    assert body["parameters"]["degraded"] is False and len(body["parameters"]["weights"]) == 3


BAD_INFER_REQUESTS = {
    "not JSON": (b"not json", 400, "invalid_json"),
    "body a list": ([tensor(CAT)], 400, "bad_request"),
    "no inputs": ({}, 400, "bad_request"),
    "inputs empty": ({"inputs": []}, 400, "bad_request"),
    "inputs an object": ({"inputs": tensor(CAT)}, 400, "bad_request"),
    "inputs a string": ({"inputs": "x"}, 400, "bad_request"),
    "two tensors": ({"inputs": [tensor(CAT), tensor(CAT)]}, 400, "bad_request"),
    "tensor a string": ({"inputs": ["x"]}, 400, "bad_request"),
    "tensor null": ({"inputs": [None]}, 400, "bad_request"),
    "tensor a number": ({"inputs": [1]}, 400, "bad_request"),
    "tensor a list": ({"inputs": [[tensor(CAT)]]}, 400, "bad_request"),
    **{
        f"tensor without {field}": (
            {"inputs": [{k: v for k, v in tensor(CAT).items() if k != field}]},
            400,
            "bad_request",
        )
        for field in ("name", "datatype", "shape", "data")
    },
    "name not a string": ({"inputs": [tensor(CAT, name=7)]}, 400, "bad_request"),
    "datatype FP32": ({"inputs": [tensor(CAT, datatype="FP32")]}, 400, "bad_request"),
    "datatype not a string": ({"inputs": [tensor(CAT, datatype=["BYTES"])]}, 400, "bad_request"),
    "shape too long": ({"inputs": [tensor(CAT, shape=[2])]}, 400, "bad_request"),
    "shape a number": ({"inputs": [tensor(CAT, shape=1)]}, 400, "bad_request"),
    "shape of strings": ({"inputs": [tensor(CAT, shape=["1"])]}, 400, "bad_request"),
    "shape of booleans": ({"inputs": [tensor(CAT, shape=[True])]}, 400, "bad_request"),
    "shape of floats": ({"inputs": [tensor(CAT, shape=[1.0])]}, 400, "bad_request"),
    "shape negative": ({"inputs": [tensor(CAT, shape=[-1])]}, 400, "bad_request"),
    "data a string": ({"inputs": [tensor(CAT, data="abc")]}, 400, "bad_request"),
    "data of nulls": ({"inputs": [tensor(CAT, data=[None])]}, 400, "bad_request"),
    "data rows too wide": ({"inputs": [tensor(CAT, data=[["a", "b"]], shape=[1, 2])]}, 400, "bad_request"),
    "bad base64": (
        {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["%%%"]}]},
        400,
        "invalid_base64",
    ),
    "not an image": ({"inputs": [tensor(b"plain text, not an image")]}, 415, "unsupported_media_type"),
    "tensor parameters a list": ({"inputs": [tensor(CAT, parameters=[])]}, 400, "bad_request"),
    "parameters a list": ({"inputs": [tensor(CAT)], "parameters": []}, 400, "bad_request"),
    "parameters a string": ({"inputs": [tensor(CAT)], "parameters": "top_k=3"}, 400, "bad_request"),
    "parameter an object": ({"inputs": [tensor(CAT)], "parameters": {"vote": {}}}, 400, "bad_request"),
    "top_k 0": ({"inputs": [tensor(CAT)], "parameters": {"top_k": 0}}, 400, "bad_request"),
    "top_k true": ({"inputs": [tensor(CAT)], "parameters": {"top_k": True}}, 400, "bad_request"),
    "top_k a list": ({"inputs": [tensor(CAT)], "parameters": {"top_k": [3]}}, 400, "bad_request"),
    "outputs a string": ({"inputs": [tensor(CAT)], "outputs": "labels"}, 400, "bad_request"),
    "outputs an object": ({"inputs": [tensor(CAT)], "outputs": {"name": "labels"}}, 400, "bad_request"),
    "output a string": ({"inputs": [tensor(CAT)], "outputs": ["labels"]}, 400, "bad_request"),
    "output null": ({"inputs": [tensor(CAT)], "outputs": [None]}, 400, "bad_request"),
    "output without name": ({"inputs": [tensor(CAT)], "outputs": [{}]}, 400, "bad_request"),
    "output name a number": ({"inputs": [tensor(CAT)], "outputs": [{"name": 5}]}, 400, "bad_request"),
    "output unknown": ({"inputs": [tensor(CAT)], "outputs": [{"name": "logits"}]}, 400, "bad_request"),
    "output parameters a list": (
        {"inputs": [tensor(CAT)], "outputs": [{"name": "labels", "parameters": [1]}]},
        400,
        "bad_request",
    ),
    "id a number": ({"inputs": [tensor(CAT)], "id": 42}, 400, "bad_request"),
    "too many images": ({"inputs": [tensor(*[CAT] * 33)]}, 400, "too_many_images"),
}


@pytest.mark.parametrize(("payload", "status", "code"), BAD_INFER_REQUESTS.values(), ids=BAD_INFER_REQUESTS)
def test_bad_infer_requests_get_protocol_errors(
    gateway: FlaskClient, fake: FakeModelClient, payload: object, status: int, code: str
) -> None:
    kwargs = (
        {"data": payload, "content_type": "application/json"}
        if isinstance(payload, bytes)
        else {"json": payload}
    )
    make_ready(fake)
    for path in ("/v2/models/resnet50/infer", "/v2/models/resnet50/versions/1/infer"):
        assert_v2_error(gateway.post(path, **kwargs), status, code)
    assert fake.calls == []  # refused before any model was asked


def test_optional_fields_may_be_null(gateway: FlaskClient) -> None:
    tensor_with_null = tensor(CAT, parameters=None)
    body = {"id": None, "inputs": [tensor_with_null], "parameters": None, "outputs": None}
    response = gateway.post("/v2/models/resnet50/infer", json=body)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert [o["name"] for o in response.get_json()["outputs"]] == ["labels", "scores", "indices"]


def test_versions_come_from_the_model_repository(gateway: FlaskClient, fake: FakeModelClient) -> None:
    make_ready(fake)
    for replica in fake.registry.replicas("resnet50"):
        replica.metadata["versions"] = ["1", "2"]
    assert gateway.get("/v2/models/resnet50").get_json()["versions"] == ["1", "2"]
    answer = fake.predict

    def versioned(*args: object, **kwargs: object) -> MemberReply:
        reply = answer(*args, **kwargs)  # type: ignore[arg-type]
        return replace(reply, served=replace(reply.served, version="2"))

    fake.predict = versioned  # type: ignore[method-assign]
    body = gateway.post("/v2/models/resnet50/infer", json={"inputs": [tensor(CAT)]}).get_json()
    assert body["model_version"] == "2"


def served(fake: FakeModelClient, model: str, version: str, versions: list[str]) -> None:
    """Every replica of ``model`` serves ``version`` from a repository that has ``versions``."""
    make_ready(fake)
    for replica in fake.registry.replicas(model):
        replica.metadata.update(version=version, versions=versions)
    answer = fake.predict

    def versioned(name: str, *args: object, **kwargs: object) -> MemberReply:
        reply = answer(name, *args, **kwargs)  # type: ignore[arg-type]
        return replace(reply, served=replace(reply.served, version=version)) if name == model else reply

    fake.predict = versioned  # type: ignore[method-assign]


def test_the_served_version_answers_as_the_unversioned_routes_do(
    gateway: FlaskClient, fake: FakeModelClient
) -> None:
    served(fake, "resnet50", "3", ["1", "3"])
    assert (
        gateway.get("/v2/models/resnet50/versions/3").get_json()
        == gateway.get("/v2/models/resnet50").get_json()
    )
    assert gateway.get("/v2/models/resnet50/versions/3/ready").get_json() == {
        "name": "resnet50",
        "ready": True,
    }
    body = gateway.post("/v2/models/resnet50/versions/3/infer", json={"inputs": [tensor(CAT)]}).get_json()
    assert body["model_name"] == "resnet50" and body["model_version"] == "3"
    unversioned = gateway.post("/v2/models/resnet50/infer", json={"inputs": [tensor(CAT)]}).get_json()
    assert body["outputs"] == unversioned["outputs"]


@pytest.mark.parametrize("model", ["vgg16", "ensemble"])
def test_models_without_a_repository_and_the_ensemble_have_version_1(
    gateway: FlaskClient, fake: FakeModelClient, model: str
) -> None:
    make_ready(fake)
    assert gateway.get(f"/v2/models/{model}/versions/1").get_json()["versions"] == ["1"]
    assert gateway.get(f"/v2/models/{model}/versions/1/ready").status_code == 200
    body = gateway.post(f"/v2/models/{model}/versions/1/infer", json={"inputs": [tensor(CAT)]}).get_json()
    assert body["model_version"] == "1"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v2/models/resnet50/versions/1"),
        ("GET", "/v2/models/resnet50/versions/1/ready"),
        ("POST", "/v2/models/resnet50/versions/1/infer"),
    ],
)
def test_a_version_the_model_has_but_the_fleet_does_not_serve_is_not_ready(
    fake: FakeModelClient, method: str, path: str
) -> None:
    served(fake, "resnet50", "3", ["1", "2", "3"])
    gateway = create_app(gateway_settings(rate_limit=""), client=fake, poll_health=False).test_client()  # type: ignore[arg-type]
    response = gateway.open(path, method=method, json={"inputs": [tensor(CAT)]})
    assert_v2_error(response, 503, "version_not_served")
    assert "serves only its newest version, 3" in response.get_json()["error"]
    assert "Retry-After" not in response.headers  # waiting will not bring an old version back
    assert fake.calls == []


@pytest.mark.parametrize(
    "path",
    [
        "/v2/models/resnet50/versions/4",
        "/v2/models/resnet50/versions/4/ready",
        "/v2/models/ensemble/versions/3",
        "/v2/models/vgg16/versions/3/ready",
    ],
)
def test_an_unknown_version_is_a_404(gateway: FlaskClient, fake: FakeModelClient, path: str) -> None:
    served(fake, "resnet50", "3", ["1", "3"])
    assert_v2_error(gateway.get(path), 404, "unknown_version")
    assert_v2_error(
        gateway.post(path.removesuffix("/ready") + "/infer", json={"inputs": [tensor(CAT)]}),
        404,
        "unknown_version",
    )
    assert fake.calls == []


def test_an_unknown_model_with_a_version_is_a_404(gateway: FlaskClient) -> None:
    assert_v2_error(gateway.get("/v2/models/alexnet/versions/1"), 404, "unknown_model")


def test_a_version_cannot_be_checked_while_no_replica_is_ready(gateway: FlaskClient) -> None:
    assert_v2_error(gateway.get("/v2/models/resnet50/versions/1"), 503, "model_unavailable")
    assert_v2_error(gateway.get("/v2/models/resnet50/versions/1/ready"), 503, "model_unavailable")


def test_an_answer_from_another_version_is_not_passed_off_as_the_one_asked_for(
    gateway: FlaskClient, fake: FakeModelClient
) -> None:
    served(fake, "resnet50", "3", ["2", "3"])
    for replica in fake.registry.replicas("resnet50"):  # the probes still say 2; the replica moved on
        replica.metadata.update(version="2")
    response = gateway.post("/v2/models/resnet50/versions/2/infer", json={"inputs": [tensor(CAT)]})
    assert_v2_error(response, 503, "version_not_served")
    assert "version 3" in response.get_json()["error"]


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/v2/nowhere", 404, "not_found"),
        ("GET", "/v2/models/resnet50/versions/3/infer/more", 404, "not_found"),
        ("GET", "/v2/models/resnet50/infer", 405, "method_not_allowed"),
        ("DELETE", "/v2/models/resnet50/versions/3", 405, "method_not_allowed"),
        ("POST", "/v2/health/live", 405, "method_not_allowed"),
    ],
)
def test_routing_errors_under_v2_are_in_the_protocol_shape(
    gateway: FlaskClient, method: str, path: str, status: int, code: str
) -> None:
    assert_v2_error(gateway.open(path, method=method), status, code)


def test_routing_errors_elsewhere_keep_the_fleet_shape(gateway: FlaskClient) -> None:
    assert_error(gateway.get("/v2x"), 404, "not_found")
    assert_error(gateway.get("/v1/nowhere"), 404, "not_found")
    response = gateway.get("/v1/predict")
    assert_error(response, 405, "method_not_allowed")
    assert "POST" in response.headers["Allow"] and "GET" not in response.headers["Allow"]


def test_a_405_under_v2_names_the_allowed_methods(gateway: FlaskClient) -> None:
    allowed = gateway.get("/v2/models/resnet50/infer").headers["Allow"]
    assert "POST" in allowed and "GET" not in allowed


def test_a_body_over_the_limit_is_a_protocol_413(fake: FakeModelClient) -> None:
    make_ready(fake)
    app = create_app(gateway_settings(max_body_bytes=1000), client=fake, poll_health=False)  # type: ignore[arg-type]
    response = app.test_client().post("/v2/models/resnet50/versions/1/infer", json={"inputs": [tensor(CAT)]})
    assert_v2_error(response, 413, "request_entity_too_large")
    assert fake.calls == []


def test_the_rate_limit_answers_a_protocol_429_with_retry_after(fake: FakeModelClient) -> None:
    make_ready(fake)
    app = create_app(gateway_settings(rate_limit="2/minute"), client=fake, poll_health=False)  # type: ignore[arg-type]
    gateway = app.test_client()
    for path in ("/v2/models/resnet50/infer", "/v2/models/resnet50/versions/1/infer"):
        gateway.post(path, json={"inputs": [tensor(CAT)]})  # the versioned route counts too
    response = gateway.post("/v2/models/resnet50/infer", json={"inputs": [tensor(CAT)]})
    assert_v2_error(response, 429, "too_many_requests")
    assert int(response.headers["Retry-After"]) > 0


def test_an_unexpected_failure_is_a_protocol_500_without_internals(
    gateway: FlaskClient, fake: FakeModelClient, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: object, **kwargs: object) -> dict:
        raise RuntimeError("password=hunter2 at /srv/secret.py")

    fake.predict = broken  # type: ignore[method-assign]
    response = gateway.post("/v2/models/resnet50/infer", json={"inputs": [tensor(CAT)]})
    assert_v2_error(response, 500, "internal_error")
    assert "hunter2" not in response.get_data(as_text=True)
    assert any("hunter2" in str(r.exc_info) for r in caplog.records)  # the log has it, with the request id
    assert response.headers["X-Request-ID"] in caplog.text


def test_every_v2_route_is_described_with_its_path_parameters(gateway: FlaskClient) -> None:
    routes = {
        re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        for rule in gateway.application.url_map.iter_rules()
        if rule.rule.startswith("/v2/")
    }
    described = docs.spec()["paths"]
    assert routes <= set(described)
    for path in routes:
        declared = {
            p["name"]
            for operation in described[path].values()
            for p in [resolved(ref) for ref in operation.get("parameters", [])]
        }
        assert declared == set(re.findall(r"{(\w+)}", path)), path


def resolved(node: dict[str, Any]) -> dict[str, Any]:
    """``node``, or what its ``$ref`` points at in the gateway's OpenAPI description."""
    if "$ref" not in node:
        return node
    target: Any = docs.spec()
    for part in node["$ref"].removeprefix("#/").split("/"):
        target = target[part]
    return dict(target)


# --- the binary tensor data extension -----------------------------------------------------------


def binary_request(
    images: list[bytes], outputs: list[dict[str, Any]] | None = None, **request: Any
) -> tuple[bytes, dict[str, str]]:
    """What Triton's clients send with binary_data=True: the JSON header, then each image as a
    4-byte little-endian length and its bytes."""
    blob = b"".join(struct.pack("<I", len(image)) + image for image in images)
    head = {
        "inputs": [
            {
                "name": "image",
                "datatype": "BYTES",
                "shape": [len(images)],
                "parameters": {"binary_data_size": len(blob)},
            }
        ],
        **({"outputs": outputs} if outputs is not None else {}),
        **request,
    }
    encoded = json.dumps(head).encode()
    return encoded + blob, {"Inference-Header-Content-Length": str(len(encoded))}


def split_answer(response: Any) -> tuple[dict[str, Any], dict[str, bytes]]:
    """A binary answer's JSON header and each binary output's bytes, in order."""
    length = int(response.headers["Inference-Header-Content-Length"])
    raw = response.get_data()
    head, blob, found, offset = json.loads(raw[:length]), raw[length:], {}, 0
    for output in head["outputs"]:
        if "parameters" in output:
            size = output["parameters"]["binary_data_size"]
            found[output["name"]] = blob[offset : offset + size]
            offset += size
    assert offset == len(blob)
    return head, found


def test_binary_images_in_and_binary_outputs_back_answer_as_json_does(gateway: FlaskClient) -> None:
    body, headers = binary_request(
        [CAT, COFFEE],
        outputs=[{"name": "labels", "parameters": {"binary_data": True}}, {"name": "scores"}],
        parameters={"top_k": 3},
    )
    binary = gateway.post("/v2/models/resnet50/infer", data=body, headers=headers)
    assert binary.status_code == 200, binary.get_data(as_text=True)
    assert binary.headers["Content-Type"] == "application/octet-stream"
    head, blobs = split_answer(binary)
    as_json = gateway.post(
        "/v2/models/resnet50/infer", json={"inputs": [tensor(CAT, COFFEE)], "parameters": {"top_k": 3}}
    ).get_json()
    expected = {o["name"]: o for o in as_json["outputs"]}
    labels = head["outputs"][0]
    assert labels["shape"] == [2, 3] and "data" not in labels
    labels_back, offset, raw = [], 0, blobs["labels"]
    while offset < len(raw):
        (size,) = struct.unpack_from("<I", raw, offset)
        labels_back.append(raw[offset + 4 : offset + 4 + size].decode())
        offset += 4 + size
    assert labels_back == expected["labels"]["data"]
    assert head["outputs"][1]["data"] == expected["scores"]["data"]  # asked for without binary_data


def test_binary_data_output_makes_every_output_binary(gateway: FlaskClient) -> None:
    body, headers = binary_request([CAT], parameters={"top_k": 2, "binary_data_output": True})
    head, blobs = split_answer(gateway.post("/v2/models/resnet50/infer", data=body, headers=headers))
    assert set(blobs) == {"labels", "scores", "indices"}
    scores, indices = np.frombuffer(blobs["scores"], "<f4"), np.frombuffer(blobs["indices"], "<i8")
    assert scores.shape == indices.shape == (2,) and head["outputs"][2]["shape"] == [1, 2]


BAD_BINARY = {
    "header length not a number": (lambda b, h: (b, {**h, "Inference-Header-Content-Length": "ten"})),
    # digits to str.isdigit, not to HTTP: int() refused '²' (a 500 once)
    "header length in superscript digits": (lambda b, h: (b, {**h, "Inference-Header-Content-Length": "¹²"})),
    "header length past the body": (
        lambda b, h: (b, {**h, "Inference-Header-Content-Length": str(len(b) + 1)})
    ),
    "an element's length past the end": (lambda b, h: (b[:-5], h)),
    "bytes left after the last element": (lambda b, h: (b + b"\x00\x00", h)),
}


@pytest.mark.parametrize("spoil", BAD_BINARY.values(), ids=BAD_BINARY)
def test_malformed_binary_requests_are_400s_before_any_model_is_asked(
    gateway: FlaskClient, fake: FakeModelClient, spoil: Any
) -> None:
    make_ready(fake)
    body, headers = spoil(*binary_request([CAT, COFFEE]))
    assert_v2_error(gateway.post("/v2/models/resnet50/infer", data=body, headers=headers), 400, "bad_request")
    assert fake.calls == []


def test_binary_inputs_keep_the_image_limits(gateway: FlaskClient, fake: FakeModelClient) -> None:
    make_ready(fake)
    body, headers = binary_request([CAT] * 33)
    assert_v2_error(
        gateway.post("/v2/models/resnet50/infer", data=body, headers=headers), 400, "too_many_images"
    )
    both, headers = binary_request([CAT])
    head_length = int(headers["Inference-Header-Content-Length"])
    head = json.loads(both[:head_length])
    head["inputs"][0]["data"] = [base64.b64encode(CAT).decode()]  # data and binary_data_size at once
    encoded = json.dumps(head).encode()
    mixed = gateway.post(
        "/v2/models/resnet50/infer",
        data=encoded + both[head_length:],
        headers={"Inference-Header-Content-Length": str(len(encoded))},
    )
    assert_v2_error(mixed, 400, "bad_request")
    assert fake.calls == []
