"""Clients written for other servers work unchanged: NVIDIA's Triton HTTP client (Open Inference
Protocol v2) against the fleet through Nginx."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import tritonclient.http as triton

from tests.e2e.running import JPEG, E2EFleet, post
from tests.helpers import photo

pytestmark = pytest.mark.e2e
CAT, COFFEE = photo("chelsea.jpg"), photo("coffee.jpg")


def test_the_triton_client_works_unchanged(fleet: E2EFleet) -> None:
    client = triton.InferenceServerClient(url=fleet.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("resnet50") and client.is_model_ready("ensemble")
    assert not client.is_model_ready("alexnet")
    metadata = client.get_model_metadata("resnet50")
    assert metadata["inputs"][0]["datatype"] == "BYTES"

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
