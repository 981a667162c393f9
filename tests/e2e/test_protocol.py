"""Clients written for other servers work unchanged: NVIDIA's Triton clients (Open Inference
Protocol v2), over HTTP and over gRPC, against the fleet through Nginx."""

from __future__ import annotations

import base64

import grpc
import numpy as np
import pytest
import requests
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton

from tests.e2e.running import JPEG, E2EFleet, post
from tests.helpers import metric_value, photo

pytestmark = pytest.mark.e2e
CAT, COFFEE = photo("chelsea.jpg"), photo("coffee.jpg")


def test_the_triton_client_works_unchanged(fleet: E2EFleet) -> None:
    client = triton.InferenceServerClient(url=fleet.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("resnet50") and client.is_model_ready("ensemble")
    assert not client.is_model_ready("alexnet")
    metadata = client.get_model_metadata("resnet50")
    assert metadata["inputs"][0]["datatype"] == "BYTES"
    # Triton's model configuration extension, through Nginx, over both protocols (perf_analyzer's
    # first question)
    config = client.get_model_config("resnet50")
    assert (config["max_batch_size"], config["input"][0]["data_type"]) == (0, "TYPE_STRING")
    over_grpc = triton_grpc.InferenceServerClient(url=fleet.fleet.grpc_address)
    config = over_grpc.get_model_config("resnet50", as_json=True)["config"]
    assert config["input"][0]["data_type"] == "TYPE_STRING"

    image = triton.InferInput("image", [2], "BYTES")
    image.set_data_from_numpy(
        np.array([base64.b64encode(CAT), base64.b64encode(COFFEE)], dtype=object), binary_data=False
    )
    outputs = [triton.InferRequestedOutput(name, binary_data=False) for name in ("labels", "scores")]
    result = client.infer("resnet50", [image], outputs=outputs, parameters={"top_k": 3})
    labels, scores = result.as_numpy("labels"), result.as_numpy("scores")
    assert labels.shape == scores.shape == (2, 3)

    v1 = post(fleet, "model=resnet50&top_k=3", data=COFFEE, headers=JPEG).json()
    assert [str(label, "utf-8") if isinstance(label, bytes) else label for label in labels[1]] == [
        p["label"] for p in v1["predictions"]
    ]
    # batched (2 images) and single inference may differ in the last float bits
    assert scores[1] == pytest.approx([p["score"] for p in v1["predictions"]], rel=1e-4)


def test_the_triton_client_with_binary_tensors_both_ways(fleet: E2EFleet) -> None:
    """Raw image files in (no base64), raw labels, scores and indices back: the binary tensor data
    extension through Nginx, answering as the JSON form does."""
    client = triton.InferenceServerClient(url=fleet.url.removeprefix("http://"))
    image = triton.InferInput("image", [2], "BYTES")
    image.set_data_from_numpy(np.array([CAT, COFFEE], dtype=object), binary_data=True)
    outputs = [
        triton.InferRequestedOutput(name, binary_data=True) for name in ("labels", "scores", "indices")
    ]
    binary = client.infer("resnet50", [image], outputs=outputs, parameters={"top_k": 3})
    as_json = triton.InferInput("image", [2], "BYTES")
    as_json.set_data_from_numpy(
        np.array([base64.b64encode(CAT), base64.b64encode(COFFEE)], dtype=object), binary_data=False
    )
    text = [triton.InferRequestedOutput(name, binary_data=False) for name in ("labels", "scores", "indices")]
    reference = client.infer("resnet50", [as_json], outputs=text, parameters={"top_k": 3})
    assert binary.as_numpy("labels").shape == (2, 3)
    assert [label.decode() for label in binary.as_numpy("labels")[0]] == [
        str(label, "utf-8") if isinstance(label, bytes) else label
        for label in reference.as_numpy("labels")[0]
    ]
    assert binary.as_numpy("scores").dtype == np.float32 and binary.as_numpy("indices").dtype == np.int64
    assert binary.as_numpy("scores") == pytest.approx(reference.as_numpy("scores"), rel=1e-6)
    assert (binary.as_numpy("indices") == reference.as_numpy("indices")).all()


def test_protocol_errors_reach_the_triton_client(fleet: E2EFleet) -> None:
    client = triton.InferenceServerClient(url=fleet.url.removeprefix("http://"))
    image = triton.InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([base64.b64encode(b"not an image")], dtype=object), binary_data=False)
    with pytest.raises(triton.InferenceServerException) as info:
        client.infer("resnet50", [image])
    assert info.value.status() == "415" and "image" in info.value.message()


