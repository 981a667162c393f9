"""Where a job lives: its record in Redis, its inputs and results in a folder of its own.

Record (a Redis hash ``imagerec:job:<id>``): what was asked (model selection, ``top_k``), the
counts, the state and the times. Each one of its chunks is a queued task; a chunk's results are
one JSON-lines file, written whole and renamed into place, and a chunk is *recorded* once: a Lua
script adds it to the job's set of finished chunks and adds its counts only if it was not there,
so a redelivered chunk can neither count twice nor lose an item. The call that records the last
chunk ends the job (``completed``, or ``failed`` when no image could be classified) and is told
so, which makes it the one caller that sends the callback.

Folder ``<JOBS_DIR>/<id>/``: ``chunks/000000.json`` (each chunk's items: name and input file, or
URL, or the error found at submission), ``inputs/`` (the images), ``results/000000.jsonl`` and
``EXPIRES`` (when the sweeper may delete it). Inputs travel by this reference, never inside a
broker message.

States: ``pending`` (queued) -> ``running`` (a worker took a chunk) -> ``completed`` | ``failed`` |
``cancelled``. Everything expires ``JOBS_RETENTION_S`` after the job was created.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

ADMIN = "admin"  # the owner of jobs made before keys existed (common.tenancy.keys.ADMIN_ID)

PREFIX = "imagerec:job:"
INDEX = "imagerec:jobs"  # sorted set: job id by creation time
OWNED = "imagerec:jobs:owner:"  # + owner: the same, one principal's jobs
ACTIVE_SET = "imagerec:active"  # pending and running jobs (common.tenancy.quotas keeps it)
ITEMS = "imagerec:jobs:items:"  # + done | failed: items finished, all jobs (for metrics)
ACTIVE = ("pending", "running")
TERMINAL = ("completed", "failed", "cancelled")
JOB_ID = re.compile(r"^[0-9a-f]{32}$")

_RECORD = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('SADD', KEYS[2], ARGV[1]) == 0 then return 0 end
redis.call('EXPIREAT', KEYS[2], tonumber(redis.call('HGET', KEYS[1], 'expires_at')))
redis.call('HINCRBY', KEYS[1], 'done', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'failed', ARGV[3])
redis.call('HSET', KEYS[1], 'progress_at', ARGV[4])
redis.call('INCRBY', KEYS[3], ARGV[2])
redis.call('INCRBY', KEYS[4], ARGV[3])
if ARGV[5] ~= '' then redis.call('HSETNX', KEYS[1], 'weights', ARGV[5]) end
local status = redis.call('HGET', KEYS[1], 'status')
local chunks = tonumber(redis.call('HGET', KEYS[1], 'chunks'))
if redis.call('SCARD', KEYS[2]) >= chunks and (status == 'pending' or status == 'running') then
  local final = 'completed'
  if tonumber(redis.call('HGET', KEYS[1], 'done')) == 0 then final = 'failed' end
  redis.call('HSET', KEYS[1], 'status', final, 'finished_at', ARGV[4])
  return 2
end
return 1
"""

_START = """
if redis.call('HGET', KEYS[1], 'status') ~= 'pending' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', ARGV[1])
return 1
"""

_CANCEL = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return nil end
if status == 'running' and redis.call('HGET', KEYS[1], 'phase') == 'publishing' then
  return 'publishing'
end
if status == 'pending' or status == 'running' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[1])
  return 'cancelled'
end
return status
"""

_UPDATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""

_FINISH = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'pending' and status ~= 'running' then return status end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'finished_at', ARGV[2], unpack(ARGV, 3))
return ARGV[1]
"""

NUMBERS = ("total", "chunks", "chunk_images", "done", "failed", "top_k", "epochs_total")
TRAINING_JSON = ("classes", "counts", "skipped", "history", "evaluation", "options", "served")
TIMES = ("created_at", "started_at", "finished_at", "expires_at", "progress_at", "published_at")


class JobStoreUnavailable(Exception):
    """Redis cannot be reached."""


