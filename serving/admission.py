"""Admission by deadline, after Triton's queue policy: a request is taken only if it can be served
before its deadline.

Every request carries a deadline (the client's, or the service's default). Its estimated finish is
what is left of the batches running, plus the images queued ahead of it and its own images drained
in batches of ``max_batch`` at the speed measured for the batch sizes actually formed (``BatchTimes``,
seeded at warm-up), shared out over the ``streams`` that compute batches at once - but never sooner
than its own images alone would take on one of them. It is admitted when that finish is before its
deadline and the queue, counted in images, has room. Otherwise it is refused at once: 503
``overloaded`` with a ``Retry-After`` from the estimated drain time, jittered so refused clients do
not all return together; or, when the model is idle and still could not finish in time, 504
``deadline_exceeded`` (waiting would not help). Images still being decoded are not model work: they
count from the moment they join the queue. An idle model admits any request whose deadline it can
meet, so one large batch is never refused as overload.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from common.errors import DeadlineExceeded, Overloaded
from common.wire import timestamp


class BatchTimes:
    """Seconds per model call by batch size: moving averages of what was measured.

    Warm-up figures (``seed``) stand until that size is served: its first measured call replaces
    the seed outright rather than being averaged into it, since a warm-up runs while the other
    services of the machine warm up too and can only have been slowed. A size never measured is
    estimated from the nearest measured size at the same time per image (a conservative guess on a
    CPU, where bigger batches cost at most proportionally more). ``taken`` says, per size, whether
    its figure is a warm-up's or served calls', and when it was last taken.
    """

    def __init__(
        self, max_batch: int, smoothing: float = 0.2, clock: Callable[[], float] = time.time
    ) -> None:
        self.max_batch = max_batch
        self.smoothing = smoothing
        self.clock = clock
        self._seconds: dict[int, float] = {}
        self._seeded: set[int] = set()  # sizes whose figure is still the warm-up's
        self._taken_at: dict[int, float] = {}

    def seed(self, size: int, seconds: float) -> None:
        """A warm-up's figure for ``size``, until a served call of that size is measured."""
        size = max(1, min(size, self.max_batch))
        self._seconds[size] = seconds
        self._seeded.add(size)
        self._taken_at[size] = self.clock()

    def observe(self, size: int, seconds: float) -> None:
        size = max(1, min(size, self.max_batch))
        previous = None if size in self._seeded else self._seconds.get(size)
        self._seeded.discard(size)
        self._seconds[size] = (
            seconds if previous is None else (1 - self.smoothing) * previous + self.smoothing * seconds
        )
        self._taken_at[size] = self.clock()

    @property
    def known(self) -> bool:
        return bool(self._seconds)

    def seconds(self, size: int) -> float:
        """Expected time of one call on ``size`` images (0 while nothing has been measured)."""
        if size <= 0 or not self._seconds:
            return 0.0
        size = min(size, self.max_batch)
        if size in self._seconds:
            return self._seconds[size]
        nearest = min(self._seconds, key=lambda measured: (abs(measured - size), -measured))
        return self._seconds[nearest] / nearest * size

    def drain_seconds(self, images: int) -> float:
        """Time to compute ``images`` queued images, taken ``max_batch`` at a time."""
        full, rest = divmod(max(0, images), self.max_batch)
        return full * self.seconds(self.max_batch) + self.seconds(rest)

    def snapshot(self) -> dict[str, float]:
        """Milliseconds per call by batch size, for ``/v1/model``."""
        return {str(size): round(s * 1000, 2) for size, s in sorted(self._seconds.items())}

    def taken(self) -> dict[str, dict[str, str | None]]:
        """Per batch size, for ``/v1/model``: ``warm-up`` or ``served`` calls, and when (RFC 3339)."""
        return {
            str(size): {
                "from": "warm-up" if size in self._seeded else "served",
                "at": timestamp(self._taken_at.get(size)),
            }
            for size in sorted(self._seconds)
        }


@dataclass(frozen=True)
class AdmissionPolicy:
    """What a model service promises: finish before the deadline, with a bounded queue."""

    max_queue_images: int = 64
    """Images waiting for the model (not the batch running); beyond it, 503 at once."""
    retry_jitter: float = 0.5
    """Retry-After is the drain time times a random factor in [1, 1 + jitter]."""


