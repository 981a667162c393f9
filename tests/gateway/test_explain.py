"""``POST /v1/explain`` at the gateway: one photo, one model, the member's grid and a PNG overlay."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from flask.testing import FlaskClient
from PIL import Image

from common.errors import ServiceError
from tests.gateway.fakes import FakeModelClient
from tests.helpers import assert_error, photo

CAT = photo("chelsea.jpg")


def test_an_explanation_has_the_members_grid_and_an_overlay_of_the_models_view(
    gateway: FlaskClient, fake: FakeModelClient
) -> None:
    response = gateway.post(
        "/v1/explain?model=resnet50&grid=4&class_id=n02123045", data=CAT, content_type="image/jpeg"
    )
    body = response.get_json()
    assert response.status_code == 200, body
    assert fake.explained == [{"grid": "4", "class_id": "n02123045"}]
    assert body["grid"] == 4 and body["passes"] == 17 and body["class"]["index"] == 281
    assert body["weights"] == "random" and "untrained" in body["note"]
    image = Image.open(io.BytesIO(base64.b64decode(body["overlay_png"])))
    assert image.format == "PNG" and image.size == (448, 448)
    pixels = np.asarray(image.convert("RGB"), np.int16)
    top_left, bottom_right = pixels[:60, :60].mean(axis=(0, 1)), pixels[-60:, -60:].mean(axis=(0, 1))
    # the hottest cell (top left) is red over the photo; a cold one is the photo as it was
    assert top_left[0] - top_left[1:].mean() > bottom_right[0] - bottom_right[1:].mean() + 60


def test_accept_png_gets_the_overlay_alone(gateway: FlaskClient) -> None:
    response = gateway.post(
        "/v1/explain?model=resnet50", data=CAT, content_type="image/jpeg", headers={"Accept": "image/png"}
    )
    assert response.status_code == 200 and response.mimetype == "image/png"
    assert Image.open(io.BytesIO(response.data)).size == (448, 448)


@pytest.mark.parametrize(
    ("query", "data", "status", "code"),
    [
        ("model=ensemble", CAT, 400, "bad_request"),
        ("models=vgg16,resnet50", CAT, 400, "bad_request"),
        ("model=resnet50", b"not an image", 415, "unsupported_media_type"),
        ("model=alexnet", CAT, 404, "unknown_model"),
    ],
)
def test_what_cannot_be_explained_is_refused_before_any_member_is_called(
    gateway: FlaskClient, fake: FakeModelClient, query: str, data: bytes, status: int, code: str
) -> None:
    response = gateway.post(f"/v1/explain?{query}", data=data, content_type="image/jpeg")
    assert_error(response, status, code)
    assert fake.explained == []


def test_an_explanation_is_of_one_image(gateway: FlaskClient, fake: FakeModelClient) -> None:
    files = [(io.BytesIO(CAT), "a.jpg"), (io.BytesIO(CAT), "b.jpg")]
    assert_error(gateway.post("/v1/explain?model=resnet50", data={"files": files}), 400, "bad_request")
    assert fake.explained == []


def test_a_members_verdict_passes_through(gateway: FlaskClient, fake: FakeModelClient) -> None:
    fake.failures["resnet50"] = ServiceError(
        "grid must be between 2 and 10, got 40", code="bad_request", status=400
    )
    assert_error(
        gateway.post("/v1/explain?model=resnet50&grid=40", data=CAT, content_type="image/jpeg"),
        400,
        "bad_request",
    )
