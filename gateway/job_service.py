"""The job service behind the job and training routes: the store and queue (connected on first
use: Redis may come later), quota admission, a job's opening (its folder, record and tasks, or
nothing), its items and record as written for the workers, and the job metrics collector.
Results output is ``gateway.job_results``; the routes are ``gateway.jobs`` and ``gateway.training``."""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis
from flask import Response, request
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from common import web
from common.errors import BadRequest, ServiceError
from common.jobs import queue
from common.jobs.fair import FairQueue
from common.jobs.settings import JobSettings
from common.jobs.store import JobStore, JobStoreUnavailable, connect
from common.jobs.views import describe
from common.outcomes import Selection
from common.tenancy.quotas import QuotaBook, Reservation
from common.tenancy.settings import QuotaSettings
from gateway.auth import Auth


class JobsUnavailable(ServiceError):
    status, code, retry_after = 503, "jobs_unavailable", 5


class JobNotActive(ServiceError):
    status, code = 409, "job_not_active"


def check_callback(url: str) -> str:
    """A callback URL must be http(s) with a host; its address is checked (public, or allowed)
    when it is called, by the same rules as image URLs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        raise BadRequest("malformed callback_url") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or len(url) > 2000:
        raise BadRequest("callback_url must be an http:// or https:// URL with a host (no credentials)")
    return url


class Jobs:
    """The routes' state: the store and the queue, connected on first use (Redis may come later)."""

    def __init__(self, settings: JobSettings, training_queue: str, quotas: QuotaSettings, auth: Auth) -> None:
        self.settings = settings
        self.auth = auth
        self.training_queue = training_queue
        self.quota_settings = quotas
        self._store: JobStore | None = None
        self._queue: Any = None
        self._quotas: QuotaBook | None = None
        self._fair: FairQueue | None = None

    @property
    def store(self) -> JobStore:
        if not self.settings.redis_url:
            raise JobsUnavailable("asynchronous jobs need Redis: set REDIS_URL (or JOBS_REDIS_URL)")
        if self._store is None:
            client = connect(self.settings.redis_url, retries=2)
            self._store = JobStore(client, Path(self.settings.dir), self.settings.retention_s)
            self._queue = queue.create(self.settings, self.training_queue)
        return self._store

    @property
    def quotas(self) -> QuotaBook:
        """The quota checks, over the jobs' Redis (after ``store``)."""
        if self._quotas is None:
            self._quotas = QuotaBook(self.quota_settings, self.store.redis)
        return self._quotas

    @property
    def fair(self) -> FairQueue:
        """The principals' job backlogs, over the jobs' Redis (after ``store``)."""
        if self._fair is None:
            self._fair = FairQueue.of(self.store.redis, self.settings)
        return self._fair

    def reserve(self, fleet_max_images: int, *, training: bool) -> Reservation:
        """The caller's place for one more job, and the bytes its Content-Length declares, taken
        before its upload is read (429 or 507 when they do not fit); more is reserved as the
        upload writes more (unpacked archives)."""
        directory = Path(self.settings.dir)
        declared = min(request.content_length or 0, self.settings.max_archive_bytes)
        return store_call(
            lambda: self.quotas.reserve(
                self.auth.principal(), directory, fleet_max_images, training=training, declared=declared
            )
        )

    @property
    def queue(self) -> Any:
        """The Celery application tasks are sent with (connected with the store)."""
        self.store  # noqa: B018 - connects both, or says why it cannot
        return self._queue

    def open(
        self,
        job_id: str,
        staged: Path,
        record: dict[str, Any],
        send: Callable[[], None],
        reservation: Reservation,
    ) -> Response:
        """Write the job (its staged folder moved into place, its record, owned by the caller),
        hand it what ``reservation`` holds and queue it with ``send``, then answer 202: no job
        without its tasks - the broker is Redis too - and nothing left behind when a step fails."""
        principal = self.auth.principal()
        record = {**record, "owner": principal.id, "owner_name": principal.name}
        try:
            job = store_call(self.store.create, job_id, staged, record)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        try:
            store_call(reservation.commit, job_id, int(record["input_bytes"]), float(job["expires_at"]))
            send()
        except ServiceError:
            self._discard(job_id, reservation)
            raise
        except Exception as exc:
            self._discard(job_id, reservation)
            raise JobsUnavailable(f"the job could not be queued: {type(exc).__name__}") from None
        self.auth.audit(
            f"{record['kind']}.submit", job_id, model=str(record.get("model", "")), images=record["total"]
        )
        response = web.json_ok(describe(job), status=202)
        response.headers["Location"] = f"/v1/jobs/{job_id}"
        return response

    def _discard(self, job_id: str, reservation: Reservation) -> None:
        try:
            reservation.forget(job_id)
            self.store.discard(job_id)
        except Exception:  # Redis went away too: the sweeper removes the folder when it expires
            pass

    def enqueue(self, job_id: str, chunks: int) -> None:
        """The job's chunks into its owner's backlog; the ones its share allows to Celery now."""
        queue.send(self.queue, self.fair.submit(self.auth.principal().id, job_id, range(chunks), time.time()))


