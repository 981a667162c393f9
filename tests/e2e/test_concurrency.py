"""Ordinary concurrency on the default settings: queued by deadline, never refused for being many.

Real sockets through Nginx, clients that ignore Retry-After, different bytes on every request.
"""

from __future__ import annotations

import itertools
import os
import signal
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from deploy.local.running import wait_until
from tests.e2e.load import JPEG, Load, Send, failures
from tests.e2e.running import E2EFleet, assert_json_error, post
from tests.helpers import photo

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
COFFEE = photo("coffee.jpg")  # 600x400, like the held-out photo
_serial = itertools.count()


def fresh_photo() -> bytes:
    """The same photo with different bytes every time (a trailer after the JPEG's end marker)."""
    return COFFEE + next(_serial).to_bytes(8, "big")


def fresh(fleet: E2EFleet, query: str) -> Send:
    url = f"{fleet.url}/v1/predict?{query}"
    return lambda session: session.post(url, data=fresh_photo(), headers=JPEG, timeout=120)


def batching(fleet: E2EFleet, model: str) -> dict:
    return requests.get(f"{fleet.service_url(model)}/v1/model", timeout=5).json()["batching"]


def test_32_clients_that_ignore_retry_after_get_only_200s_in_full_batches(fleet: E2EFleet) -> None:
    before = batching(fleet, "resnet50")
    with Load({"resnet50": fresh(fleet, "model=resnet50&top_k=1")}, threads_per_kind=32) as load:
        load.wait_for(160, timeout_s=300)
    after = batching(fleet, "resnet50")
    assert not failures(load.outcomes), failures(load.outcomes)
    assert after["shed"] == before["shed"]
    images, batches = after["images"] - before["images"], after["batches"] - before["batches"]
    # 32 clients keep the queue full: calls run near the largest batch (8), not one image at a time
    assert images / batches >= 4, (images, batches)


def test_a_deadline_the_queue_cannot_meet_is_refused_at_once_and_the_queue_still_answers(
    fleet: E2EFleet,
) -> None:
    batch = [("files", (f"{i}.jpg", fresh_photo(), "image/jpeg")) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        busy = [pool.submit(post, fleet, "model=resnet50&top_k=1", files=batch) for _ in range(8)]
        wait_until(lambda: batching(fleet, "resnet50")["queued_images"] >= 24, 60, "a queue at resnet50")
        hurried = post(fleet, "model=resnet50&timeout_ms=300", data=fresh_photo(), headers=JPEG)
        body = assert_json_error(hurried, 503, "overloaded")
        assert int(hurried.headers["Retry-After"]) >= 1, body
        answers = [future.result(timeout=120) for future in busy]
    # admitted work keeps the promise admission made: every queued batch is answered
    assert [a.status_code for a in answers] == [200] * 8


def test_a_model_killed_while_another_serves_four_clients(fleet: E2EFleet) -> None:
    with Load({"resnet50": fresh(fleet, "model=resnet50&top_k=1")}, threads_per_kind=4) as load:
        load.wait_for(8)
        before = fleet.pids()["inceptionv3"]
        os.killpg(before, signal.SIGKILL)
        wait_until(lambda: fleet.pids().get("inceptionv3") not in (None, before), 60, "inceptionv3 restarted")
        mark = len(load.outcomes)
        load.wait_for(8, since=mark)
    assert not failures(load.outcomes), failures(load.outcomes)
    fleet.wait_ready()


def test_predictions_keep_answering_while_redis_is_stopped(fleet: E2EFleet) -> None:
    """Redis holds the shared rate-limit counts: without it the gateway counts in memory."""
    assert "redis" in fleet.pids()
    fleet.ctl("stop", "redis")
    try:
        answers = Counter(
            post(fleet, "model=shapes&top_k=1", data=fresh_photo(), headers=JPEG).status_code
            for _ in range(20)
        )
        assert answers == {200: 20}, answers
    finally:
        fleet.ctl("start", "redis")
    assert post(fleet, "model=shapes", data=fresh_photo(), headers=JPEG).status_code == 200
