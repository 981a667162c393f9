"""The Celery application the gateway enqueues with and the workers consume from (Redis broker).

Delivery: a task is acknowledged only after it ran (``acks_late``), each worker process holds one
task at a time (prefetch 1), and a task whose worker died is handed out again: at once when a pool
process dies under a live worker (``task_reject_on_worker_lost``), or after
``JOBS_VISIBILITY_TIMEOUT_S`` when the whole worker died (kill -9): Redis has no consumer
acknowledgements, so kombu re-queues what stayed unacknowledged for that long. Celery's default is
an hour; ours is a minute, and a task never runs longer than ``JOBS_CHUNK_BUDGET_S`` (below it) so
a live task is not handed out twice. Tasks are idempotent all the same (``common.jobs.store``).
What this cannot cover - kombu pops a message and then records it as unacknowledged, and a Redis
stop between the two loses it - the workers' stall watchdog does (``workers.app.watch``).
"""

from __future__ import annotations

from collections.abc import Iterable

from celery import Celery

from common.jobs.settings import JobSettings

CHUNK_TASK = "imagerec.jobs.chunk"
TRAIN_TASK = "imagerec.training.train"
"""Training: a queue of its own (``TRAINING_QUEUE``), so training never waits behind inference
chunks nor holds them up. Acknowledged when taken, not after: a training task runs for minutes,
past the visibility timeout, and must not be handed to a second worker meanwhile. A worker killed
mid-training leaves its job running without progress; the stall watchdog then fails it
(``TRAINING_STALL_S``). Nothing is published by a job that did not finish."""


def create(settings: JobSettings, training_queue: str = "training") -> Celery:
    app = Celery("imagerec", broker=settings.redis_url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,  # results are files; the record in Redis says how far a job is
        task_default_queue=settings.queue,
        task_routes={CHUNK_TASK: {"queue": settings.queue}, TRAIN_TASK: {"queue": training_queue}},
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # ride out a Redis restart, however long
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        task_serializer="json",
        accept_content=["json"],
    )
    return app


def enqueue(app: Celery, job_id: str, chunks: Iterable[int]) -> None:
    """Queue one task per chunk, over one connection."""
    send(app, [(job_id, chunk) for chunk in chunks])


def send(app: Celery, chunks: Iterable[tuple[str, int]]) -> None:
    """Queue one task per ``(job id, chunk)``, over one connection."""
    with app.producer_or_acquire() as producer:
        for job_id, chunk in chunks:
            app.send_task(CHUNK_TASK, args=[job_id, chunk], producer=producer)


def enqueue_training(app: Celery, job_id: str) -> None:
    app.send_task(TRAIN_TASK, args=[job_id])