def test_the_triton_grpc_client_works_unchanged(fleet: E2EFleet) -> None:
    """KServe's GRPCInferenceService on Nginx's gRPC port: health, metadata, and raw image files in,
    raw tensors back, answering as the REST route does."""
    client = triton_grpc.InferenceServerClient(url=fleet.fleet.grpc_address)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("resnet50") and client.is_model_ready("ensemble")
    assert not client.is_model_ready("alexnet")
    assert client.get_server_metadata().name == "imagerec"
    assert client.get_model_metadata("resnet50").inputs[0].datatype == "BYTES"

    image = triton_grpc.InferInput("image", [2], "BYTES")
    image.set_data_from_numpy(np.array([CAT, COFFEE], dtype=object))
    names = ("labels", "scores", "indices")
    outputs = [triton_grpc.InferRequestedOutput(name) for name in names]
    result = client.infer("resnet50", [image], outputs=outputs, parameters={"top_k": 3}, client_timeout=60)
    rest = triton.InferenceServerClient(url=fleet.url.removeprefix("http://"))
    as_rest = triton.InferInput("image", [2], "BYTES")
    as_rest.set_data_from_numpy(np.array([CAT, COFFEE], dtype=object), binary_data=True)
    reference = rest.infer(
        "resnet50",
        [as_rest],
        outputs=[triton.InferRequestedOutput(n) for n in names],
        parameters={"top_k": 3},
    )
    assert result.as_numpy("labels").shape == (2, 3)
    assert (result.as_numpy("labels") == reference.as_numpy("labels")).all()
    assert result.as_numpy("scores") == pytest.approx(reference.as_numpy("scores"), rel=1e-6)
    assert (result.as_numpy("indices") == reference.as_numpy("indices")).all()
    assert result.get_response().model_version == reference.get_response()["model_version"]


def test_grpc_errors_and_limits_reach_the_triton_client(fleet: E2EFleet) -> None:
    """The route's errors as gRPC statuses; the body limit as RESOURCE_EXHAUSTED, not an HTML page;
    a bad key refused; and the service keeps answering."""
    client = triton_grpc.InferenceServerClient(url=fleet.fleet.grpc_address)

    def refused(model: str, *images: bytes, **options: object) -> triton_grpc.InferenceServerException:
        image = triton_grpc.InferInput("image", [len(images)], "BYTES")
        image.set_data_from_numpy(np.array(list(images), dtype=object))
        with pytest.raises(triton_grpc.InferenceServerException) as info:
            client.infer(model, [image], client_timeout=60, **options)  # type: ignore[arg-type]
        return info.value

    assert refused("alexnet", CAT).status() == "StatusCode.NOT_FOUND"
    assert refused("resnet50", b"not an image").status() == "StatusCode.INVALID_ARGUMENT"
    too_large = refused("resnet50", b"\xff" * (11 * 1024 * 1024))  # Nginx's limit is 10m
    # Nginx (10m) or the gateway's gRPC server (GATEWAY_MAX_BODY_BYTES, 10 MiB), whichever counts first
    assert too_large.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert "10m" in too_large.message() or "larger than max" in too_large.message()
    bad_key = refused("resnet50", CAT, headers={"authorization": "Bearer not-a-key"})
    assert bad_key.status() == "StatusCode.UNAUTHENTICATED"
    assert client.is_server_live()
    # a service this port does not serve: Nginx's own gRPC status, not an HTML page
    with grpc.insecure_channel(fleet.fleet.grpc_address) as channel:
        unknown = channel.unary_unary(
            "/other.Service/Method", request_serializer=None, response_deserializer=None
        )
        with pytest.raises(grpc.RpcError) as info:
            unknown(b"", timeout=10)
    assert (
        info.value.code() == grpc.StatusCode.UNIMPLEMENTED and "GRPCInferenceService" in info.value.details()
    )
    metrics = requests.get(
        f"http://{fleet.fleet.settings.host}:{fleet.fleet.settings.gateway_port}/metrics", timeout=10
    )
    # the gRPC service counts its calls under its own labels (it calls the core, not the REST route)
    counted = {"component": "gateway-grpc", "route": "ModelInfer"}
    assert metric_value(metrics.text, "imagerec_requests_total", **counted, status="NOT_FOUND") >= 1
    assert metric_value(metrics.text, "imagerec_requests_total", **counted, status="UNAUTHENTICATED") >= 1
