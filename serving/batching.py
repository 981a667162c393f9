"""Adaptive batching: many request threads, one model call per batch.

Interactive requests (each one or more images) wait in one FIFO queue; a worker thread takes the
first, drains whatever else is already waiting (up to ``max_batch`` images), and - only when traffic
is concurrent - waits up to ``window_ms`` after the first arrival for more (Triton's
``max_queue_delay``), a budget that ends as soon as the batch is full. Light traffic pays no batching
tax; under load the queue that builds while the model runs makes full batches. A runtime that
computes several batches at once (OpenVINO streams: ``run_at_once``) gets a worker thread per
stream; they take their batches from the queue one at a time, so one collects the next batch while
the others' run. Each request gets its own future; a failed batch fails every waiter with the same
error; a request whose deadline passed while it waited is dropped, not computed. What may join the
queue is decided by the admission policy (``serving/admission.py``); the batcher tells it what
enters, starts and finishes, and how long each batch size took.

Requests of ``Priority.BACKGROUND`` (asynchronous jobs) wait in a second FIFO queue, served only when no
interactive request waits (Triton's priority levels). A job request is already a batch its sender
chose, so it runs alone: never merged with another job request, never with interactive ones. An
interactive request therefore waits behind at most the one job request running. Under unbroken
interactive load a job request would wait for ever, so one that has waited ``background_max_wait_ms``
goes before the interactive queue (aging, against starvation): a saturated model gives jobs and
training one call per that period, and interactive requests lose no more than that call.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common import metrics
from common.errors import DeadlineExceeded, ModelNotReady, Overloaded
from common.wire import Priority
from serving.admission import Admission, AdmissionPolicy, BatchTimes

log = logging.getLogger(__name__)


Rows = Any
"""What a batch's call returns: one row per image - an array, or ``serving.runtime.Outputs`` - that
the batcher slices back into each request's rows."""


@dataclass
class Waiting:
    """One request's place in the queue: its images, its future, and when it waited."""

    inputs: np.ndarray
    future: Future[Rows] = field(default_factory=Future)
    enqueued_at: float = field(default_factory=time.monotonic)
    started_at: float = 0.0
    deadline: float = float("inf")  # time.monotonic() after which the answer is useless
    priority: Priority = Priority.INTERACTIVE

    @property
    def queue_ms(self) -> float:
        return max(0.0, self.started_at - self.enqueued_at) * 1000


@dataclass
class BatchStats:
    """Counters in the spirit of Triton's inference_count / exec_count."""

    requests: int = 0
    images: int = 0
    batches: int = 0
    shed: int = 0  # refused by admission (queue full, or it could not meet the deadline)
    expired: int = 0  # dropped from the queue: the deadline passed while waiting
    largest_batch: int = 0

    @property
    def average_batch(self) -> float:
        return round(self.images / self.batches, 2) if self.batches else 0.0


class BatcherClosed(ModelNotReady):
    """The batcher was closed: its model was replaced or removed (look the model up again)."""


def _closed(batch: np.ndarray) -> Rows:
    raise BatcherClosed("this model was replaced or removed")


