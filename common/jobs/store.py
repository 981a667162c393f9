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

from common.jobs import scripts
from common.outcomes import Outcome, outcome_from_json
from common.tenancy.quotas import ACTIVE_JOBS

ADMIN = "admin"  # the owner of jobs made before keys existed (common.tenancy.keys.ADMIN_ID)

PREFIX = "imagerec:job:"
INDEX = "imagerec:jobs"  # sorted set: job id by creation time
OWNED = "imagerec:jobs:owner:"  # + owner: the same, one principal's jobs
ITEMS = "imagerec:jobs:items:"  # + done | failed: items finished, all jobs (for metrics)
ACTIVE = ("pending", "running")
TERMINAL = ("completed", "failed", "cancelled")
JOB_ID = re.compile(r"^[0-9a-f]{32}$")

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


def call(method: Any, *args: Any, **kwargs: Any) -> Any:
    """A Redis call of the store: its failure is ``JobStoreUnavailable``."""
    try:
        return method(*args, **kwargs)
    except redis.RedisError as exc:
        raise JobStoreUnavailable(str(exc)) from exc


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
        self._record = client.register_script(scripts.RECORD)
        self._start = client.register_script(scripts.START)
        self._cancel = client.register_script(scripts.CANCEL)
        self._finish = client.register_script(scripts.FINISH)
        self._update = client.register_script(scripts.UPDATE)

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
        raw = call(self.redis.hgetall, self.key(job_id))
        return self._decode(raw) if raw else None

    def recent(
        self, limit: int, before: float | None = None, owner: str | None = None
    ) -> list[dict[str, Any]]:
        """Newest first; ``before`` (a creation time) pages on; ``owner``: that principal's alone."""
        top = f"({before}" if before is not None else "+inf"
        index = INDEX if owner is None else OWNED + owner
        ids = call(self.redis.zrevrangebyscore, index, top, "-inf", start=0, num=limit)
        with self.redis.pipeline() as pipe:
            for job_id in ids:
                pipe.hgetall(self.key(job_id))
            found = call(pipe.execute)
        return [self._decode(raw) for raw in found if raw]

    def active(self, newest: int = 1000) -> list[dict[str, Any]]:
        """Every pending and running job (the set admission keeps, however many), and any among the
        ``newest`` that is not in it (made before it existed)."""
        ids = set(call(self.redis.smembers, ACTIVE_JOBS))  # common.tenancy.quotas keeps it
        ids |= set(call(self.redis.zrevrange, INDEX, 0, newest - 1))
        with self.redis.pipeline() as pipe:
            for job_id in ids:
                pipe.hgetall(self.key(job_id))
            found = call(pipe.execute)
        return [job for job in (self._decode(raw) for raw in found if raw) if job.get("status") in ACTIVE]

    def states(self, newest: int = 1000) -> dict[str, int]:
        """Jobs by state among the ``newest`` (for metrics)."""
        ids = call(self.redis.zrevrange, INDEX, 0, newest - 1)
        with self.redis.pipeline() as pipe:
            for job_id in ids:
                pipe.hget(self.key(job_id), "status")
            found = call(pipe.execute)
        counts = dict.fromkeys((*ACTIVE, *TERMINAL), 0)
        for status in found:
            if status in counts:
                counts[status] += 1
        return counts

    def items_finished(self) -> dict[str, int]:
        done, failed = call(self.redis.mget, ITEMS + "done", ITEMS + "failed")
        return {"done": int(done or 0), "failed": int(failed or 0)}

    def chunk_items(self, job_id: str, chunk: int) -> list[dict[str, Any]]:
        return list(json.loads((self.folder(job_id) / "chunks" / f"{chunk:06d}.json").read_text()))

    def results(self, job: dict[str, Any]) -> Iterator[Outcome]:
        """Every recorded item's outcome, in input order (chunks not finished yet are skipped)."""
        folder = self.folder(job["id"]) / "results"
        for chunk in range(job["chunks"]):
            path = folder / f"{chunk:06d}.jsonl"
            if path.exists():
                with path.open() as lines:
                    for line in lines:
                        yield outcome_from_json(json.loads(line))

    # --- working ----------------------------------------------------------------------------

    def mark_running(self, job_id: str) -> bool:
        """``pending`` -> ``running``; False when the job was not pending (someone else runs it)."""
        return bool(call(self._start, keys=[self.key(job_id)], args=[time.time()]))

    def chunk_done(self, job_id: str, chunk: int) -> bool:
        return bool(call(self.redis.sismember, self.key(job_id) + ":chunks", chunk))

    def write_results(self, job_id: str, chunk: int, outcomes: list[Outcome]) -> None:
        """Write a chunk's results whole, then rename into place: readers never see half a file,
        and a second writer (a redelivered task) replaces it with the same content."""
        folder = self.folder(job_id) / "results"
        folder.mkdir(exist_ok=True)
        fd, temporary = tempfile.mkstemp(prefix=f".{chunk:06d}-", dir=folder)
        with os.fdopen(fd, "w") as out:
            for outcome in outcomes:
                out.write(json.dumps(outcome.to_json(), separators=(",", ":")) + "\n")
        os.replace(temporary, folder / f"{chunk:06d}.jsonl")

    def record(
        self, job_id: str, chunk: int, done: int, failed: int, weights: dict[str, Any] | None
    ) -> Recorded:
        outcome = call(
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
        call(self._update, keys=[self.key(job_id)], args=flat)

    def finish(self, job_id: str, status: str, fields: dict[str, Any] | None = None) -> str | None:
        """End a pending or running job as ``status`` with ``fields``; returns the state it is in
        now - another one when it had already ended (cancelled, say), which is then kept."""
        flat: list[Any] = []
        for key, value in (fields or {}).items():
            flat += [key, json.dumps(value) if isinstance(value, dict | list) else value]
        return call(self._finish, keys=[self.key(job_id)], args=[status, time.time(), *flat])

    def cancel(self, job_id: str) -> str | None:
        """Cancel a pending or running job; returns the state it is in now (None: no such job), or
        ``publishing``: a training job publishing its model can no longer be cancelled."""
        return call(self._cancel, keys=[self.key(job_id)], args=[time.time()])

    # --- helpers ----------------------------------------------------------------------------

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
