"""The Celery worker: ``python -m celery -A workers.app worker -Q jobs`` for inference jobs, ``-Q
training`` (one process, a fresh one per task: ``--max-tasks-per-child 1``, so TensorFlow's memory
goes back after each training) for training jobs.

Each pool process builds, on its first task, the gateway's own client (replicas, failover,
breakers, readiness probes) and a ``ChunkRunner``; the settings - the gateway's (``<MODEL>_URLS``,
``GATEWAY_*``), the jobs' (``JOBS_*``), the trainer's (``TRAINING_*``) and the keys' - are read once,
when Celery imports this module (``WorkerSettings``), and passed down. The main process sweeps
expired job folders. Logs are the fleet's JSON lines, with the job id.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery import Task
from celery.signals import setup_logging, worker_ready

from common import logs, repository
from common.jobs import queue, upkeep
from common.jobs.fair import FairQueue
from common.jobs.settings import JobSettings
from common.jobs.store import ADMIN, JobStore, JobStoreUnavailable, connect
from common.tenancy.keys import KeyStore
from common.tenancy.settings import AuthSettings
from common.training import removals
from common.training.settings import TrainingSettings
from fleet.client import build_client
from fleet.fetch import UrlFetcher
from fleet.predict import Predictor
from fleet.settings import FleetSettings
from workers import callbacks
from workers.runner import Cancelled, ChunkRunner, Requeue
from workers.training.runner import TrainingRunner

log = logging.getLogger("imagerec.jobs")
# Model calls count into PROMETHEUS_MULTIPROC_DIR (the fleet client's metrics), which must exist
# before the first one: Gunicorn makes the gateway's, and a container's /tmp starts empty.
if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)


@dataclass(frozen=True)
class WorkerSettings:
    """Everything a worker process reads from its environment, read once (``from_env``, when
    Celery imports this module) and passed down from here."""

    jobs: JobSettings
    training: TrainingSettings
    fleet: FleetSettings  # the gateway's: replicas, failover, URL fetching
    auth: AuthSettings

    @classmethod
    def from_env(cls) -> WorkerSettings:
        return cls(
            JobSettings.from_env(),
            TrainingSettings.from_env(),
            FleetSettings.from_env(),
            AuthSettings.from_env(),
        )


SETTINGS = WorkerSettings.from_env()
JOBS, TRAINING = SETTINGS.jobs, SETTINGS.training
app = queue.create(JOBS, TRAINING.queue)
# A chunk that keeps running out of time is requeued until JOBS_RETRY_S is spent; its last run
# fails what is left instead.
MAX_REQUEUES = max(1, math.ceil(JOBS.retry_s / JOBS.chunk_budget_s))
_runner: ChunkRunner | None = None
_lock = threading.Lock()


def store() -> JobStore:
    # Up to ~60 s of reconnecting: a worker rides out a Redis restart mid-chunk.
    return JobStore(connect(JOBS.redis_url, retries=40), Path(JOBS.dir), JOBS.retention_s)


def runner() -> ChunkRunner:
    """This process's runner, built on first use (after the fork: threads and sockets are its own)."""
    global _runner
    with _lock:
        if _runner is None:
            gateway = SETTINGS.fleet
            client = build_client(gateway)
            client.registry.refresh()  # sizes and body limits known before the first call
            client.registry.start_polling(gateway.health_interval_s)
            fetcher = UrlFetcher.from_settings(gateway)
            keys = KeyStore(SETTINGS.auth)  # a revoked key's jobs stop within its cache time
            _runner = ChunkRunner(store(), Predictor(client, gateway), fetcher, JOBS, is_live=keys.is_live)
        return _runner


def training_runner() -> TrainingRunner:
    """A runner for one training task (the process ends after it: ``--max-tasks-per-child 1``)."""
    gateway = SETTINGS.fleet
    client = build_client(gateway)
    client.registry.refresh()
    jobs = store()
    keys = KeyStore(SETTINGS.auth)  # a revoked key's training stops at its next step
    return TrainingRunner(
        jobs, client, TRAINING, retry_s=JOBS.retry_s, removals=jobs.redis, is_live=keys.is_live
    )


@app.task(name=queue.TRAIN_TASK, acks_late=False, ignore_result=True)
def train(job_id: str) -> str:
    state = training_runner().run(job_id)
    log.info("training job ended", extra={"job_id": job_id, "state": state})
    return state


@app.task(name=queue.CHUNK_TASK, bind=True, max_retries=MAX_REQUEUES)
def chunk(self: Task, job_id: str, index: int) -> str:
    extra = {"job_id": job_id, "chunk": index}
    ended = True  # the task ends here (not queued again): its owner's next chunk may go
    try:
        outcome = runner().run(job_id, index, final=self.request.retries >= MAX_REQUEUES)
    except Requeue as requeue:
        ended = False
        raise self.retry(countdown=requeue.countdown_s) from None
    except JobStoreUnavailable:
        # Redis stayed away longer than the client's reconnecting: queue the chunk again. If even
        # that fails, the watchdog queues it once the job has stalled (JOBS_STALL_S).
        ended = False
        log.warning("job store unreachable: chunk queued again", extra=extra)
        raise self.retry(countdown=5, max_retries=None) from None
    except Cancelled:
        log.info("job chunk stopped: the job was cancelled", extra=extra)
        return "cancelled"
    finally:
        if ended:
            hand_over(job_id, index)
    if outcome.skipped:
        log.info("job chunk skipped", extra={**extra, "reason": outcome.skipped})
        return outcome.skipped
    log.info("job chunk done", extra={**extra, "finished": outcome.finished})
    return "finished" if outcome.finished else "recorded"


