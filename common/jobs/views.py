"""A job as clients see it: ``GET /v1/jobs/<id>``, the listing, and the callback the job workers
send when it ends (so the view is here, beside the record it reads, not in the gateway alone):
its counts and progress, rate and ETA, times (``common.wire.timestamp``) and links.
"""

from __future__ import annotations

import time
from typing import Any

from common import wire
from common.jobs.store import ACTIVE


def describe(job: dict[str, Any], now: float | None = None) -> dict[str, Any]:
    """A job as clients see it (``GET /v1/jobs/<id>``, the listing and the callback)."""
    now = time.time() if now is None else now
    if job.get("kind") == "training":
        return _describe_training(job)
    total, finished = job["total"], job["done"] + job["failed"]
    started, ended = job.get("started_at"), job.get("finished_at")
    elapsed = ((ended or now) - started) if started else 0.0
    rate = finished / elapsed if elapsed > 0 else 0.0
    active = job["status"] in ACTIVE
    body: dict[str, Any] = {
        "job_id": job["id"],
        "kind": job.get("kind", "inference"),
        "status": job["status"],
        "model": job["model"],
    }
    if job.get("members") and job["model"] == "ensemble":
        body |= {"members": job["members"], "vote": job.get("vote")}
    body |= {
        "top_k": job.get("top_k"),
        "total": total,
        "done": job["done"],
        "failed": job["failed"],
        "progress": round(finished / total, 4) if total else 1.0,
        "images_per_s": round(rate, 2),
        "eta_s": round((total - finished) / rate, 1) if active and rate > 0 else None,
        "weights": job.get("weights"),
        "created_at": wire.timestamp(job.get("created_at")),
        "started_at": wire.timestamp(started),
        "finished_at": wire.timestamp(ended),
        "expires_at": wire.timestamp(job.get("expires_at")),
        "links": {"self": f"/v1/jobs/{job['id']}", "results": f"/v1/jobs/{job['id']}/results"},
    }
    return body


def _describe_training(job: dict[str, Any]) -> dict[str, Any]:
    """A training job: its phase (``queued``, ``features``, ``training``, ``evaluating``,
    ``publishing``, ``done``), features computed so far, each epoch's loss and accuracy, and on
    completion the evaluation and the model it published. Fine-tuning has two stages of epochs
    (``head``, then ``fine_tune``): ``epochs_total`` counts both, ``stage`` names the one running."""
    total, computed = job["total"], job["done"] + job["failed"]
    history = job.get("history") or []
    epochs = job.get("epochs_total") or int(job.get("options", {}).get("epochs", 0))
    # Features are most of the time on a CPU: they weigh 0.8 of the progress, epochs the rest.
    progress = 0.8 * (computed / total if total else 1.0) + 0.2 * (len(history) / epochs if epochs else 0.0)
    if job["status"] == "completed":
        progress = 1.0
    body: dict[str, Any] = {
        "job_id": job["id"],
        "kind": "training",
        "status": job["status"],
        "phase": job.get("phase", "queued"),
        "model": job["model"],
        "base": job.get("base"),
        "options": job.get("options"),
        "classes": job.get("classes"),
        "counts": job.get("counts"),
        "skipped": job.get("skipped") or [],
        "total": total,
        "features_done": job["done"],
        "features_failed": job["failed"],
        "progress": round(min(progress, 1.0), 4),
        "epoch": len(history),
        "epochs_total": epochs,
        **({"stage": job["stage"]} if job.get("stage") else {}),
        "history": history,
        "evaluation": job.get("evaluation"),
        "served": job.get("served"),
        "error": job.get("error"),
        "created_at": wire.timestamp(job.get("created_at")),
        "started_at": wire.timestamp(job.get("started_at")),
        "published_at": wire.timestamp(job.get("published_at")),
        "finished_at": wire.timestamp(job.get("finished_at")),
        "expires_at": wire.timestamp(job.get("expires_at")),
        "links": {"self": f"/v1/jobs/{job['id']}", "model": f"/v1/models/{job['model']}"},
    }
    return body
