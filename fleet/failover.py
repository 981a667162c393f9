"""Which replica a member call tries next, and what is tried again.

- Nothing sent (refused, connect time-out): the replica is marked down and the next one is asked.
  When a whole round got no answer, one more round follows after a jittered, growing back-off
  (``connect_retries`` rounds at most).
- Not ready (503): marked down; the next one is asked.
- Overloaded (503): the next one is asked, but no later round (busy replicas are not retried after a
  back-off); when none took the call the caller gets 503 with the soonest ``Retry-After`` given.
- A reply lost after the request went out: a prediction is a pure function of the image, so the call
  goes out once more - exactly once - to another ready replica (the same one when there is none),
  and that try is the last one sent. It goes out on a new connection: a replica leaving as the
  fleet scales in refuses that unsent (where a pooled keep-alive connection it is closing would
  lose it), which does not count, and the next ready one is asked. The replica stays in rotation: only
  a failed connect takes one out.
- No answer within the read time-out: never retried (it may still be running); 504.
- Anything else (the member's 4xx or 504, a broken contract): the call ends with it.
"""

from __future__ import annotations

import random
import time
from collections import deque

from common.errors import DeadlineExceeded, ModelUnavailable, Overloaded, ServiceError, UpstreamTimeout
from fleet.registry import Registry
from fleet.replica import Replica
from fleet.transport import NoAnswer, NotReady, NotSent, ReplyLost


class Failover:
    """The tries of one member call: iterate for the next replica, report each failed try."""

    def __init__(self, registry: Registry, model: str, *, connect_retries: int, backoff_s: float) -> None:
        self.registry = registry
        self.model = model
        self.reason = "no replicas configured"
        self._connect_retries = connect_retries
        self._backoff_s = backoff_s
        self._round = 0
        self._queue = deque(registry.candidates(model))
        self._last_try = False  # the one retry after a lost reply is under way
        self._retry_after: int | None = None  # the soonest an overloaded replica said to come back

    def __iter__(self) -> Failover:
        return self

    def __next__(self) -> Replica:
        if not self._queue:
            if self._last_try or self._retry_after is not None or self._round >= self._connect_retries:
                raise StopIteration
            self._round += 1  # every replica refused or was skipped: back off, then one more round
            time.sleep(self._backoff_s * 2 ** (self._round - 1) * random.uniform(0.5, 1.5))
            self._queue.extend(self.registry.candidates(self.model))
        return self._queue.popleft()

    @property
    def retrying_lost_reply(self) -> bool:
        """The one retry after a lost reply is under way: it goes out on a new connection."""
        return self._last_try

    def skip(self, reason: str) -> None:
        """The replica was passed over without a try (its circuit is open)."""
        self.reason = reason

    def failed(self, replica: Replica, outcome: BaseException) -> None:
        """Take in how a try ended: return to try on, or raise what ends the call."""
        if isinstance(outcome, NotSent | NotReady):
            self.registry.mark_down(replica)
            self.reason = "replica not ready" if isinstance(outcome, NotReady) else str(outcome)
        elif isinstance(outcome, Overloaded):
            soonest = outcome.retry_after if outcome.retry_after is not None else Overloaded.retry_after
            self._retry_after = soonest if self._retry_after is None else min(self._retry_after, soonest)
        elif isinstance(outcome, ReplyLost):
            self.reason = str(outcome)
            if self._last_try:
                self._queue.clear()  # the one retry went out and was lost too
            else:
                others = [r for r in self.registry.candidates(self.model) if r.ready and r.url != replica.url]
                self._queue = deque(others or [replica])
                self._last_try = True
        elif isinstance(outcome, NoAnswer):
            if outcome.clipped:
                raise DeadlineExceeded(f"{self.model} did not answer before the request's deadline") from None
            raise UpstreamTimeout(str(outcome)) from None
        else:
            raise outcome

    def give_up(self) -> ServiceError:
        """The error for a call no replica answered."""
        if self._retry_after is not None:
            return Overloaded(
                f"every replica of {self.model} is at capacity; retry shortly", retry_after=self._retry_after
            )
        return ModelUnavailable(f"{self.model} is unavailable: {self.reason}")
