"""Shared fixtures: a clean environment for every test, photos, and small image factories."""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import struct
import subprocess
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from PIL import Image

from common.tenancy.settings import AuthSettings
from common.training import removals
from deploy.local.running import free_port, wait_until
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
    "VGG16_",
    "RESNET50_",
    "INCEPTIONV3_",
    "SHAPES_",
    "AUTH_",
    "QUOTA_",
    "IMAGEREC_",
)
ADMIN_KEY = "test-admin-key"  # every test's IMAGEREC_ADMIN_KEY: no test writes a key into run/


def _is_project_variable(name: str) -> bool:
    return (
        name in _SERVICE_FIELDS or name.startswith(_PREFIXES) or name.endswith("_URLS") or name == "REDIS_URL"
    )


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the developer's WEIGHTS, GATEWAY_*, <MODEL>_URLS, ... settings; the admin key
    is a known one."""
    for name in list(os.environ):
        if _is_project_variable(name):
            monkeypatch.delenv(name)
    monkeypatch.setenv("IMAGEREC_ADMIN_KEY", ADMIN_KEY)


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


# A real redis-server on a free port, for the tests of everything kept in Redis.
@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    server = shutil.which("redis-server")
    if not server:
        if os.environ.get("CI"):
            pytest.fail("redis-server is missing: `make test` installs it (apt-get install redis-server)")
        pytest.skip("redis-server is not installed (make test installs it)")
    port = free_port(replicas=1)
    process = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            return bool(redis.Redis.from_url(url).ping())
        except redis.ConnectionError:
            return False

    try:
        wait_until(answers, 15, "redis-server to answer")
        yield url
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture
def trainer_removals(redis_url: str, tmp_path: Path) -> Iterator[Path]:
    """The trainer's side of a model removal (``common.training.removals.serve``), for the
    repository at ``tmp_path / "models"``: what answers the gateway's ``DELETE /v1/models/<name>``."""
    root, stop = tmp_path / "models", threading.Event()
    root.mkdir(parents=True, exist_ok=True)
    thread = threading.Thread(
        target=removals.serve, args=(redis.Redis.from_url(redis_url), root, stop, 1), daemon=True
    )
    thread.start()
    yield root
    stop.set()
    thread.join(timeout=5)
