"""What the worker tests share: a job store on a real Redis, and a fake model client that raises
scripted errors first and runs a hook after every call."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from common.errors import ServiceError
from common.jobs.store import JobStore, connect
from tests.gateway.fakes import FakeModelClient


class ScriptedClient(FakeModelClient):
    """Raises the scripted errors on the first calls, then answers (``answer``); ``after_call``
    runs after each call."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.script: list[ServiceError] = []
        self.after_call = lambda: None
        self.calls_made = 0

    def predict(self, model: str, images: list[bytes], **kwargs: Any) -> dict[str, Any]:
        self.calls_made += 1
        try:
            if self.script:
                raise self.script.pop(0)
            return self.answer(model, images, **kwargs)
        finally:
            self.after_call()

    def answer(self, model: str, images: list[bytes], **kwargs: Any) -> dict[str, Any]:
        return super().predict(model, images, **kwargs)


@pytest.fixture
def store(redis_url: str, tmp_path: Path) -> Iterator[JobStore]:
    redis.Redis.from_url(redis_url).flushall()
    yield JobStore(connect(redis_url, retries=1), tmp_path / "jobs", 3600)