class Batcher:
    def __init__(
        self,
        predict: Callable[[np.ndarray], Rows],
        *,
        max_batch: int = 8,
        window_ms: float = 5.0,
        policy: AdmissionPolicy | None = None,
        name: str = "model",
        background_max_wait_ms: float = 1000.0,
        background_idle_ms: float = 20.0,
    ) -> None:
        self._predict = predict
        self.name = name
        self.background_max_wait_s = background_max_wait_ms / 1000
        self.background_idle_s = background_idle_ms / 1000
        self._interactive_done = float("-inf")  # when the last interactive batch finished
        self._aged_at = float("-inf")  # when a background call last went first by aging
        self.max_batch = max_batch
        self.window_s = window_ms / 1000
        self.times = BatchTimes(max_batch)
        self.admission = Admission(policy or AdmissionPolicy(), self.times, name)
        self._waiting: dict[Priority, deque[Waiting]] = {priority: deque() for priority in Priority}
        self._arrived = threading.Condition()  # guards _waiting; notified on every arrival
        self._carry: Waiting | None = None  # interactive, taken but did not fit the last batch
        self._concurrent = False
        self._closed = False
        self.stats = BatchStats()
        self._collecting = threading.Lock()  # one worker forms a batch at a time
        self._counting = threading.Lock()  # guards stats, and _working
        self._threads: list[threading.Thread] = []
        self._working = 0
        self._start_worker()

    @property
    def streams(self) -> int:
        """Batches computed at once: one per worker thread."""
        return len(self._threads)

    def run_at_once(self, streams: int) -> None:
        """Compute up to ``streams`` batches at once (what the runtime said it can, once loaded):
        start the worker threads missing, and let admission count on them."""
        with self._arrived:
            if self._closed:
                return
            while len(self._threads) < streams:
                self._start_worker()
            self.admission.streams = len(self._threads)

    def _start_worker(self) -> None:
        number = len(self._threads) + 1
        thread = threading.Thread(target=self._run, name=f"batcher-{self.name}-{number}", daemon=True)
        with self._counting:
            self._working += 1
        self._threads.append(thread)
        thread.start()

    def join(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the worker threads to end (after ``close``); True
        when none is left."""
        ends = time.monotonic() + timeout
        for thread in list(self._threads):
            thread.join(max(0.0, ends - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)

    def close(self) -> None:
        """Stop once the requests already queued are answered (a replaced or removed model's batcher):
        its thread ends and lets go of the model; a later ``submit`` raises ``BatcherClosed``, on
        which the service sends the request to the model's successor."""
        with self._arrived:
            self._closed = True
            self._arrived.notify_all()

    def check(self, images: int, deadline: float) -> None:
        """Refuse now (``Overloaded``, ``DeadlineExceeded``) a request that could not be served in
        time: called before decoding, so a refusal costs microseconds."""
        with self._counting_refusals():
            self.admission.check(images, deadline)

    @contextmanager
    def _counting_refusals(self) -> Iterator[None]:
        """Count an admission refusal raised in the block (stats and metrics), then let it through."""
        try:
            yield
        except (Overloaded, DeadlineExceeded) as exc:
            self.stats.shed += 1
            reason = exc.reason if isinstance(exc, Overloaded) else "deadline_unmeetable"
            metrics.SHED.labels(self.name, reason).inc()
            raise

    def submit(
        self,
        inputs: np.ndarray,
        deadline: float = float("inf"),
        priority: Priority | str = Priority.INTERACTIVE,
    ) -> Waiting:
        """Queue ``inputs`` (one or more images); the ``future`` of what it returns resolves to their
        outputs.

        Admission decides once more; a request still waiting at ``deadline`` is dropped, not computed.
        A ``Priority.BACKGROUND`` request runs alone, after every interactive request waiting (see module).
        """
        level = Priority(priority)  # "background" as well as Priority.BACKGROUND; else a ValueError
        with self._counting_refusals():
            self.admission.enqueue(len(inputs), deadline)
        waiting = Waiting(inputs, deadline=deadline, priority=level)
        with self._arrived:
            if self._closed:
                self.admission.dropped(len(inputs))
                raise BatcherClosed(f"{self.name} was replaced or removed just now: send the request again")
            metrics.PENDING.labels(self.name).inc(len(inputs))
            self._waiting[level].append(waiting)
            self._arrived.notify()
        return waiting

    def _take(self) -> Waiting | None:
        """The oldest interactive request waiting, else the oldest background one (blocks till one;
        None once closed and empty); a background one first when it has waited
        ``background_max_wait_s``, and not before interactive batches have paused for
        ``background_idle_s``."""
        with self._arrived:
            while True:
                jobs = self._waiting[Priority.BACKGROUND]
                # aging: one call per period, counted from the later of its arrival and the last aged call
                waited_since = max(jobs[0].enqueued_at, self._aged_at) if jobs else 0.0
                if jobs and time.monotonic() - waited_since >= self.background_max_wait_s:
                    self._aged_at = time.monotonic()
                    return jobs.popleft()
                if self._waiting[Priority.INTERACTIVE]:
                    return self._waiting[Priority.INTERACTIVE].popleft()
                if jobs:
                    quiet = time.monotonic() - self._interactive_done
                    if quiet >= self.background_idle_s:
                        return jobs.popleft()
                    aged = self.background_max_wait_s - (time.monotonic() - waited_since)
                    self._arrived.wait(max(0.0, min(self.background_idle_s - quiet, aged)))
                    continue
                if self._closed:
                    return None
                self._arrived.wait()

    def _take_interactive(self, timeout: float) -> Waiting | None:
        """The oldest interactive request, waiting up to ``timeout`` seconds for one; None if none came."""
        interactive = self._waiting[Priority.INTERACTIVE]
        with self._arrived:
            if timeout > 0:
                self._arrived.wait_for(lambda: interactive, timeout)
            return interactive.popleft() if interactive else None

    def _interactive_waiting(self) -> bool:
        with self._arrived:
            return self._carry is not None or bool(self._waiting[Priority.INTERACTIVE])

    def _drop_expired(self, batch: list[Waiting]) -> list[Waiting]:
        now = time.monotonic()
        kept = []
        for waiting in batch:
            if waiting.deadline > now:
                kept.append(waiting)
                continue
            self.stats.expired += 1
            metrics.SHED.labels(self.name, "deadline").inc()
            metrics.PENDING.labels(self.name).dec(len(waiting.inputs))
            self.admission.dropped(len(waiting.inputs))
            waiting.future.set_exception(DeadlineExceeded("the request's deadline passed while it waited"))
        return kept

    def _collect(self) -> list[Waiting] | None:
        with self._collecting:
            return self._form_batch()

    def _form_batch(self) -> list[Waiting] | None:
        first = self._carry or self._take()
        self._carry = None
        if first is None:
            return None
        if first.priority is Priority.BACKGROUND:
            return [first]  # chosen by its sender: runs alone
        batch, size = [first], len(first.inputs)
        deadline = first.enqueued_at + self.window_s
        while size < self.max_batch:
            wait_s = max(0.0, deadline - time.monotonic()) if self._concurrent else 0.0
            request = self._take_interactive(wait_s)
            if request is None:
                break
            if size + len(request.inputs) > self.max_batch:
                self._carry = request  # first in line for the next batch
                break
            batch.append(request)
            size += len(request.inputs)
        return batch

    def _run(self) -> None:
        while (collected := self._collect()) is not None:
            batch = self._drop_expired(collected)
            if batch:
                self._execute(batch)
        with self._counting:
            self._working -= 1
            last = not self._working
        if last:
            self._predict = _closed  # let go of the model
            log.info("batcher %s closed", self.name)

    def _execute(self, batch: list[Waiting]) -> None:
        if batch[0].priority is Priority.INTERACTIVE:  # job requests say nothing of interactive load
            self._concurrent = len(batch) > 1 or self._interactive_waiting()
        inputs = batch[0].inputs if len(batch) == 1 else np.concatenate([r.inputs for r in batch])
        size = len(inputs)
        predict = self._predict
        running = self.admission.started(size)
        metrics.PENDING.labels(self.name).dec(size)
        started = time.monotonic()
        for request in batch:
            request.started_at = started
        try:
            outputs = predict(inputs)
        except BaseException as exc:  # deliver the failure to every waiter, keep serving
            self.admission.finished(running, None)
            log.exception("batch of %d images failed", size)
            for request in batch:
                request.future.set_exception(exc)
            return
        elapsed = time.monotonic() - started
        self.admission.finished(running, elapsed)
        with self._counting:
            self.stats.requests += len(batch)
            self.stats.images += size
            self.stats.batches += 1
            self.stats.largest_batch = max(self.stats.largest_batch, size)
        if batch[0].priority is Priority.INTERACTIVE:
            self._interactive_done = time.monotonic()
        metrics.INFERENCE_SECONDS.labels(self.name).observe(elapsed)
        metrics.BATCH_SIZE.labels(self.name).observe(size)
        metrics.INFERENCES.labels(self.name).inc(size)
        metrics.EXECUTIONS.labels(self.name).inc()
        offset = 0
        for request in batch:
            request.future.set_result(outputs[offset : offset + len(request.inputs)])
            offset += len(request.inputs)

    def describe(self) -> dict[str, object]:
        """The batching and admission state, for ``/v1/model``."""
        load = self.admission.load()
        with self._arrived:
            background = self._waiting[Priority.BACKGROUND]
            queued_background_images = sum(len(waiting.inputs) for waiting in background)
        return {
            "max_batch_size": self.max_batch,
            "streams": self.streams,
            "window_ms": self.window_s * 1000,
            "max_queue_images": self.admission.policy.max_queue_images,
            "queued_images": load.queued_images,
            "queued_background_images": queued_background_images,
            "running_images": load.running_images,
            "batch_ms": self.times.snapshot(),
            "batch_ms_taken": self.times.taken(),
            "requests": self.stats.requests,
            "images": self.stats.images,
            "batches": self.stats.batches,
            "average_batch": self.stats.average_batch,
            "largest_batch": self.stats.largest_batch,
            "shed": self.stats.shed,
            "expired": self.stats.expired,
        }
