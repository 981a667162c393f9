"""Shared fixtures of the gateway tests: a real redis-server on a free port."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest
import redis

from deploy.local.running import free_port, wait_until


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
