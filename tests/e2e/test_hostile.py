"""Hostile inputs through Nginx: each gets the right 4xx in the one JSON error shape, the fleet
answers a good request right after, and no process died (../shared/HOSTILE_INPUTS.md)."""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image

from tests.e2e.running import E2EFleet
from tests.helpers import encode, photo, png_declaring

pytestmark = pytest.mark.e2e
CAT = photo("chelsea.jpg")


def gif_declaring(width: int, height: int) -> bytes:
    return (
        b"GIF89a"
        + struct.pack("<HH", width, height)
        + b"\x00\x00\x00"
        + b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
    )


def noise_jpeg(width: int = 64, height: int = 64) -> bytes:
    return encode(
        Image.fromarray(np.random.default_rng(1).integers(0, 256, (height, width, 3), dtype=np.uint8)), "JPEG"
    )


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


RAW = "image/jpeg"
CASES: list[tuple[str, dict[str, Any], int, str]] = [
    # image bytes
    (
        "png bomb 30000x30000",
        {"data": png_declaring(30000, 30000), "ct": "image/png"},
        413,
        "image_too_large",
    ),
    (
        "gif bomb 30000x30000",
        {"data": gif_declaring(30000, 30000), "ct": "image/gif"},
        413,
        "image_too_large",
    ),
    (
        "png 8000x8000 over the pixel cap",
        {"data": png_declaring(8000, 8000), "ct": "image/png"},
        413,
        "image_too_large",
    ),
    ("truncated jpeg", {"data": noise_jpeg()[:700], "ct": RAW}, 400, "invalid_image"),
    (
        "truncated png",
        {"data": encode(Image.new("RGB", (64, 64), "red"), "PNG")[:60], "ct": "image/png"},
        400,
        "invalid_image",
    ),
    (
        "pdf",
        {"data": b"%PDF-1.7\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", "ct": RAW},
        415,
        "unsupported_media_type",
    ),
    (
        "svg",
        {"data": b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>', "ct": "image/svg+xml"},
        415,
        "unsupported_media_type",
    ),
    (
        "eps",
        {"data": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 9 9\n", "ct": RAW},
        415,
        "unsupported_media_type",
    ),
    (
        "ico",
        {"data": encode(Image.new("RGB", (16, 16)), "ICO"), "ct": "image/x-icon"},
        415,
        "unsupported_media_type",
    ),
    (
        "random bytes",
        {"data": np.random.default_rng(2).bytes(5000), "ct": RAW},
        415,
        "unsupported_media_type",
    ),
    ("text as image/jpeg", {"data": b"hello world", "ct": RAW}, 415, "unsupported_media_type"),
    ("html", {"data": b"<html><body>hi</body></html>", "ct": "text/html"}, 415, "unsupported_media_type"),
    ("empty body", {"data": b"", "ct": RAW}, 400, "invalid_image"),
    # JSON
    ("json list", {"json_text": "[]"}, 400, "bad_request"),
    ("json string", {"json_text": '"x"'}, 400, "bad_request"),
    ("json null", {"json_text": "null"}, 400, "bad_request"),
    ("json number", {"json_text": "1"}, 400, "bad_request"),
    ("json deeply nested", {"json_text": "[" * 200_000 + "]" * 200_000}, 400, "invalid_json"),
    ("json malformed", {"json_text": '{"image": '}, 400, "invalid_json"),
    ("json no image key", {"json": {"photo": b64(CAT)}}, 400, "bad_request"),
    ("json bad base64 alphabet", {"json": {"image": "@@@@" * 10}}, 400, "invalid_base64"),
    ("json bad base64 padding", {"json": {"image": b64(CAT)[:-1]}}, 400, "invalid_base64"),
    ("json image not a string", {"json": {"image": {"nested": True}}}, 400, "bad_request"),
    ("json data uri without base64", {"json": {"image": "data:image/png,abc"}}, 400, "bad_request"),
    ("json base64 of text", {"json": {"image": b64(b"just text, no image")}}, 415, "unsupported_media_type"),
    ("json images empty", {"json": {"images": []}}, 400, "bad_request"),
    ("json images over the cap", {"json": {"images": [b64(CAT)] * 33}}, 400, "too_many_images"),
    ("json url file scheme", {"json": {"url": "file:///etc/passwd"}}, 400, "url_not_allowed"),
    (
        "json url metadata service",
        {"json": {"url": "http://169.254.169.254/latest/meta-data"}},
        400,
        "url_not_allowed",
    ),
    ("json url private network", {"json": {"url": "http://10.0.0.1/cat.jpg"}}, 400, "url_not_allowed"),
    ("json url ftp", {"json": {"url": "ftp://example.com/cat.jpg"}}, 400, "url_not_allowed"),
    ("json url not a string", {"json": {"url": ["http://example.com"]}}, 400, "bad_request"),
    # forms and multipart
    ("form bad base64", {"form": {"image": "not base64 at all!"}}, 400, "invalid_base64"),
    ("multipart without a file part", {"form": {"other": "x"}, "multipart": True}, 400, "bad_request"),
    ("multipart empty file", {"files": [("file", ("", b"", "image/jpeg"))]}, 400, "invalid_image"),
    (
        "multipart unicode filename pdf",
        {"files": [("file", ("\u6587\u4ef6/../x.pdf", b"%PDF-1.4", RAW))]},
        415,
        "unsupported_media_type",
    ),
    (
        "multipart 33 files",
        {"files": [("files", (f"{i}.jpg", CAT, RAW)) for i in range(33)]},
        400,
        "too_many_images",
    ),
    # requests themselves
    ("text/plain body", {"data": b"hello", "ct": "text/plain"}, 415, "unsupported_media_type"),
    ("no content type", {"data": b"\x00\x01\x02", "ct": None}, 415, "unsupported_media_type"),
    ("no body, no type", {"data": None, "ct": None}, 400, "bad_request"),
    ("unknown model", {"query": "model=alexnet", "data": CAT, "ct": RAW}, 404, "unknown_model"),
    ("no model", {"query": "", "data": CAT, "ct": RAW}, 400, "bad_request"),
    ("top_k negative", {"query": "model=resnet50&top_k=-1", "data": CAT, "ct": RAW}, 400, "bad_request"),
    ("top_k not a number", {"query": "model=resnet50&top_k=abc", "data": CAT, "ct": RAW}, 400, "bad_request"),
    ("unknown vote", {"query": "model=ensemble&vote=bogus", "data": CAT, "ct": RAW}, 400, "bad_request"),
    (
        "member weights garbage",
        {"query": "model=ensemble&vote=weighted&member_weights=x", "data": CAT, "ct": RAW},
        400,
        "bad_request",
    ),
    ("body over Nginx's limit", {"data": b"\xff" * (11 * 1024 * 1024), "ct": RAW}, 413, "payload_too_large"),
    ("chunked body over the limit", {"chunks": True}, 413, "payload_too_large"),
    (
        "very long URL",
        {"query": "model=resnet50&x=" + "a" * 20_000, "data": CAT, "ct": RAW},
        414,
        "uri_too_long",
    ),
    (  # under Nginx's 8k request line, over Gunicorn's default 4094: must still reach the gateway
        "a 6 kB query string",
        {"query": "model=resnet50&top_k=" + "9" * 6_000, "data": CAT, "ct": RAW},
        400,
        "bad_request",
    ),
]


def send(fleet: E2EFleet, case: dict[str, Any]) -> requests.Response:
    url = f"{fleet.url}/v1/predict?{case.get('query', 'model=resnet50')}"
    if "json_text" in case:
        return requests.post(
            url, data=case["json_text"], headers={"Content-Type": "application/json"}, timeout=60
        )
    if "json" in case:
        return requests.post(url, json=case["json"], timeout=60)
    if "files" in case:
        return requests.post(url, files=case["files"], timeout=60)
    if "form" in case:
        if case.get("multipart"):
            return requests.post(url, files={k: (None, v) for k, v in case["form"].items()}, timeout=60)
        return requests.post(url, data=case["form"], timeout=60)
    if case.get("chunks"):

        def body() -> Iterator[bytes]:
            for _ in range(12):
                yield b"\xff" * (1024 * 1024)

        return requests.post(url, data=body(), headers={"Content-Type": RAW}, timeout=60)
    headers = {"Content-Type": case["ct"]} if case.get("ct") else {}
    headers.update(case.get("headers", {}))
    return requests.post(url, data=case["data"], headers=headers, timeout=60)


@pytest.fixture(scope="module")
def pids_before(fleet: E2EFleet) -> dict[str, int]:
    fleet.wait_ready()
    return fleet.pids()


@pytest.mark.parametrize(("name", "case", "status", "code"), CASES, ids=[c[0] for c in CASES])
def test_hostile_input_gets_a_json_4xx_and_the_fleet_keeps_serving(
    fleet: E2EFleet, pids_before: dict[str, int], name: str, case: dict[str, Any], status: int, code: str
) -> None:
    response = send(fleet, case)
    assert response.status_code == status, response.text[:300]
    assert response.headers["Content-Type"].startswith("application/json"), response.text[:300]
    body = json.loads(response.content)
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "request_id"}
    assert body["error"]["code"] == code and body["error"]["message"]
    good = requests.post(
        f"{fleet.url}/v1/predict?model=resnet50", data=CAT, headers={"Content-Type": RAW}, timeout=60
    )
    assert good.status_code == 200
    assert fleet.pids() == pids_before  # nobody died or restarted


def test_there_are_at_least_forty_cases() -> None:
    assert len(CASES) >= 40
