"""What the worker tests share: a job store on a real Redis, and a fake model client that raises
scripted errors first and runs a hook after every call."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from common.jobs.store import JobStore, connect


@pytest.fixture
def store(redis_url: str, tmp_path: Path) -> Iterator[JobStore]:
    redis.Redis.from_url(redis_url).flushall()
    yield JobStore(connect(redis_url, retries=1), tmp_path / "jobs", 3600)
