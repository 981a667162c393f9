"""The per-replica circuit breaker: its states, and that it never serialises the calls it guards."""

from __future__ import annotations

import json
import threading

import pytest
import responses

from common.errors import (
    BadUpstreamResponse,
    DeadlineExceeded,
    Overloaded,
    ServiceError,
    UpstreamTimeout,
)
from fleet.accounting import verdict
from fleet.breaker import CLOSED, HALF_OPEN, OPEN, Breaker
from fleet.client import ModelClient, new_session
from fleet.registry import Registry
from fleet.transport import NoAnswer, NotReady, NotSent, ReplyLost
from tests.fleet.fakes import R1, reply


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_consecutive_failures_then_lets_one_trial_through() -> None:
    clock = Clock()
    breaker = Breaker(fail_max=3, reset_s=5, clock=clock)
    for _ in range(2):
        breaker.failure()
    breaker.success()  # consecutive failures only
    for _ in range(3):
        assert breaker.allow()
        breaker.failure()
    assert breaker.state == OPEN and not breaker.allow()
    clock.now += 5
    assert breaker.allow() and breaker.state == HALF_OPEN
    assert not breaker.allow()  # one trial at a time
    breaker.success()
    assert breaker.state == CLOSED and breaker.allow()


def test_a_failed_trial_opens_the_circuit_for_another_period() -> None:
    clock = Clock()
    breaker = Breaker(fail_max=1, reset_s=5, clock=clock)
    breaker.failure()
    clock.now += 5
    assert breaker.allow()
    breaker.failure()
    assert breaker.state == OPEN and not breaker.allow()
    clock.now += 4.9
    assert not breaker.allow()
    clock.now += 0.1
    assert breaker.allow()


@responses.activate
def test_calls_through_one_breaker_run_concurrently() -> None:
    """Regression: with pybreaker, one replica saw one request at a time from each gateway worker."""
    together = threading.Barrier(4, timeout=5)

    def answer(request: object) -> tuple[int, dict[str, str], str]:
        together.wait()  # breaks (and fails the calls) unless all four are in flight at once
        return 200, {}, json.dumps(reply())

    responses.add_callback(responses.POST, f"{R1}/v1/predict", callback=answer)
    session = new_session(8)
    client = ModelClient(Registry({"resnet50": [R1]}, session), session, connect_retries=0)
    results: list[object] = []
    threads = [
        threading.Thread(target=lambda: results.append(client.predict("resnet50", [b"a"], top_k=1)))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(results) == 4 and not together.broken


def test_release_frees_the_half_open_trial_so_the_next_call_is_the_trial() -> None:
    """A trial answered 'overloaded' gives no verdict; without a release the circuit would stay half-open."""
    clock = Clock()
    breaker = Breaker(fail_max=1, reset_s=5, clock=clock)
    breaker.failure()
    clock.now += 5
    assert breaker.allow() and not breaker.allow()
    breaker.release()
    assert breaker.state == HALF_OPEN
    assert breaker.allow() and not breaker.allow()  # the next call is the one trial
    breaker.success()
    assert breaker.state == CLOSED


def test_release_neither_counts_nor_forgives_a_failure() -> None:
    breaker = Breaker(fail_max=3, reset_s=5, clock=Clock())
    breaker.failure()
    breaker.failure()
    breaker.release()
    assert breaker.state == CLOSED and breaker.failures == 2
    breaker.failure()
    assert breaker.state == OPEN


@pytest.mark.parametrize(
    ("outcome", "expected"),
    [
        (None, "success"),
        (ServiceError("33 images", status=400, code="too_many_images"), "success"),
        (NotReady("loading"), "success"),  # it answered, promptly; readiness is the registry's business
        (Overloaded("busy", retry_after=3), "neutral"),
        (DeadlineExceeded("the request's budget ran out"), "neutral"),
        (NotSent("refused"), "failure"),
        (ReplyLost("reset"), "failure"),
        (NoAnswer("silent", clipped=False), "failure"),
        (BadUpstreamResponse("garbage"), "failure"),
        (UpstreamTimeout("slow"), "failure"),
        (ServiceError("boom"), "failure"),
        (RuntimeError("bug"), "failure"),
    ],
    ids=lambda value: type(value).__name__ if not isinstance(value, str) else value,
)
def test_what_each_outcome_of_a_member_call_counts_for(outcome: BaseException | None, expected: str) -> None:
    assert verdict(outcome) == expected
