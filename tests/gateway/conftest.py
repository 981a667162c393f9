"""Shared fixtures of the gateway tests (the Redis server is in tests/conftest.py)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from common.training import removals


@pytest.fixture
def trainer_removals(redis_url: str, tmp_path: Path) -> Iterator[Path]:
    """The trainer's side of a model removal (``common.training.removals.serve``), for the
    repository at ``tmp_path / "models"``: what answers the gateway's ``DELETE /v1/models/<name>``."""
    root, stop = tmp_path / "models", threading.Event()
    thread = threading.Thread(
        target=removals.serve, args=(redis.Redis.from_url(redis_url), root, stop, 1), daemon=True
    )
    thread.start()
    yield root
    stop.set()
    thread.join(timeout=5)
