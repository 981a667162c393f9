"""Running one chunk of a job: read its images, classify them through the gateway's own client
logic, write the results, record the chunk. No Celery here (``workers.app`` wraps it), so it is
tested with a fake predictor and a real Redis.

A chunk's images go to the models ``JOBS_BATCH_IMAGES`` at a time at *background* priority: a model
service runs every waiting interactive request before them and never merges two of them, so an
interactive client waits behind at most one small job call. Between calls the runner checks that
the job was not cancelled. A model that answers 503 (overloaded, not ready, no quorum) or fails
(502, 504) is retried after its ``Retry-After`` (else a back-off); a chunk that cannot finish
within ``JOBS_CHUNK_BUDGET_S`` is put back on the queue (``Requeue``) rather than held past the
visibility timeout, and after ``JOBS_RETRY_S`` of that its remaining images fail with the last
error. A request-level 4xx fails the call's images at once; an image the models refuse (not an
image, too large, poisonous) fails alone, the job goes on.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from common.errors import ServiceError
from common.jobs.settings import JobSettings
from common.jobs.store import ACTIVE, JobStore
from common.outcomes import Failed, Outcome, Selection, error_from_json
from common.wire import Priority
from fleet.fetch import UrlFetcher
from fleet.predict import ImageInput, Predictor
from workers import callbacks

log = logging.getLogger("imagerec.jobs")
RETRYABLE = (500, 502, 503, 504)


class Requeue(Exception):
    """The chunk ran out of its time budget: queue it again in ``countdown_s``."""

    def __init__(self, countdown_s: float) -> None:
        super().__init__(f"requeue in {countdown_s:.1f}s")
        self.countdown_s = countdown_s


class Cancelled(Exception):
    """The job was cancelled (or expired) while its chunk ran."""


@dataclass(frozen=True)
class ChunkOutcome:
    """What became of a chunk: ``recorded`` (its results were counted now), ``finished`` (it
    ended the job), or ``skipped`` with the reason."""

    recorded: bool = False
    finished: bool = False
    skipped: str = ""


class ChunkRunner:
    def __init__(
        self,
        store: JobStore,
        predictor: Predictor,
        fetcher: UrlFetcher,
        settings: JobSettings,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        is_live: Callable[[str], bool] = lambda owner: True,
    ) -> None:
        """``is_live``: whether a job's owner still has a key (``KeyStore.is_live``): a revoked
        principal's jobs are cancelled at the next chunk or batch."""
        self.is_live = is_live
        self.store = store
        self.predictor = predictor
        self.fetcher = fetcher
        self.settings = settings
        self.sleep = sleep
        self.clock = clock

    def run(self, job_id: str, chunk: int, *, final: bool = False) -> ChunkOutcome:
        """Classify chunk ``chunk`` of ``job_id``. With ``final`` (its retries are spent), models
        that stay down fail the remaining images instead of requeueing the chunk."""
        job = self.store.get(job_id)
        if job is None:
            return ChunkOutcome(skipped="expired")
        if job["status"] not in ACTIVE:
            return ChunkOutcome(skipped=job["status"])
        if not self.is_live(str(job.get("owner") or "admin")):
            self.store.finish(job_id, "cancelled", {"error": "key_revoked"})
            return ChunkOutcome(skipped="key revoked")
        if self.store.chunk_done(job_id, chunk):
            return ChunkOutcome(skipped="already recorded")
        self.store.mark_running(job_id)
        items = self.store.chunk_items(job_id, chunk)
        budget_end = self.clock() + self.settings.chunk_budget_s
        outcomes: list[Outcome] = []
        weights: dict[str, Any] = {}
        try:
            selection: Selection | None = Selection.from_json(job.get("selection") or {})
        except ValueError:  # a record this version cannot read: every image fails with why
            selection, failure = (
                None,
                ServiceError(
                    "the job's record names its models in a form this worker cannot read; submit it again",
                    code="unreadable_job",
                    status=422,
                ),
            )
        size = self.settings.batch_images
        for start in range(0, len(items), size):
            batch = items[start : start + size]
            if start and self._cancelled(job_id):
                raise Cancelled(job_id)
            if selection is None:
                outcomes += [_failed(item, failure) for item in batch]
                continue
            outcomes += self._classify(job, selection, batch, budget_end, weights, final)
        self.store.write_results(job_id, chunk, outcomes)
        failed = sum(isinstance(o, Failed) for o in outcomes)
        recorded = self.store.record(job_id, chunk, len(outcomes) - failed, failed, weights or None)
        if recorded.finished:  # delivered outside the task: a slow callback host holds no worker
            callbacks.due(self.store.redis, job_id, self.settings.callback_queue_max)
        return ChunkOutcome(recorded=recorded.first, finished=recorded.finished)

    def _cancelled(self, job_id: str) -> bool:
        job = self.store.get(job_id)
        if job is not None and not self.is_live(str(job.get("owner") or "admin")):
            self.store.finish(job_id, "cancelled", {"error": "key_revoked"})
            return True
        return job is None or job["status"] not in ACTIVE

    def _load(self, job_id: str, batch: list[dict[str, Any]], budget_end: float) -> list[ImageInput]:
        """The batch's images: files from the job's folder, URLs fetched now (same SSRF rules as
        the gateway's) within what is left of the chunk's budget - a job of slow URLs cannot
        outlive its chunk's budget, or the visibility timeout behind it - and errors found at
        submission kept on their items."""
        folder = self.store.folder(job_id)
        urls = [item["url"] for item in batch if "url" in item]
        deadline = time.monotonic() + max(0.0, budget_end - self.clock())  # self.clock may be a fake
        fetched = iter(self.fetcher.fetch_all(urls, deadline) if urls else [])
        inputs = []
        for item in batch:
            if "error" in item:
                inputs.append(ImageInput(item["name"], error=error_from_json(item["error"])))
            elif "url" in item:
                found = next(fetched)
                if isinstance(found, ServiceError):
                    inputs.append(ImageInput(item["name"], error=found))
                else:
                    inputs.append(ImageInput(item["name"], found))
            else:
                inputs.append(ImageInput(item["name"], (folder / item["file"]).read_bytes()))
        return inputs

    def _classify(
        self,
        job: dict[str, Any],
        selection: Selection,
        batch: list[dict[str, Any]],
        budget_end: float,
        weights: dict[str, Any],
        final: bool,
    ) -> list[Outcome]:
        inputs = self._load(job["id"], batch, budget_end)
        backoff = 0.5
        while True:
            try:
                prediction = self.predictor.predict(
                    selection,
                    inputs,
                    top_k=job["top_k"],
                    request_id=f"job-{job['id'][:12]}-{batch[0]['index']}",
                    deadline=budget_end,
                    priority=Priority.BACKGROUND,
                )
                break
            except ServiceError as exc:
                if exc.status not in RETRYABLE:
                    return [_failed(item, exc) for item in batch]
                wait = float(exc.retry_after or backoff) * random.uniform(1.0, 1.5)
                backoff = min(backoff * 2, 5.0)
                if self.clock() + wait >= budget_end:
                    if final:
                        return [_failed(item, exc) for item in batch]
                    log.info(
                        "job chunk out of time: requeued", extra={"job_id": job["id"], "reason": exc.code}
                    )
                    raise Requeue(wait) from None
                self.sleep(wait)
        for member, served in prediction.served.items():
            weights.setdefault(member, served.weights)
        # each outcome at its place in the whole job, not in this call
        return [
            replace(outcome, index=item["index"], name=item["name"])
            for outcome, item in zip(prediction.outcomes, batch, strict=True)
        ]


def _failed(item: dict[str, Any], exc: ServiceError) -> Failed:
    return Failed(item["index"], item["name"], exc)