@dataclass
class Load:
    """The model's work at one instant (a snapshot for estimates and ``/v1/model``)."""

    queued_images: int = 0
    running_images: int = 0
    running_left_s: float = 0.0  # of every batch running, added up


@dataclass(frozen=True, eq=False)
class Running:
    """One batch running: from ``Admission.started`` to its ``finished``."""

    images: int
    since: float
    expected_s: float


class Admission:
    """Counts the model's work and decides, per request, admit or refuse (thread-safe).

    The batcher reports what enters the queue and what starts and finishes running; request threads
    ask ``check`` before decoding (a cheap refusal) and ``enqueue`` when their images join the queue.
    """

    def __init__(
        self,
        policy: AdmissionPolicy,
        times: BatchTimes,
        name: str = "model",
        *,
        streams: int = 1,
        clock: Callable[[], float] = time.monotonic,
        uniform: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self.policy = policy
        self.times = times
        self.name = name
        self.streams = streams  # batches the model computes at once (the batcher sets it)
        self._clock = clock
        self._uniform = uniform
        self._lock = threading.Lock()
        self._queued = 0
        self._running: set[Running] = set()

    def load(self) -> Load:
        with self._lock:
            return self._load()

    def _load(self) -> Load:
        now = self._clock()
        left = sum(max(0.0, batch.expected_s - (now - batch.since)) for batch in self._running)
        return Load(self._queued, sum(batch.images for batch in self._running), left)

    def estimate_finish_s(self, images: int) -> float:
        """Seconds from now until a request of ``images`` joining the queue now would be answered."""
        with self._lock:
            return self._finish_s(self._load(), images)

    def _finish_s(self, load: Load, images: int) -> float:
        ahead = load.running_left_s + self.times.drain_seconds(load.queued_images + images)
        return max(ahead / self.streams, self.times.drain_seconds(images))

    def check(self, images: int, deadline: float) -> None:
        """Raise ``Overloaded`` or ``DeadlineExceeded`` unless ``images`` could be served by ``deadline``
        (``time.monotonic()``) if they joined the queue now."""
        with self._lock:
            self._decide(images, deadline)

    def enqueue(self, images: int, deadline: float) -> None:
        """Decide once more (others may have joined meanwhile) and count ``images`` as queued."""
        with self._lock:
            self._decide(images, deadline)
            self._queued += images

    def _decide(self, images: int, deadline: float) -> None:
        load = self._load()
        idle = not load.queued_images and not load.running_images
        if not idle and load.queued_images + images > self.policy.max_queue_images:
            raise self._overloaded(
                load,
                "queue_full",
                f"{self.name}'s queue is full ({load.queued_images} images waiting, "
                f"limit {self.policy.max_queue_images})",
            )
        if not self.times.known:
            return  # nothing measured yet: nothing to promise either way
        left_s = deadline - self._clock()
        finish_s = self._finish_s(load, images)
        if finish_s <= left_s:
            return
        if idle:
            raise DeadlineExceeded(
                f"{self.name} needs ~{finish_s * 1000:.0f} ms for {images} image(s); "
                f"the deadline leaves {max(0.0, left_s) * 1000:.0f} ms"
            )
        raise self._overloaded(
            load,
            "deadline",
            f"{self.name} cannot finish this request before its deadline "
            f"(~{finish_s * 1000:.0f} ms of work ahead and its own, {max(0.0, left_s) * 1000:.0f} ms left)",
        )

    def _overloaded(self, load: Load, reason: str, message: str) -> Overloaded:
        drain_s = self._finish_s(load, 0)
        retry_after = max(1, math.ceil(drain_s * self._uniform(1.0, 1.0 + self.policy.retry_jitter)))
        return Overloaded(f"{message}; retry in ~{retry_after} s", retry_after=retry_after, reason=reason)

    def dropped(self, images: int) -> None:
        """Queued images that left without running (their deadline passed while they waited)."""
        with self._lock:
            self._queued -= images

    def started(self, images: int) -> Running:
        """A batch of ``images`` left the queue and started running; hand it to ``finished``."""
        with self._lock:
            self._queued -= images
            batch = Running(images, self._clock(), self.times.seconds(images))
            self._running.add(batch)
            return batch

    def finished(self, batch: Running, seconds: float | None) -> None:
        """``batch`` ended; ``seconds`` is its measured time (None when it failed)."""
        with self._lock:
            self._running.discard(batch)
            if seconds is not None:
                self.times.observe(batch.images, seconds)