class JobMetrics:
    """Job figures read from Redis at scrape time: jobs by state, images finished (rate() of it is
    the job throughput) and tasks waiting in the queue. Nothing when Redis cannot be reached."""

    def __init__(self, jobs: Jobs) -> None:
        self.jobs = jobs

    def collect(self) -> Iterator[Metric]:
        try:
            store = self.jobs.store
            states, items = store.states(), store.items_finished()
            queued = int(store.redis.llen(self.jobs.settings.queue))  # type: ignore[arg-type]
            backlog = self.jobs.fair.backlog()
        except (JobsUnavailable, JobStoreUnavailable, redis.RedisError):
            return
        by_state = GaugeMetricFamily("imagerec_jobs", "Jobs by state (the newest 1000)", labels=["state"])
        for state, count in states.items():
            by_state.add_metric([state], count)
        finished = CounterMetricFamily(
            "imagerec_job_images", "Job images finished, all jobs, by outcome", labels=["outcome"]
        )
        for outcome, count in items.items():
            finished.add_metric([outcome], count)
        yield by_state
        yield finished
        yield GaugeMetricFamily(
            "imagerec_job_queue_length",
            "Job chunks waiting: in the task queue, and in the principals' backlogs (fair shares)",
            queued + backlog,
        )


def store_call(method: Any, *args: Any) -> Any:
    try:
        return method(*args)
    except (JobStoreUnavailable, redis.RedisError):
        raise JobsUnavailable("the job store (Redis) cannot be reached") from None


def write_chunks(staged: Path, items: list[dict[str, Any]], chunk_images: int) -> int:
    """The job's items as ``chunks/<n>.json`` of ``chunk_images`` each (the tasks' units); how many."""
    chunks = math.ceil(len(items) / chunk_images)
    (staged / "chunks").mkdir()
    for chunk in range(chunks):
        start = chunk * chunk_images
        part = [{"index": start + i, **item} for i, item in enumerate(items[start : start + chunk_images])]
        (staged / "chunks" / f"{chunk:06d}.json").write_text(json.dumps(part))
    return chunks


def inference_record(selection: Selection, top_k: int, chunks: int, chunk_images: int) -> dict[str, Any]:
    """What an inference job's record says it was asked: the selection as the core takes it (the
    workers read it back with ``Selection.from_json``, never the query)."""
    return {
        "kind": "inference",
        "model": selection.name,
        "members": list(selection.members),
        "vote": selection.vote or "",
        "selection": selection.to_json(),
        "top_k": top_k,
        "chunks": chunks,
        "chunk_images": chunk_images,
        "request_id": web.request_id(),
    }