def connect(url: str, *, retries: int) -> redis.Redis:
    """A Redis client that rides out a restart: ``retries`` reconnections, backing off to 2 s."""
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=5,
        socket_connect_timeout=2,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.1), retries),
        # OSError: a refused connect (Redis restarting) is not a redis.ConnectionError yet
        retry_on_error=[redis.ConnectionError, redis.TimeoutError, OSError],
    )


@dataclass(frozen=True)
class Recorded:
    """What recording a chunk did: ``first`` (its counts were added now) and ``finished`` (this
    call ended the job: send the callback)."""

    first: bool
    finished: bool


class JobStore:
    def __init__(self, client: redis.Redis, root: Path, retention_s: float) -> None:
        self.redis = client
        self.root = root
        self.retention_s = retention_s
        self._record = client.register_script(_RECORD)
        self._start = client.register_script(_START)
        self._cancel = client.register_script(_CANCEL)
        self._finish = client.register_script(_FINISH)
        self._update = client.register_script(_UPDATE)

    @staticmethod
    def key(job_id: str) -> str:
        return PREFIX + job_id

    def folder(self, job_id: str) -> Path:
        return self.root / job_id

    # --- creating ---------------------------------------------------------------------------

    def staging(self) -> Path:
        """A new, empty folder for a job being received; :meth:`create` renames it into place."""
        self.root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=".incoming-", dir=self.root))

    def create(self, job_id: str, staged: Path, record: dict[str, Any]) -> dict[str, Any]:
        """Move ``staged`` into place and write the record (``pending``); returns the record."""
        now = time.time()
        expires = int(now + self.retention_s)
        (staged / "EXPIRES").write_text(str(expires))
        os.rename(staged, self.folder(job_id))
        fields = {
            **{k: json.dumps(v) if isinstance(v, dict | list) else v for k, v in record.items()},
            "id": job_id,
            "status": "pending",
            "done": 0,
            "failed": 0,
            "created_at": now,
            "progress_at": now,
            "expires_at": expires,
        }
        try:
            with self.redis.pipeline() as pipe:
                pipe.hset(self.key(job_id), mapping=fields)
                pipe.expireat(self.key(job_id), expires)
                pipe.zadd(INDEX, {job_id: now})
                pipe.zremrangebyscore(INDEX, 0, now - self.retention_s)  # listing forgets expired jobs
                owned = OWNED + str(record.get("owner", ADMIN))
                pipe.zadd(owned, {job_id: now})
                pipe.zremrangebyscore(owned, 0, now - self.retention_s)
                pipe.expireat(owned, expires)
                pipe.execute()
        except redis.RedisError as exc:
            shutil.rmtree(self.folder(job_id), ignore_errors=True)
            raise JobStoreUnavailable(str(exc)) from exc
        return self._decode(fields)

    def discard(self, job_id: str) -> None:
        """Forget a job that could not be queued: no record, no folder."""
        try:
            with self.redis.pipeline() as pipe:
                owner = self.redis.hget(self.key(job_id), "owner") or ADMIN
                pipe.delete(self.key(job_id))
                pipe.zrem(INDEX, job_id)
                pipe.zrem(OWNED + str(owner), job_id)
                pipe.execute()
        finally:
            shutil.rmtree(self.folder(job_id), ignore_errors=True)

    # --- reading ----------------------------------------------------------------------------

    def get(self, job_id: str) -> dict[str, Any] | None:
        if not JOB_ID.match(job_id):
            return None
        raw = self._call(self.redis.hgetall, self.key(job_id))
        return self._decode(raw) if raw else None

    def recent(
        self, limit: int, before: float | None = None, owner: str | None = None
    ) -> list[dict[str, Any]]:
        """Newest first; ``before`` (a creation time) pages on; ``owner``: that principal's alone."""
        top = f"({before}" if before is not None else "+inf"
        index = INDEX if owner is None else OWNED + owner
        ids = self._call(self.redis.zrevrangebyscore, index, top, "-inf", start=0, num=limit)
        with self.redis.pipeline() as pipe:
            for job_id in ids:
                pipe.hgetall(self.key(job_id))
            found = self._call(pipe.execute)
        return [self._decode(raw) for raw in found if raw]

    def active(self, newest: int = 1000) -> list[dict[str, Any]]:
        """Every pending and running job (the set admission keeps, however many), and any among the
        ``newest`` that is not in it (made before it existed)."""
        ids = set(self._call(self.redis.smembers, ACTIVE_SET))
        ids |= set(self._call(self.redis.zrevrange, INDEX, 0, newest - 1))
        with self.redis.pipeline() as pipe:
            for job_id in ids:
                pipe.hgetall(self.key(job_id))
            found = self._call(pipe.execute)
        return [job for job in (self._decode(raw) for raw in found if raw) if job.get("status") in ACTIVE]

    def stalled(self, stall_s: float, *, pending_too: bool) -> list[tuple[str, list[int]]]:
        """Running jobs (and pending ones, with ``pending_too``) that recorded nothing for
        ``stall_s``, with their unrecorded chunks; each is marked as progressing now, so it is
        reported once per period."""
        now = time.time()
        found = []
        states = ("running", "pending") if pending_too else ("running",)
        for job in self.active():
            if job.get("kind", "inference") != "inference":
                continue  # training jobs have no chunks: see stalled_training
            if job["status"] not in states or now - job.get("progress_at", now) < stall_s:
                continue
            recorded = {int(c) for c in self._call(self.redis.smembers, self.key(job["id"]) + ":chunks")}
            missing = [c for c in range(job["chunks"]) if c not in recorded]
            self._call(self.redis.hset, self.key(job["id"]), "progress_at", now)
            if missing:
                found.append((job["id"], missing))
        return found

    def stalled_training(self, stall_s: float) -> list[str]:
        """Running training jobs that reported no progress for ``stall_s``."""
        now = time.time()
        return [
            job["id"]
            for job in self.active()
            if job.get("kind") == "training"
            and job["status"] == "running"
            and now - job.get("progress_at", now) >= stall_s
        ]

    def states(self, newest: int = 1000) -> dict[str, int]:
        """Jobs by state among the ``newest`` (for metrics)."""
        ids = self._call(self.redis.zrevrange, INDEX, 0, newest - 1)
        with self.redis.pipeline() as pipe:
            for job_id in ids:
                pipe.hget(self.key(job_id), "status")
            found = self._call(pipe.execute)
        counts = dict.fromkeys((*ACTIVE, *TERMINAL), 0)
        for status in found:
            if status in counts:
                counts[status] += 1
        return counts

    def items_finished(self) -> dict[str, int]:
        done, failed = self._call(self.redis.mget, ITEMS + "done", ITEMS + "failed")
        return {"done": int(done or 0), "failed": int(failed or 0)}

    def chunk_items(self, job_id: str, chunk: int) -> list[dict[str, Any]]:
        return list(json.loads((self.folder(job_id) / "chunks" / f"{chunk:06d}.json").read_text()))

    def results(self, job: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Every recorded item's outcome, in input order (chunks not finished yet are skipped)."""
        folder = self.folder(job["id"]) / "results"
        for chunk in range(job["chunks"]):
            path = folder / f"{chunk:06d}.jsonl"
            if path.exists():
                with path.open() as lines:
                    for line in lines:
                        yield json.loads(line)

    # --- working ----------------------------------------------------------------------------

    def mark_running(self, job_id: str) -> bool:
        """``pending`` -> ``running``; False when the job was not pending (someone else runs it)."""
        return bool(self._call(self._start, keys=[self.key(job_id)], args=[time.time()]))

    def chunk_done(self, job_id: str, chunk: int) -> bool:
        return bool(self._call(self.redis.sismember, self.key(job_id) + ":chunks", chunk))

    def write_results(self, job_id: str, chunk: int, outcomes: list[dict[str, Any]]) -> None:
        """Write a chunk's results whole, then rename into place: readers never see half a file,
        and a second writer (a redelivered task) replaces it with the same content."""
        folder = self.folder(job_id) / "results"
        folder.mkdir(exist_ok=True)
        fd, temporary = tempfile.mkstemp(prefix=f".{chunk:06d}-", dir=folder)
        with os.fdopen(fd, "w") as out:
            for outcome in outcomes:
                out.write(json.dumps(outcome, separators=(",", ":")) + "\n")
        os.replace(temporary, folder / f"{chunk:06d}.jsonl")

    def record(
        self, job_id: str, chunk: int, done: int, failed: int, weights: dict[str, Any] | None
    ) -> Recorded:
        outcome = self._call(
            self._record,
            keys=[self.key(job_id), self.key(job_id) + ":chunks", ITEMS + "done", ITEMS + "failed"],
            args=[chunk, done, failed, time.time(), json.dumps(weights) if weights else ""],
        )
        return Recorded(first=outcome in (1, 2), finished=outcome == 2)

    def update(self, job_id: str, fields: dict[str, Any]) -> None:
        """Set fields of a job's record (dicts and lists as JSON) and mark it as progressing now."""
        flat: list[Any] = ["progress_at", time.time()]
        for key, value in fields.items():
            flat += [key, json.dumps(value) if isinstance(value, dict | list) else value]
        # Only while the record exists: an expired job is not brought back as a stub.
        self._call(self._update, keys=[self.key(job_id)], args=flat)

    def finish(self, job_id: str, status: str, fields: dict[str, Any] | None = None) -> str | None:
        """End a pending or running job as ``status`` with ``fields``; returns the state it is in
        now - another one when it had already ended (cancelled, say), which is then kept."""
        flat: list[Any] = []
        for key, value in (fields or {}).items():
            flat += [key, json.dumps(value) if isinstance(value, dict | list) else value]
        return self._call(self._finish, keys=[self.key(job_id)], args=[status, time.time(), *flat])

    def cancel(self, job_id: str) -> str | None:
        """Cancel a pending or running job; returns the state it is in now (None: no such job), or
        ``publishing``: a training job publishing its model can no longer be cancelled."""
        return self._call(self._cancel, keys=[self.key(job_id)], args=[time.time()])

    def sweep(self, now: float | None = None) -> int:
        """Delete job folders whose retention has passed (and stale incoming ones); returns how many."""
        now = time.time() if now is None else now
        removed = 0
        if not self.root.is_dir():
            return 0
        for folder in self.root.iterdir():
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

    # --- helpers ----------------------------------------------------------------------------

    @staticmethod
    def _call(method: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except redis.RedisError as exc:
            raise JobStoreUnavailable(str(exc)) from exc

    @staticmethod
    def _decode(raw: dict[str, Any]) -> dict[str, Any]:
        job: dict[str, Any] = dict(raw)
        for name in NUMBERS:
            if name in job:
                job[name] = int(job[name])
        for name in TIMES:
            if job.get(name) not in (None, ""):
                job[name] = float(job[name])
        for name in ("members", "member_weights", "weights", "selection", *TRAINING_JSON):
            if isinstance(job.get(name), str) and job[name]:
                job[name] = json.loads(job[name])
        return job


def _iso(moment: float | None) -> str | None:
    if not moment:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(moment)) + f".{int(moment % 1 * 1000):03d}Z"


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
        "created_at": _iso(job.get("created_at")),
        "started_at": _iso(started),
        "finished_at": _iso(ended),
        "expires_at": _iso(job.get("expires_at")),
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
        "created_at": _iso(job.get("created_at")),
        "started_at": _iso(job.get("started_at")),
        "published_at": _iso(job.get("published_at")),
        "finished_at": _iso(job.get("finished_at")),
        "expires_at": _iso(job.get("expires_at")),
        "links": {"self": f"/v1/jobs/{job['id']}", "model": f"/v1/models/{job['model']}"},
    }
    return body
