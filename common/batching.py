"""Adaptive batching: many request threads, one model call per batch.

Requests (each one or more images) go into a bounded queue; one worker thread takes the first,
drains whatever else is already waiting (up to ``max_batch`` images), and - only when traffic is
concurrent - waits up to ``max_wait_ms`` after the first arrival for more, a budget that shrinks as
time passes and ends as soon as the batch is full. Light traffic therefore pays no batching tax,
heavy traffic gets full batches. Each request gets its own future; a failed batch fails every
waiter with the same error; a full queue is refused at once (503 + Retry-After).

Admission (``admit``) sheds load before any work is done: a request is refused when the images
already admitted ahead of it - decoding, queued or running - would take longer than ``max_delay_ms``
or its own inference, whichever is longer, at the measured speed (a moving average of model time
per image). An accepted request therefore waits at most about as long as it computes: on a CPU that
keeps one request running and one waiting; on a GPU, where images are cheap, many may wait. An idle
model admits anything, so one large batch is never refused.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from common import metrics
from common.errors import DeadlineExceeded, Overloaded

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One request's place in the queue: its inputs, its future, and when it waited."""

    inputs: np.ndarray
    future: Future[np.ndarray] = field(default_factory=Future)
    enqueued_at: float = field(default_factory=time.monotonic)
    started_at: float = 0.0
    deadline: float = float("inf")  # time.monotonic() after which the answer is useless
    served_by: object = None  # the tag of the model that computed it (see Batcher.swap)

    @property
    def queue_ms(self) -> float:
        return max(0.0, self.started_at - self.enqueued_at) * 1000


@dataclass
class BatchStats:
    """Counters in the spirit of Triton's inference_count / exec_count."""

    requests: int = 0
    images: int = 0
    batches: int = 0
    rejected: int = 0  # queue full
    shed: int = 0  # refused at admission: too much work ahead
    expired: int = 0
    largest_batch: int = 0
    admitted_images: int = 0  # in the pipeline now: decoding, queued or running
    ms_per_image: float = 0.0  # moving average of model time per image


class Batcher:
    def __init__(
        self,
        predict: Callable[[np.ndarray], np.ndarray],
        *,
        max_batch: int = 8,
        max_wait_ms: float = 5.0,
        max_queue: int = 64,
        max_delay_ms: float = float("inf"),
        name: str = "model",
    ) -> None:
        self._current: tuple[Callable[[np.ndarray], np.ndarray], object] = (predict, None)
        self.name = name
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        self.max_delay_ms = max_delay_ms
        self._admission = threading.Lock()
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self._carry: Job | None = None  # taken from the queue but did not fit the last batch
        self._concurrent = False
        self.stats = BatchStats()
        self._thread = threading.Thread(target=self._run, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    def swap(self, predict: Callable[[np.ndarray], np.ndarray], tag: object) -> None:
        """Serve the next batches with ``predict``; the batch running now finishes on the old one.
        Every job records the ``tag`` of the model that computed it."""
        self._current = (predict, tag)  # one reference assignment: atomic

    @contextmanager
    def admit(self, images: int) -> Iterator[None]:
        """Hold ``images`` places in the pipeline for the ``with`` block, or raise ``Overloaded``."""
        with self._admission:
            ahead_ms = self.stats.admitted_images * self.stats.ms_per_image
            own_ms = images * self.stats.ms_per_image
            if self.stats.admitted_images and ahead_ms > max(self.max_delay_ms, own_ms):
                self.stats.shed += 1
                metrics.SHED.labels(self.name, "overloaded").inc()
                raise Overloaded(
                    f"{self.name} is at capacity (~{ahead_ms:.0f} ms of work ahead, "
                    f"limit {self.max_delay_ms:g} ms); retry shortly"
                )
            self.stats.admitted_images += images
        pending = metrics.PENDING.labels(self.name)
        pending.inc(images)
        try:
            yield
        finally:
            pending.dec(images)
            with self._admission:
                self.stats.admitted_images -= images

    def submit(self, inputs: np.ndarray, deadline: float = float("inf")) -> Job:
        """Queue ``inputs`` (one or more preprocessed images); ``job.future`` resolves to their outputs.

        A job still waiting at ``deadline`` (``time.monotonic()``) is dropped, not computed.
        """
        request = Job(inputs, deadline=deadline)
        try:
            self._queue.put_nowait(request)
        except queue.Full:
            self.stats.rejected += 1
            metrics.SHED.labels(self.name, "queue_full").inc()
            raise Overloaded(
                f"the model queue is full ({self._queue.maxsize} requests waiting); retry shortly"
            ) from None
        return request

    def _drop_expired(self, batch: list[Job]) -> list[Job]:
        now = time.monotonic()
        for job in batch:
            if job.deadline <= now:
                self.stats.expired += 1
                metrics.SHED.labels(self.name, "deadline").inc()
                job.future.set_exception(DeadlineExceeded("the request's deadline passed while it waited"))
        return [job for job in batch if job.deadline > now]

    def _collect(self) -> list[Job]:
        first = self._carry or self._queue.get()
        self._carry = None
        batch, size = [first], len(first.inputs)
        deadline = first.enqueued_at + self.max_wait_s
        while size < self.max_batch:
            try:
                if not self._queue.empty() or not self._concurrent:
                    request = self._queue.get_nowait()
                else:
                    request = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if size + len(request.inputs) > self.max_batch:
                self._carry = request  # first in line for the next batch
                break
            batch.append(request)
            size += len(request.inputs)
        return batch

    def _run(self) -> None:
        while True:
            batch = self._drop_expired(self._collect())
            if not batch:
                continue
            self._concurrent = len(batch) > 1 or self._carry is not None or not self._queue.empty()
            inputs = batch[0].inputs if len(batch) == 1 else np.concatenate([r.inputs for r in batch])
            started = time.monotonic()
            predict, tag = self._current
            for request in batch:
                request.started_at = started
                request.served_by = tag
            try:
                outputs = predict(inputs)
            except BaseException as exc:  # deliver the failure to every waiter, keep serving
                log.exception("batch of %d images failed", len(inputs))
                for request in batch:
                    request.future.set_exception(exc)
                continue
            self.stats.requests += len(batch)
            self.stats.images += len(inputs)
            self.stats.batches += 1
            self.stats.largest_batch = max(self.stats.largest_batch, len(inputs))
            elapsed = time.monotonic() - started
            metrics.INFERENCE_SECONDS.labels(self.name).observe(elapsed)
            metrics.BATCH_SIZE.labels(self.name).observe(len(inputs))
            metrics.INFERENCES.labels(self.name).inc(len(inputs))
            metrics.EXECUTIONS.labels(self.name).inc()
            per_image_ms = elapsed * 1000 / len(inputs)
            average = self.stats.ms_per_image
            self.stats.ms_per_image = per_image_ms if not average else 0.8 * average + 0.2 * per_image_ms
            offset = 0
            for request in batch:
                request.future.set_result(outputs[offset : offset + len(request.inputs)])
                offset += len(request.inputs)
