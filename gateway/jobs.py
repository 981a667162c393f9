"""The job routes: submit, watch, read and cancel asynchronous batch jobs.

``POST /v1/jobs`` takes the usual model selection (``model``, ``models``, ``vote``,
``member_weights``, ``top_k``) and a body of images (``gateway.job_intake``); everything is checked,
written to the job's folder and queued before the ``202 Accepted`` goes out, so a refusal creates
no job and an accepted job survives a restart of the gateway. The workers (``workers/``) do the
rest. ``GET /v1/jobs/<id>`` is the job's state and progress, ``GET /v1/jobs/<id>/results`` its
answers in input order (``format=json|jsonl|csv``, streamed), ``DELETE /v1/jobs/<id>`` cancels it
(results so far stay readable), ``GET /v1/jobs`` lists recent jobs, newest first.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis
from flask import Blueprint, Response, request
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from common import metrics, web
from common.errors import BadRequest, NotFound, ServiceError
from common.jobs import queue
from common.jobs.fair import FairQueue
from common.jobs.settings import JobSettings
from common.jobs.store import ACTIVE, ADMIN, JobStore, JobStoreUnavailable, connect
from common.jobs.views import describe
from common.tenancy.quotas import QuotaBook, Reservation
from common.tenancy.settings import QuotaSettings
from fleet.client import ModelClient
from fleet.predict import Selection, select
from gateway.auth import audit, current
from gateway.job_intake import Intake
from gateway.settings import GatewaySettings

CURSOR = re.compile(r"^[0-9]{1,12}(\.[0-9]{1,9})?$")  # a creation time, as the listing wrote it
FORMATS = {"json": "application/json", "jsonl": "application/x-ndjson", "csv": "text/csv; charset=utf-8"}


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

    def __init__(
        self, settings: JobSettings, training_queue: str = "training", quotas: QuotaSettings | None = None
    ) -> None:
        self.settings = settings
        self.training_queue = training_queue
        self.quota_settings = quotas or QuotaSettings.from_env()
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
                current(), directory, fleet_max_images, training=training, declared=declared
            )
        )

    @property
    def queue(self) -> Any:
        """The Celery application tasks are sent with (after ``store``)."""
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
        principal = current()
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
        audit(f"{record['kind']}.submit", job_id, model=str(record.get("model", "")), images=record["total"])
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
        queue.send(self._queue, self.fair.submit(current().id, job_id, range(chunks), time.time()))


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


def _job_or_404(jobs: Jobs, job_id: str) -> dict[str, Any]:
    """The job, when the caller may see it (its owner, or admin): anyone else gets the same 404 as
    for an id that does not exist."""
    job = store_call(jobs.store.get, job_id)
    if job is None or not current().sees(str(job.get("owner") or ADMIN)):
        raise NotFound(
            f"no job {job_id!r} (jobs are kept {jobs.settings.retention_s / 3600:g} h)", code="unknown_job"
        )
    return job


def store_call(method: Any, *args: Any) -> Any:
    try:
        return method(*args)
    except (JobStoreUnavailable, redis.RedisError):
        raise JobsUnavailable("the job store (Redis) cannot be reached") from None


def _results_json(job: dict[str, Any], outcomes: Iterator[dict[str, Any]]) -> Iterator[str]:
    head = {k: v for k, v in describe(job).items() if k != "links"}
    yield json.dumps(head)[:-1] + ', "results": ['
    for n, outcome in enumerate(outcomes):
        yield ("," if n else "") + json.dumps(outcome)
    yield "]}\n"


def _cell(value: Any) -> Any:
    """A CSV cell a spreadsheet will not run: text starting like a formula (a custom model's class
    names and the images' names come from users) gets a leading apostrophe (OWASP's advice)."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def _results_csv(job: dict[str, Any], outcomes: Iterator[dict[str, Any]]) -> Iterator[str]:
    top_k = int(job.get("top_k") or 1)
    header = ["index", "name", "status"]
    for rank in range(1, top_k + 1):
        header += [f"label_{rank}", f"score_{rank}"]
    header += ["error_code", "error_message"]
    buffer = io.StringIO()
    writer = csv.writer(buffer)

    def row(values: list[Any]) -> str:
        buffer.seek(0)
        buffer.truncate()
        writer.writerow([_cell(value) for value in values])
        return buffer.getvalue()

    yield row(header)
    for outcome in outcomes:
        values: list[Any] = [outcome["index"], outcome["name"]]
        if "predictions" in outcome:
            values.append("ok")
            for rank in range(top_k):
                found = outcome["predictions"][rank] if rank < len(outcome["predictions"]) else None
                values += [found["label"], found["score"]] if found else ["", ""]
            values += ["", ""]
        else:
            error = outcome.get("error", {})
            values += ["error", *[""] * (2 * top_k), error.get("code", ""), error.get("message", "")]
        yield row(values)


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
    """What an inference job's record says it was asked, from the request's query."""
    asked = {
        key: request.args[key] for key in ("model", "models", "vote", "member_weights") if key in request.args
    }
    return {
        "kind": "inference",
        "model": selection.name,
        "members": list(selection.members),
        "vote": selection.vote or "",
        "selection": asked,
        "top_k": top_k,
        "chunks": chunks,
        "chunk_images": chunk_images,
        "request_id": web.request_id(),
    }


