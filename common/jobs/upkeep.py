"""The job store's upkeep: what the workers' watchdog asks of it (jobs that stopped progressing),
and the sweeper that deletes the folders of expired jobs."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.jobs.store import JobStore, call


def stalled(
    store: JobStore,
    stall_s: float,
    *,
    pending_too: bool,
    waiting: Callable[[dict[str, Any]], set[int]] = lambda job: set(),
) -> list[tuple[str, list[int]]]:
    """Running inference jobs (and pending ones, with ``pending_too``) that recorded nothing for
    ``stall_s``, with their unrecorded chunks but those still ``waiting`` their turn (in the owner's
    fair backlog, ``common.jobs.fair``); each is marked as progressing now, so it is reported once
    per period."""
    now = time.time()
    found = []
    states = ("running", "pending") if pending_too else ("running",)
    for job in store.active():
        if job.get("kind", "inference") != "inference":
            continue  # training jobs have no chunks: see stalled_training
        if job["status"] not in states or now - job.get("progress_at", now) < stall_s:
            continue
        recorded = {int(c) for c in call(store.redis.smembers, store.key(job["id"]) + ":chunks")}
        queued = waiting(job)
        missing = [c for c in range(job["chunks"]) if c not in recorded and c not in queued]
        call(store.redis.hset, store.key(job["id"]), "progress_at", now)
        if missing:
            found.append((job["id"], missing))
    return found


def stalled_training(store: JobStore, stall_s: float) -> list[str]:
    """Running training jobs that reported no progress for ``stall_s``."""
    now = time.time()
    return [
        job["id"]
        for job in store.active()
        if job.get("kind") == "training"
        and job["status"] == "running"
        and now - job.get("progress_at", now) >= stall_s
    ]


def sweep(root: Path, now: float | None = None) -> int:
    """Delete job folders under ``root`` whose retention has passed (and stale incoming ones);
    returns how many."""
    now = time.time() if now is None else now
    removed = 0
    if not root.is_dir():
        return 0
    for folder in root.iterdir():
        expires = folder / "EXPIRES"
        try:
            if expires.exists():
                stale = float(expires.read_text()) < now
            else:  # an upload that never became a job (the gateway died while receiving it)
                stale = folder.name.startswith(".incoming-") and folder.stat().st_mtime < now - 3600
        except (OSError, ValueError):
            continue
        if stale:
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    return removed
