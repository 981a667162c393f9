"""Job callbacks, delivered outside the chunk tasks: a slow callback host never holds a job worker.

The chunk that ends a job puts the job on a queue of its own (``due``: a Redis list, at most
``JOBS_CALLBACK_QUEUE_MAX`` long; past it a callback is dropped with a warning - the job's record
still says how it ended). Each job worker's main process delivers from it with
``JOBS_CALLBACK_THREADS`` threads (``serve``): the final job JSON POSTed to the job's
``callback_url``, signed when ``JOBS_CALLBACK_SECRET`` is set, by the same address rules as image
URLs, ``JOBS_CALLBACK_ATTEMPTS`` attempts of ``JOBS_CALLBACK_TIMEOUT_S`` with a growing pause. A
worker stopped mid-delivery loses that one callback; the others wait in Redis for any worker.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import redis

from common.errors import ServiceError
from common.jobs.settings import JobSettings
from common.jobs.store import JobStore
from common.jobs.views import describe
from fleet.fetch import UrlFetcher

log = logging.getLogger("imagerec.jobs")
QUEUE = "imagerec:callbacks"
SIGNATURE_HEADER = "X-Imagerec-Signature"
TIMESTAMP_HEADER = "X-Imagerec-Timestamp"


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """``sha256=<hex>`` of HMAC-SHA256 over ``<timestamp>.<body>`` (the timestamp binds replays)."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def due(client: redis.Redis, job_id: str, max_queued: int) -> bool:
    """Queue ``job_id``'s callback; False (logged) when the queue is full."""
    if int(client.llen(QUEUE)) >= max_queued:  # type: ignore[arg-type]
        log.warning("callback queue full: callback dropped", extra={"job_id": job_id})
        return False
    client.lpush(QUEUE, job_id)
    return True


class Deliverer:
    """POSTs finished jobs to their ``callback_url``."""

    def __init__(
        self,
        store: JobStore,
        fetcher: UrlFetcher,
        settings: JobSettings,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.store = store
        self.fetcher = fetcher
        self.settings = settings
        self.sleep = sleep

    def deliver(self, job_id: str) -> bool:
        """Every attempt, until one is answered 2xx; True when one was."""
        job = self.store.get(job_id)
        if not job or not job.get("callback_url"):
            return False
        body = json.dumps(describe(job)).encode()
        timestamp = str(int(time.time()))
        headers = {"Content-Type": "application/json", TIMESTAMP_HEADER: timestamp}
        if self.settings.callback_secret:
            headers[SIGNATURE_HEADER] = sign(self.settings.callback_secret, timestamp, body)
        for attempt in range(1, self.settings.callback_attempts + 1):
            try:
                status = self.fetcher.post(
                    job["callback_url"], body, headers, self.settings.callback_timeout_s
                )
            except ServiceError as exc:
                status, reason = 0, exc.message
            else:
                reason = f"HTTP {status}"
                if 200 <= status < 300:
                    log.info("job callback delivered", extra={"job_id": job_id, "status": status})
                    return True
            log.warning("job callback failed", extra={"job_id": job_id, "attempt": attempt, "reason": reason})
            if attempt < self.settings.callback_attempts:
                self.sleep(2.0**attempt)
        return False


def serve(client: redis.Redis, deliverer: Deliverer, threads: int, stop: threading.Event) -> None:
    """Deliver queued callbacks, ``threads`` at a time, until ``stop`` is set: a callback is taken
    off the queue only when a thread is free for it."""
    free = threading.Semaphore(threads)

    def deliver(job_id: str) -> None:
        try:
            deliverer.deliver(job_id)
        except Exception:  # noqa: BLE001 - one callback's failure must not stop the others
            log.exception("job callback crashed", extra={"job_id": job_id})
        finally:
            free.release()

    with ThreadPoolExecutor(threads, thread_name_prefix="job-callback") as pool:
        while not stop.is_set():
            if not free.acquire(timeout=1):
                continue
            try:
                found: tuple[str | bytes, str | bytes] | None = client.brpop([QUEUE], timeout=1)  # type: ignore[assignment]
            except redis.RedisError:
                free.release()
                stop.wait(1)
                continue
            if not found:
                free.release()
                continue
            job_id = found[1].decode() if isinstance(found[1], bytes) else str(found[1])
            pool.submit(deliver, job_id)
