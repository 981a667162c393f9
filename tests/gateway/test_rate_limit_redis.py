"""Rate limits counted in a real Redis are shared by every gateway worker (and gateway replica)."""

from __future__ import annotations

import redis

from gateway.app import create_app
from tests.gateway.fakes import FakeModelClient
from tests.helpers import gateway_settings, photo

CAT = photo("chelsea.jpg")
ALICE, BOB = {"X-Real-IP": "203.0.113.7"}, {"X-Real-IP": "203.0.113.8"}


def workers(storage: str, count: int = 2) -> list:
    """``count`` independent gateway apps, as Gunicorn workers (or gateway replicas) would be."""
    settings = gateway_settings(rate_limit="4/minute", rate_limit_storage=storage)
    return [
        create_app(settings, client=FakeModelClient(settings), poll_health=False).test_client()  # type: ignore[arg-type]
        for _ in range(count)
    ]


def send(client, headers: dict[str, str]) -> int:  # type: ignore[no-untyped-def]
    return client.post(
        "/v1/predict?model=vgg16", data=CAT, content_type="image/jpeg", headers=headers
    ).status_code


def test_workers_share_one_count_in_redis(redis_url: str) -> None:
    redis.Redis.from_url(redis_url).flushall()
    first, second = workers(redis_url)
    answers = [send(worker, ALICE) for worker in (first, second, first, second, first, second)]
    assert answers == [200, 200, 200, 200, 429, 429]  # 4 per minute in all, whichever worker counts
    assert send(second, BOB) == 200  # per client
    assert any(key for key in redis.Redis.from_url(redis_url).keys())  # the counts live in Redis


def test_in_memory_counts_are_per_worker() -> None:
    """The control: without Redis each worker counts alone, so a client gets 4 per worker."""
    first, second = workers("memory://")
    answers = [send(worker, ALICE) for worker in (first, second) * 5]
    assert answers.count(200) == 8 and answers[-2:] == [429, 429]
