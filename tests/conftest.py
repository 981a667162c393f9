"""Fixtures every test shares: a clean environment, a real Redis, the trainer's removal loop, a
slow image server, the small model trained in the run. Helpers are in ``tests.helpers``."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from common.training import removals
from deploy.local.running import free_port, wait_until
from tests.e2e import shapes
from tests.gateway.slow_http import serve_slow_images
from tests.helpers import ADMIN_KEY, is_project_variable


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the developer's WEIGHTS, GATEWAY_*, <MODEL>_URLS, ... settings; the admin key
    is a known one."""
    for name in list(os.environ):
        if is_project_variable(name):
            monkeypatch.delenv(name)
    monkeypatch.setenv("IMAGEREC_ADMIN_KEY", ADMIN_KEY)


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


@pytest.fixture(scope="session")
def slow_server() -> Iterator[str]:
    """A loopback image server whose ``/slow?<seconds>`` answers after that long."""
    with serve_slow_images() as url:
        yield url


@pytest.fixture(scope="session")
def trained_shapes(tmp_path_factory: pytest.TempPathFactory) -> shapes.TrainedModel:
    """The small shapes model, trained once per run (the int8 and end-to-end tests serve it)."""
    return shapes.train(tmp_path_factory.mktemp("shapes"))
