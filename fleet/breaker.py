"""A circuit breaker per replica that never serialises the calls it guards.

Written here because neither well-kept library fits a threaded client: pybreaker holds one lock
across the whole guarded call, so one breaker lets one request through at a time
(danielfm/pybreaker#3; the PRs removing it, #40/#41/#57/#77, were closed), and circuitbreaker has no
locking at all (fabfuel/circuitbreaker#61). Here the lock guards only the state changes.

closed -> ``fail_max`` consecutive failures -> open (calls refused) -> after ``reset_s`` one trial
call (half-open) -> closed if it succeeds, open for another ``reset_s`` if it fails. A call that
ends without a verdict (``release``: the replica was busy, or the client's budget ran out) neither
counts nor forgives; in half-open state it hands the trial to the next call.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"


class Breaker:
    """One replica's circuit; every call it allows ends in ``success``, ``failure`` or ``release``."""

    def __init__(self, fail_max: int, reset_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.fail_max = fail_max
        self.reset_s = reset_s
        self._clock = clock
        self._lock = threading.Lock()
        self.state = CLOSED
        self.failures = 0  # consecutive
        self._opened_at = 0.0
        self._trial_out = False  # half-open: the one trial call is in flight

    def allow(self) -> bool:
        """May a call go out now? In half-open state only the one trial call may."""
        with self._lock:
            if self.state == OPEN and self._clock() - self._opened_at >= self.reset_s:
                self.state, self._trial_out = HALF_OPEN, False
            if self.state == HALF_OPEN and not self._trial_out:
                self._trial_out = True
                return True
            return self.state == CLOSED

    def success(self) -> None:
        """The replica answered as a healthy one does: close the circuit, forget the failures."""
        with self._lock:
            self.state, self.failures = CLOSED, 0

    def failure(self) -> None:
        """The replica failed the call: one more consecutive failure; a failed trial reopens."""
        with self._lock:
            self.failures += 1
            if self.state == HALF_OPEN or self.failures >= self.fail_max:
                self.state, self._opened_at = OPEN, self._clock()

    def release(self) -> None:
        """The call ended without a verdict on the replica: a half-open circuit awaits another trial."""
        with self._lock:
            if self.state == HALF_OPEN:
                self._trial_out = False
