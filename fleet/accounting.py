"""What one member call says about the replica's health: the breaker's bookkeeping, in one table.

A failure is evidence the replica is broken: no connection, an answer lost or garbled on the way,
silence past the read time-out, a 5xx or a reply that breaks the contract. A success is an answer
a healthy replica gives, a 4xx verdict on the request included. Neither - the call is released -
when the replica was busy (``overloaded``) or the request's own budget ran out (a member's 504 or
an expired deadline): a healthy replica says both, and a sick one is caught by the other outcomes.
"""

from __future__ import annotations

from typing import Literal

from common import metrics
from common.errors import DeadlineExceeded, Overloaded, ServiceError
from fleet.breaker import Breaker
from fleet.transport import NoAnswer, NotReady, NotSent, ReplyLost

Verdict = Literal["success", "failure", "neutral"]

_LABELS: tuple[tuple[type[BaseException], str], ...] = (
    (NotSent, "unreachable"),
    (ReplyLost, "broken_response"),
    (NoAnswer, "timeout"),
    (NotReady, "not_ready"),
    (Overloaded, "overloaded"),
    (DeadlineExceeded, "deadline_exceeded"),
)


def verdict(outcome: BaseException | None) -> Verdict:
    """The breaker's reading of one call that ended with ``outcome`` (None: a good answer)."""
    if outcome is None or isinstance(outcome, NotReady):  # it answered, promptly and well-formed
        return "success"
    if isinstance(outcome, Overloaded | DeadlineExceeded):
        return "neutral"
    if isinstance(outcome, ServiceError) and outcome.status < 500:
        return "success"  # the client's own mistake says nothing about the replica
    return "failure"


def record(breaker: Breaker, model: str, outcome: BaseException | None) -> None:
    """Settle the call with its breaker, and count a member failure by kind."""
    judged = verdict(outcome)
    if judged == "success":
        breaker.success()
    elif judged == "failure":
        breaker.failure()
    else:
        breaker.release()
    if outcome is not None and not (isinstance(outcome, ServiceError) and outcome.status < 500):
        metrics.MEMBER_FAILURES.labels(model, failure_label(outcome)).inc()


def failure_label(outcome: BaseException | None) -> str:
    """The ``MEMBER_FAILURES`` label for an outcome."""
    for kind, label in _LABELS:
        if isinstance(outcome, kind):
            return label
    return outcome.code if isinstance(outcome, ServiceError) else "error"
