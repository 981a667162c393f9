"""Removing a custom model through the trainer: asked by the gateway, done by the repository's one
writer, in order with publications (real Redis)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from common import repository
from common.training import removals


def publish(root: Path, name: str) -> int:
    meta = {"name": name, "base": "resnet50", "base_weights_hash": "h", "features": 2, "classes": ["a", "b"]}
    return repository.publish(root, name, repository.write_head(np.eye(2), np.zeros(2)), meta)


@pytest.fixture
def queue(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    client.delete(removals.QUEUE)
    yield client
    client.delete(removals.QUEUE)


def test_the_trainer_removes_a_model_and_says_so(queue: redis.Redis, trainer_removals: Path) -> None:
    publish(trainer_removals, "pets")
    publish(trainer_removals, "pets")
    assert removals.ask(queue, "pets", wait_s=5) is True
    assert not (trainer_removals / "pets").exists() and repository.newest(trainer_removals) == {}
    assert removals.ask(queue, "pets", wait_s=5) is False  # nothing left to remove


def test_a_name_that_cannot_name_a_model_removes_nothing(queue: redis.Redis, trainer_removals: Path) -> None:
    (trainer_removals / "keep").mkdir()
    assert removals.ask(queue, "../keep", wait_s=5) is False
    assert removals.ask(queue, "resnet50", wait_s=5) is False
    assert (trainer_removals / "keep").is_dir()


def test_without_a_trainer_the_request_waits_for_one(queue: redis.Redis, tmp_path: Path) -> None:
    publish(tmp_path, "pets")
    assert removals.ask(queue, "pets", wait_s=1) is None  # nobody answered: it stays queued
    assert (tmp_path / "pets").is_dir() and queue.llen(removals.QUEUE) == 1
    with repository.locked(tmp_path):  # what the trainer does before its next publication
        assert removals.carry_out(queue, tmp_path) == 1
    assert not (tmp_path / "pets").exists() and queue.llen(removals.QUEUE) == 0


def test_a_removal_asked_before_a_publication_never_takes_the_new_version(
    queue: redis.Redis, tmp_path: Path
) -> None:
    """Deleted, then trained again at once: the trainer carries out the removal first."""
    publish(tmp_path, "pets")
    queue.lpush(removals.QUEUE, json.dumps({"name": "pets", "ticket": "t1"}))
    with repository.locked(tmp_path):
        removals.carry_out(queue, tmp_path)
        version = publish(tmp_path, "pets")
    assert version == 1 and repository.versions(tmp_path, "pets") == [1]
    assert 0 < queue.ttl(removals.REPLY + "t1") <= removals.REPLY_TTL_S  # an answer nobody reads expires
    assert json.loads(queue.lpop(removals.REPLY + "t1"))["removed"] is True  # type: ignore[arg-type]
