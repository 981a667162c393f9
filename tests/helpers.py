"""Helpers every test module may import (fixtures live in the conftest.py files): the tests' admin
key, photos and image factories, settings built for tests, and checks of answers and metrics."""

from __future__ import annotations

import dataclasses
import io
import struct
import zlib
from pathlib import Path
from typing import Any

from PIL import Image

from common.tenancy.settings import AuthSettings
from gateway.settings import GatewaySettings
from serving.app import ServiceSettings
from serving.settings import RENAMED

FIXTURES = Path(__file__).parent / "fixtures"
PHOTOS = ("chelsea.jpg", "coffee.jpg", "astronaut.jpg")
_SERVICE_FIELDS = {f.name.upper() for f in dataclasses.fields(ServiceSettings)} | set(RENAMED)
_PREFIXES = (
    "GATEWAY_",
    "FLEET_",
    "JOBS_",
    "CUSTOM_",
    "KERAS_FILE_",
    "TRAINING_",
    "VGG16_",
    "RESNET50_",
    "INCEPTIONV3_",
    "SHAPES_",
    "AUTH_",
    "QUOTA_",
    "IMAGEREC_",
)
ADMIN_KEY = "test-admin-key"  # every test's IMAGEREC_ADMIN_KEY: no test writes a key into run/


def is_project_variable(name: str) -> bool:
    """A variable the project reads: every test runs without the developer's."""
    return (
        name in _SERVICE_FIELDS or name.startswith(_PREFIXES) or name.endswith("_URLS") or name == "REDIS_URL"
    )


def auth_settings(redis_url: str = "", **overrides: Any) -> AuthSettings:
    """Key settings over ``redis_url`` with the tests' admin key."""
    return AuthSettings(redis_url=redis_url, admin_key=ADMIN_KEY, **overrides)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def keyed_client(app: Any, key: str = ADMIN_KEY) -> Any:
    """A Flask test client that sends ``key`` (the admin's by default) with every request."""
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {key}"
    return client


def photo(name: str = "chelsea.jpg") -> bytes:
    return (FIXTURES / name).read_bytes()


def encode(image: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A tiny, valid-looking PNG whose header declares ``width x height`` (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def gateway_settings(**overrides: object) -> GatewaySettings:
    replicas = {
        "vgg16": ("http://vgg16:8501",),
        "resnet50": ("http://r1:8502", "http://r2:8502"),
        "inceptionv3": ("http://inceptionv3:8503",),
    }
    return GatewaySettings(**{"replicas": replicas, **overrides})  # type: ignore[arg-type]


def metric_value(text: str, name: str, **labels: str) -> float:
    """One sample from a Prometheus exposition whose labels include ``labels``; 0 when absent."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def assert_error(response: Any, status: int, code: str) -> None:
    """``response`` is the JSON error ``code`` with ``status``, its request id in body and header."""
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert set(body) == {"error"} and body["error"]["code"] == code
    assert set(body["error"]) == {"code", "message", "request_id"}
    assert body["error"]["request_id"] == response.headers["X-Request-ID"]
