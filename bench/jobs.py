"""Asynchronous jobs on the fleet ``make run`` starts: how fast a big ResNet50 job runs, and what it
does to an interactive client's latency while it runs.

1. unloaded: one interactive client (wrk, new bytes every request) for ``seconds``: its p50;
2. a job of ``images`` photos (each with bytes of its own) submitted as a zip through Nginx, timed
   from its ``started_at`` to its ``finished_at`` (the record's own clock): images/s;
3. a second job of the same size, with the same interactive client running beside it: its p50
   then, and the job's images/s.
"""

from __future__ import annotations

import io
import threading
import time
import zipfile
from datetime import datetime
from typing import Any

import requests

from bench import load
from bench.fleets import admin_session
from deploy.local.running import wait_until


def archive(photo: bytes, images: int, seed: str) -> bytes:
    """``images`` copies of ``photo``, each with bytes of its own after the JPEG's end marker."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as out:
        for number in range(images):
            out.writestr(f"photos/{number:05d}.jpg", photo + f"{seed}-{number}".encode())
    return buffer.getvalue()


def moment(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def duration_s(job: dict[str, Any]) -> float:
    """How long a finished job ran, by its record's own clock (``started_at`` to ``finished_at``)."""
    return moment(job["finished_at"]) - moment(job["started_at"])


def wait_finished(session: requests.Session, url: str, job_id: str, timeout_s: float) -> dict[str, Any]:
    """The job once it is no longer pending or running (``session``: as its owner)."""
    last: dict[str, Any] = {}

    def finished() -> bool:
        last.update(session.get(f"{url}/v1/jobs/{job_id}", timeout=30).json())
        return last["status"] not in ("pending", "running")

    wait_until(finished, timeout_s, f"job {job_id} to finish")
    return last


def run_job(
    session: requests.Session, url: str, photo: bytes, images: int, seed: str, timeout_s: float = 1800
) -> dict[str, Any]:
    answer = session.post(
        f"{url}/v1/jobs?model=resnet50&top_k=1",
        files={"archive": ("photos.zip", archive(photo, images, seed), "application/zip")},
        timeout=300,
    )
    answer.raise_for_status()
    job_id = answer.json()["job_id"]
    last = wait_finished(session, url, job_id, timeout_s)
    elapsed = duration_s(last)
    return {
        "job_id": job_id,
        "status": last["status"],
        "images": images,
        "done": last["done"],
        "failed": last["failed"],
        "seconds": round(elapsed, 1),
        "img_per_s": round(last["done"] / elapsed, 2) if elapsed > 0 else 0.0,
    }


def measure_on(fleet: Any, photo: bytes, images: int, seconds: int) -> dict[str, Any]:
    interactive = f"{fleet.url}/v1/predict?model=resnet50"
    payload = load.Payload.raw(photo)
    alone = load.run(interactive, payload, connections=1, seconds=seconds)
    session = admin_session(fleet)
    job = run_job(session, fleet.url, photo, images, "alone")

    started = time.monotonic()
    answer: dict[str, Any] = {}
    worker = threading.Thread(
        target=lambda: answer.update(run_job(session, fleet.url, photo, images, "beside"))
    )
    worker.start()
    time.sleep(5)  # the job is under way: chunks queued, both worker processes busy
    beside = load.run(interactive, payload, connections=1, seconds=seconds)
    worker.join()
    return {
        "images": images,
        "job_alone": job,
        "job_with_interactive": answer,
        "interactive_unloaded": alone,
        "interactive_during_job": beside,
        "p50_ratio": round(beside["p50_ms"] / alone["p50_ms"], 2) if alone["p50_ms"] else None,
        "wall_s": round(time.monotonic() - started, 1),
    }
