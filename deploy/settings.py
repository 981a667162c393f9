"""Settings every way of deploying the fleet shares; each deployment imports this, never another.

The local fleet (``deploy/local``) reads them from ``FLEET_NGINX_*``; the Kubernetes renderer
(``deploy/k8s``) writes their defaults into the manifests; ``docker-compose.yml`` spells the same
defaults out and a test holds it to them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from pathlib import Path

from common.draining import DrainSettings
from common.jobs.settings import JobSettings
from common.settings import setting
from common.training.settings import TrainingSettings

NGINX_TEMPLATES = Path(__file__).resolve().parent / "nginx"
RATE = re.compile(r"(\d+r/[sm])?")  # limit_req_zone's rate=, or empty (off)

# Gunicorn threads. A request waiting for its model parks a thread, so a model service needs one
# per image it may queue (MAX_QUEUE_IMAGES, 64) plus the batches running (MAX_BATCH_SIZE, 8, on
# each stream: two for int8 on 2 cores) plus spares that decode or refuse: with fewer, requests
# would wait for a thread where admission cannot see them, never refused and never counted. The
# gateway's threads wait on members the same way.
SERVICE_THREADS = 96
GATEWAY_WORKERS = 2
GATEWAY_THREADS = 64
# Where compose and Kubernetes mount the volume the gateway and every job worker share (JOBS_DIR):
# the gateway writes a job's inputs there, the workers its results.
JOBS_DIR = "/jobs"
# Where compose and Kubernetes mount the custom models' repository (CUSTOM_MODELS_DIR): the trainer
# publishes there and the gateway deletes there; the model services read it (they serve the custom
# models trained on them). The job worker has it too (its housekeeping sweeps leftover staging).
CUSTOM_MODELS_DIR = "/custom-models"

# deploy/gunicorn.conf.py's graceful_timeout: what a stopping Gunicorn gives the requests it holds.
GUNICORN_GRACEFUL_S = 30


def model_stop_grace_s(drain: DrainSettings | None = None) -> int:
    """Seconds a stopping model service gets before it is killed: it answers not-ready for its
    ``DRAIN_S`` (common/draining.py) while gateways move away, then Gunicorn finishes what it holds."""
    return math.ceil((drain or DrainSettings()).drain_s) + GUNICORN_GRACEFUL_S


def worker_command(jobs: JobSettings | None = None) -> list[str]:
    """The job worker as compose and Kubernetes run it, from the gateway's image: Celery's prefork
    pool of ``JOBS_WORKER_PROCESSES``, each process with one task, so one model call, in flight."""
    jobs = jobs or JobSettings()
    return [
        *("python", "-m", "celery", "-A", "workers.app", "worker", "-Q", jobs.queue),
        *("--concurrency", str(jobs.worker_processes), "--without-gossip", "--without-mingle"),
    ]


def trainer_command(training: TrainingSettings | None = None) -> list[str]:
    """The trainer as compose and Kubernetes run it, from the trainer image: training tasks from their
    own queue, one at a time, each in a fresh process (``--max-tasks-per-child 1``: TensorFlow's
    memory goes back when a training ends)."""
    training = training or TrainingSettings()
    return [
        *("python", "-m", "celery", "-A", "workers.app", "worker", "-Q", training.queue),
        *("--concurrency", "1", "--max-tasks-per-child", "1", "--without-gossip", "--without-mingle"),
    ]


def trainer_stop_grace_s(training: TrainingSettings | None = None) -> int:
    """Seconds a stopping trainer gets before it is killed. A training is not resumed: killed before
    it publishes, nothing is published and the watchdog fails the job after ``TRAINING_STALL_S``
    (submit it again). Waiting out a whole training is not worth a stuck rollout, but one that has
    published gets its ``TRAINING_PUBLISH_WAIT_S`` to see the fleet serve it and complete."""
    training = training or TrainingSettings()
    return math.ceil(training.publish_wait_s) + 15  # + Celery's exit


def worker_stop_grace_s(jobs: JobSettings | None = None) -> int:
    """Seconds a stopping worker gets before it is killed. On SIGTERM Celery takes no new task and
    finishes those it runs, each within ``JOBS_CHUNK_BUDGET_S``. Killed sooner, a task is handed out
    again after ``JOBS_VISIBILITY_TIMEOUT_S``. Callbacks are delivered outside the tasks
    (``workers.callbacks``): those queued wait in Redis for any worker; one under way is lost."""
    jobs = jobs or JobSettings()
    return math.ceil(jobs.chunk_budget_s) + 15  # + a chunk's files, and Celery's exit


@dataclass(frozen=True)
class NginxSettings:
    """Body and timeout limits of deploy/nginx/imagerec.conf.template (``FLEET_NGINX_<FIELD>``)."""

    max_body_size: str = setting("10m", "largest request body Nginx accepts (413 above)")
    body_buffer_size: str = setting("1m", "request bodies up to this size stay in memory")
    client_timeout: str = setting("30s", "client header/body/send timeout at Nginx")
    proxy_connect_timeout: str = setting("5s", "Nginx -> gateway connect timeout")
    proxy_read_timeout: str = setting("60s", "Nginx -> gateway read timeout")
    jobs_max_body_size: str = setting(
        "512m", "largest job upload at POST /v1/jobs (JOBS_MAX_ARCHIVE_BYTES), spooled to disk"
    )
    jobs_read_timeout: str = setting(
        "300s", "Nginx -> gateway read timeout for a job upload (the gateway unpacks it before 202)"
    )
    anonymous_rate: str = setting(
        "100r/s",
        "requests a second one client address may send without a key, counted at Nginx (limit_req, "
        "REST and gRPC): the gateway's own per-client default, refused for a few microseconds at the "
        "edge instead of ~1.75 ms of a gateway thread; empty: no limit at the edge",
    )
    anonymous_burst: int = setting(
        500,
        "requests without a key one address may have above its rate before Nginx answers 429: they "
        "wait in Nginx (a connection each, no gateway thread) until the rate lets them through",
    )
    anonymous_no_delay: int = setting(
        100, "of that burst, how many pass at once (limit_req's delay=): a page's burst is not slowed"
    )

    def template_values(self) -> dict[str, str]:
        """The limits by the template's variable names, e.g. ``NGINX_MAX_BODY_SIZE``, and the
        anonymous limit's directive (``NGINX_ANONYMOUS_LIMIT``: empty when the limit is off)."""
        values = {
            f"NGINX_{field.name.upper()}": getattr(self, field.name)
            for field in fields(self)
            if field.type == "str"  # the burst and no-delay counts go into the directive
        }
        if not RATE.fullmatch(self.anonymous_rate):
            raise ValueError(
                f"FLEET_NGINX_ANONYMOUS_RATE: expected e.g. 100r/s or 600r/m, got {self.anonymous_rate!r}"
            )
        values["NGINX_ANONYMOUS_RATE"] = self.anonymous_rate or "1r/s"  # a zone no location uses
        delay = f" delay={self.anonymous_no_delay}" if self.anonymous_no_delay else ""  # 0: Nginx's default
        values["NGINX_ANONYMOUS_LIMIT"] = (
            f"limit_req zone=imagerec_anonymous burst={self.anonymous_burst}{delay};"
            if self.anonymous_rate
            else "# no limit for requests without a key (FLEET_NGINX_ANONYMOUS_RATE is empty)"
        )
        return values
