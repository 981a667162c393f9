"""Removing a custom model: the gateway asks, the trainer - the model repository's one writer -
does it.

The gateway pushes a request on a Redis list and waits up to ``TRAINING_REMOVE_WAIT_S`` for the
answer on a list of the request's own. The trainer's main process pops requests (``serve``) and
removes the model's folder (``common.repository.remove``: a rename, then a delete) under the
repository's lock, the one publishing takes; a publication first carries out every removal asked
before it (``carry_out``), so a name deleted and trained again never loses its new version. The
model services stop serving a removed model on their next look at the repository. A request the
trainer has not answered in time stays queued: it is carried out when the trainer is back.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import redis

from common import repository

log = logging.getLogger(__name__)
QUEUE = "imagerec:repository:removals"
REPLY = "imagerec:repository:removed:"
REPLY_TTL_S = 60


def ask(client: redis.Redis, name: str, wait_s: float) -> bool | None:
    """Ask for ``name`` to be removed: True once removed, False when there was nothing to remove,
    None when the trainer did not answer within ``wait_s`` (the request stays queued)."""
    ticket = uuid.uuid4().hex
    client.lpush(QUEUE, json.dumps({"name": name, "ticket": ticket}))
    give_up = time.monotonic() + wait_s
    while time.monotonic() < give_up:
        # A second at a time: a blocking pop must end before the client's socket time-out does.
        reply: list[Any] | None = client.blpop([REPLY + ticket], timeout=1)  # type: ignore[assignment]
        if reply is not None:
            return bool(json.loads(reply[1])["removed"])
    return None


def _answer(client: redis.Redis, root: Path, raw: bytes | str) -> None:
    request = json.loads(raw)
    name = str(request.get("name", ""))
    removed = not repository.check_name(name) and repository.remove(root, name)
    log.info("custom model removal", extra={"model": name, "removed": removed})
    key = REPLY + str(request.get("ticket", ""))
    pipe = client.pipeline()
    pipe.rpush(key, json.dumps({"removed": removed}))
    pipe.expire(key, REPLY_TTL_S)
    pipe.execute()


def carry_out(client: redis.Redis, root: Path) -> int:
    """Every removal asked so far, now (the caller holds the repository's lock); how many."""
    done = 0
    while (raw := client.rpop(QUEUE)) is not None:
        _answer(client, root, raw)  # type: ignore[arg-type]
        done += 1
    return done


def serve(client: redis.Redis, root: Path, stop: threading.Event, block_s: int = 1) -> None:
    """The trainer's loop: answer removal requests as they come, until ``stop`` is set."""
    while not stop.is_set():
        try:
            popped: list[Any] | None = client.brpop([QUEUE], timeout=block_s)  # type: ignore[assignment]
            if popped is not None:
                with repository.locked(root):
                    _answer(client, root, popped[1])
        except redis.RedisError:  # Redis is away: requests wait in it; try again shortly
            log.warning("removal requests unreachable; retrying", exc_info=True)
            stop.wait(block_s)
