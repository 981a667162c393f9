"""Asynchronous job settings: ``JOBS_<FIELD>``, shared by the gateway (which accepts jobs) and the
workers (which run them). Redis is ``JOBS_REDIS_URL``, else ``REDIS_URL``: without either, the
job routes answer 503 ``jobs_unavailable`` and everything else serves as before."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from common.settings import load_with_redis, secret, setting

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class JobSettings:
    redis_url: str = setting("", "Redis for the job queue and records (falls back to REDIS_URL)")
    dir: str = setting(
        str(ROOT / "run" / "jobs"),
        "folder for job inputs and results; every gateway and worker must see the same one "
        "(one machine: a local folder; several: a shared volume)",
    )
    retention_s: float = setting(24 * 3600.0, "seconds a job's record, inputs and results are kept")
    max_archive_bytes: int = setting(
        512 * 1024 * 1024, "largest job upload (archive or files), streamed to disk; Nginx's limit too"
    )
    max_json_bytes: int = setting(
        32 * 1024 * 1024, "largest JSON job body ('images' or 'urls'), which is read into memory"
    )
    max_images: int = setting(20_000, "most images in one job")
    max_uncompressed_bytes: int = setting(
        2 * 1024**3, "most bytes one request writes to disk: its files and every archive once unpacked"
    )
    max_archives: int = setting(4, "most archive parts in one request")
    max_urls: int = setting(1_000, "most image URLs in one job (each is fetched by a job worker)")
    max_url_chars: int = setting(2_000, "longest image URL in a job")
    max_name_chars: int = setting(255, "longest image name kept (a file's or an archive entry's name)")
    max_ratio: float = setting(100.0, "largest compression ratio of an archive (zip bombs)")
    chunk_images: int = setting(
        32, "images per queued task: the unit of redelivery, written to one result file"
    )
    batch_images: int = setting(
        1,
        "images per model call, sent at background priority: an interactive request waits behind at most "
        "one such call (on 2 cores, 1 gave the job 21.3 img/s and a client 1.7x its p50; 2 gave 20.3 "
        "and 2.6x)",
    )
    visibility_timeout_s: float = setting(
        60.0,
        "a task taken by a worker that died is handed out again after this long (Celery's Redis "
        "visibility timeout; its default is an hour)",
    )
    chunk_budget_s: float = setting(
        30.0, "a task that has not finished its images in this time re-queues itself (< visibility timeout)"
    )
    retry_s: float = setting(
        120.0, "how long a batch retries models that are down or overloaded before its images fail"
    )
    stall_s: float = setting(
        60.0,
        "a running job that recorded nothing for this long gets its unrecorded chunks queued again "
        "(a task lost with Redis, say); a pending one too when the queue is empty",
    )
    callback_secret: str = setting("", "HMAC-SHA256 key for signing callbacks (empty: unsigned)")
    callback_timeout_s: float = setting(10.0, "time a callback URL has to answer, per attempt")
    callback_attempts: int = setting(3, "attempts to deliver a callback")
    callback_threads: int = setting(
        4, "callbacks each job worker delivers at once, outside its chunk tasks (in its main process)"
    )
    callback_queue_max: int = setting(
        10_000, "callbacks waiting for delivery, all jobs together; past it one is dropped (logged)"
    )
    queue: str = setting("jobs", "Celery queue the inference tasks go to")
    worker_processes: int = setting(
        2, "worker processes, each with one model call in flight (keeps a model busy between calls)"
    )
    chunks_per_principal: int = setting(
        2,
        "chunks of one principal's jobs queued or running at once (the rest wait in its own backlog): "
        "another key's job waits behind at most this many of each busy key; set it to the job worker "
        "processes of the whole fleet",
    )
    sweep_interval_s: float = setting(600.0, "seconds between sweeps of expired job folders")
    watch_interval_s: float = setting(15.0, "seconds between the workers' checks for stalled jobs")
    list_limit: int = setting(100, "most jobs one page of GET /v1/jobs returns")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> JobSettings:
        env = os.environ if environ is None else environ
        return load_with_redis(cls, ("JOBS_",), env, callback_secret=secret(env, "JOBS_CALLBACK_SECRET"))

    @property
    def fair_stale_s(self) -> float:
        """A chunk sent to Celery this long ago without ending was lost (its retries included): its
        place in its owner's share is given back (``common.jobs.fair``)."""
        return 10 * self.visibility_timeout_s

    def __post_init__(self) -> None:
        if self.chunk_budget_s >= self.visibility_timeout_s:
            raise ValueError(
                "JOBS_CHUNK_BUDGET_S must be below JOBS_VISIBILITY_TIMEOUT_S, or a task still "
                "running would be handed to a second worker"
            )
        if self.chunks_per_principal < 1:
            raise ValueError("JOBS_CHUNKS_PER_PRINCIPAL must be at least 1")
        if self.batch_images < 1 or self.chunk_images < self.batch_images:
            raise ValueError("JOBS_CHUNK_IMAGES must be at least JOBS_BATCH_IMAGES (>= 1)")