def create_blueprint(gateway: GatewaySettings, client: ModelClient, jobs: Jobs) -> Blueprint:
    settings = jobs.settings
    intake = Intake(settings, gateway.max_image_bytes)
    blueprint = Blueprint("jobs", __name__)

    @blueprint.post("/v1/jobs")
    def submit() -> Response:
        request.max_content_length = settings.max_archive_bytes
        selection = select(request.args, gateway, client)
        top_k = web.query_int("top_k", gateway.default_top_k, 1, gateway.max_top_k)
        # The caller's place, taken before the upload is read (refused at once when a quota is
        # full) and given back unless the job is queued.
        with jobs.reserve(settings.max_images, training=False) as reservation:
            return receive(selection, top_k, reservation)

    def receive(selection: Selection, top_k: int, reservation: Reservation) -> Response:
        callback = request.args.get("callback_url")
        staged = jobs.store.staging()
        job_id = uuid.uuid4().hex
        try:
            received = intake.receive(request, staged, reservation)
            if "callback_url" in received.fields and callback is not None:
                raise BadRequest("give callback_url once: in the query or in the body")
            callback = received.fields.get("callback_url", callback)
            if callback is not None:
                check_callback(callback)
            chunks = write_chunks(staged, received.items, settings.chunk_images)
            record = {
                **inference_record(selection, top_k, chunks, settings.chunk_images),
                "total": len(received.items),
                "input_bytes": received.bytes,
                "callback_url": callback or "",
            }
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        return jobs.open(job_id, staged, record, lambda: jobs.enqueue(job_id, chunks), reservation)

    @blueprint.get("/v1/jobs")
    def listing() -> Response:
        limit = web.query_int("limit", 20, 1, settings.list_limit)
        before = request.args.get("before", "")
        if before and not CURSOR.match(before):
            raise BadRequest("before must be the 'next' cursor of a previous page")
        cursor = float(before) if before else None
        principal = current()
        owner = None if principal.is_admin else principal.id
        found = store_call(jobs.store.recent, limit, cursor, owner)
        body: dict[str, Any] = {"jobs": [describe(job) for job in found], "next": None}
        if len(found) == limit:
            body["next"] = f"/v1/jobs?limit={limit}&before={found[-1]['created_at']!r}"
        return web.json_ok(body)

    @blueprint.get("/v1/jobs/<job_id>")
    def status(job_id: str) -> Response:
        return web.json_ok(describe(_job_or_404(jobs, job_id)))

    @blueprint.get("/v1/jobs/<job_id>/results")
    def results(job_id: str) -> Response:
        job = _job_or_404(jobs, job_id)
        form = request.args.get("format", "json")
        if form not in FORMATS:
            raise BadRequest(f"format must be one of {', '.join(FORMATS)}, got {form[:20]!r}")
        outcomes = jobs.store.results(job)
        if form == "jsonl":
            body: Iterator[str] = (json.dumps(outcome) + "\n" for outcome in outcomes)
        elif form == "csv":
            body = _results_csv(job, outcomes)
        else:
            body = _results_json(job, outcomes)
        response = Response(body, mimetype=FORMATS[form].split(";")[0])
        response.headers["Content-Type"] = FORMATS[form]
        response.headers["X-Job-Status"] = job["status"]
        if form != "json":
            response.headers["Content-Disposition"] = f'attachment; filename="{job_id}.{form}"'
        return response

    @blueprint.delete("/v1/jobs/<job_id>")
    def cancel(job_id: str) -> Response:
        _job_or_404(jobs, job_id)
        state = store_call(jobs.store.cancel, job_id)
        audit("job.cancel", job_id, str(state))
        if state == "publishing":
            raise JobNotActive(f"job {job_id} is publishing its model; it can no longer be cancelled")
        job = _job_or_404(jobs, job_id)
        if state != "cancelled" and job["status"] not in ACTIVE:
            raise JobNotActive(
                f"job {job_id} has already {job['status']}; only a pending or running job can be cancelled"
            )
        return web.json_ok(describe(job))

    if settings.redis_url:
        metrics.add_collector("jobs", JobMetrics(jobs))
    return blueprint
