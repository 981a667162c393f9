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

import re
import shutil
import uuid
from typing import Any

from flask import Blueprint, Response, request

from common import metrics, web
from common.errors import BadRequest, NotFound
from common.jobs.store import ACTIVE, ADMIN
from common.jobs.views import describe
from common.outcomes import Selection
from common.tenancy.quotas import Reservation
from fleet.client import ModelClient
from gateway import job_results
from gateway import selection as selections
from gateway.job_intake import Intake
from gateway.job_service import (
    JobMetrics,
    JobNotActive,
    Jobs,
    check_callback,
    inference_record,
    store_call,
    write_chunks,
)
from gateway.settings import GatewaySettings

CURSOR = re.compile(r"^[0-9]{1,12}(\.[0-9]{1,9})?$")  # a creation time, as the listing wrote it


def _job_or_404(jobs: Jobs, job_id: str) -> dict[str, Any]:
    """The job, when the caller may see it (its owner, or admin): anyone else gets the same 404 as
    for an id that does not exist."""
    job = store_call(jobs.store.get, job_id)
    if job is None or not jobs.auth.principal().sees(str(job.get("owner") or ADMIN)):
        raise NotFound(
            f"no job {job_id!r} (jobs are kept {jobs.settings.retention_s / 3600:g} h)", code="unknown_job"
        )
    return job


def create_blueprint(gateway: GatewaySettings, client: ModelClient, jobs: Jobs) -> Blueprint:
    settings = jobs.settings
    intake = Intake(settings, gateway.max_image_bytes)
    auth = jobs.auth
    blueprint = Blueprint("jobs", __name__)

    @blueprint.post("/v1/jobs")
    def submit() -> Response:
        request.max_content_length = settings.max_archive_bytes
        selection = selections.from_query(request.args, gateway, client.registry)
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
        principal = auth.principal()
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
        if form not in job_results.FORMATS:
            raise BadRequest(f"format must be one of {', '.join(job_results.FORMATS)}, got {form[:20]!r}")
        body = job_results.render(job, jobs.store.results(job), form)
        response = Response(body, mimetype=job_results.FORMATS[form].split(";")[0])
        response.headers["Content-Type"] = job_results.FORMATS[form]
        response.headers["X-Job-Status"] = job["status"]
        if form != "json":
            response.headers["Content-Disposition"] = f'attachment; filename="{job_id}.{form}"'
        return response

    @blueprint.delete("/v1/jobs/<job_id>")
    def cancel(job_id: str) -> Response:
        _job_or_404(jobs, job_id)
        state = store_call(jobs.store.cancel, job_id)
        auth.audit("job.cancel", job_id, str(state))
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