def hand_over(job_id: str, index: int) -> None:
    """Give the chunk's place in its owner's share back and send the owner's next chunks
    (``common.jobs.fair``). Redis away: the place lapses, and the watchdog sends what stalled."""
    jobs = runner().store
    try:
        owner = str(jobs.redis.hget(jobs.key(job_id), "owner") or ADMIN)
        fair = FairQueue.of(jobs.redis, JOBS)
        queue.send(app, fair.done(owner, job_id, index, time.time()))
    except Exception as exc:  # noqa: BLE001 - never lose the chunk's own outcome to this
        log.warning("could not hand over to the next chunk", extra={"job_id": job_id, "error": repr(exc)})


@setup_logging.connect
def _logging(**_: Any) -> None:
    """The fleet's JSON lines instead of Celery's own format."""
    handler = logging.StreamHandler()
    handler.setFormatter(logs.formatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logs.level())


def watch(jobs: JobStore) -> None:
    """Queue again the unrecorded chunks of jobs that stalled: a task lost with Redis's data, or
    one whose retry could not be published while Redis was down. Duplicates are harmless: a
    recorded chunk is skipped."""
    waiting = int(jobs.redis.llen(JOBS.queue))  # type: ignore[arg-type]
    fair = FairQueue.of(jobs.redis, JOBS)
    for job_id, chunks in upkeep.stalled(
        jobs,
        JOBS.stall_s,
        pending_too=waiting == 0,
        waiting=lambda job: fair.waiting(str(job.get("owner") or ADMIN), job["id"]),
    ):
        log.warning("stalled job: chunks queued again", extra={"job_id": job_id, "chunks": len(chunks)})
        queue.enqueue(app, job_id, chunks)
    for owner in fair.owners():  # places given back as stale: the owners' next chunks go
        queue.send(app, fair.next(owner, time.time()))
    for job_id in upkeep.stalled_training(jobs, TRAINING.stall_s):
        reason = (
            f"the training worker stopped (killed or crashed): no sign of it for {TRAINING.stall_s:g}s; "
            "nothing was published - submit the training again"
        )
        if jobs.finish(job_id, "failed", {"phase": "failed", "error": reason}) == "failed":
            log.warning("stalled training job failed", extra={"job_id": job_id})


def _is_trainer(consumer: Any) -> bool:
    """Whether this worker consumes the training queue (``-Q training``): the trainer, the model
    repository's one writer."""
    queues = getattr(getattr(getattr(consumer, "app", None), "amqp", None), "queues", None)
    return bool(TRAINING.models_dir) and TRAINING.queue in (getattr(queues, "consume_from", None) or {})


@worker_ready.connect
def _housekeeping(sender: Any = None, **_: Any) -> None:
    """In the main process: the stall watchdog every ``JOBS_WATCH_INTERVAL_S`` and the sweep of
    expired job folders every ``JOBS_SWEEP_INTERVAL_S``. Every worker may do both (each step is
    idempotent). The trainer also sweeps the model repository's leftovers, and carries out the
    gateway's requests to remove custom models (``common.training.removals``)."""
    trainer = _is_trainer(sender)
    if trainer:
        jobs = store()
        stop = threading.Event()  # never set: the thread ends with the process
        serve = threading.Thread(
            target=removals.serve, args=(jobs.redis, Path(TRAINING.models_dir), stop), daemon=True
        )
        serve.start()
        log.info("serving removal requests", extra={"models_dir": TRAINING.models_dir})

    else:  # a job worker: callbacks are delivered here, never inside a chunk task
        jobs = store()
        fetcher = UrlFetcher.from_settings(SETTINGS.fleet)
        deliverer = callbacks.Deliverer(jobs, fetcher, JOBS)
        threading.Thread(
            target=callbacks.serve,
            args=(jobs.redis, deliverer, JOBS.callback_threads, threading.Event()),
            name="job-callbacks",
            daemon=True,
        ).start()

    def loop() -> None:
        jobs = store()
        next_sweep = 0.0
        while True:
            try:
                watch(jobs)
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + JOBS.sweep_interval_s
                    if removed := upkeep.sweep(jobs.root):
                        log.info("expired job folders removed", extra={"removed": removed})
                    if trainer:  # the repository's one writer sweeps what a killed publisher left
                        repository.sweep_staging(Path(TRAINING.models_dir))
            except Exception:  # noqa: BLE001 - housekeeping must outlive any one failure
                log.exception("job housekeeping failed")
            time.sleep(JOBS.watch_interval_s)

    threading.Thread(target=loop, name="job-housekeeping", daemon=True).start()
