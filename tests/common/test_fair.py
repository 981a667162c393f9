"""Fair queues on a real Redis: each principal's chunks wait in its own backlog and at most its
share is ever sent to the task queue, so another key's job waits behind a few chunks of each busy
key, never behind all of them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from common.jobs.fair import FairQueue

JOBS = [f"{n:032x}" for n in range(6)]


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    found = redis.Redis.from_url(redis_url, decode_responses=True)
    found.flushall()
    for job_id in JOBS:
        found.hset(f"imagerec:job:{job_id}", "status", "pending")
    yield found
    found.flushall()


def test_a_key_with_four_big_jobs_holds_its_share_and_another_keys_job_goes_next(client: redis.Redis) -> None:
    fair = FairQueue(client, per_principal=2, stale_s=600)
    sent = []  # the task queue, first in first out
    for job_id in JOBS[:4]:  # four jobs of 25 chunks, queued first
        sent += fair.submit("hog", job_id, range(25), now=100)
    assert sent == [(JOBS[0], 0), (JOBS[0], 1)]  # its share, the oldest job first
    sent += fair.submit("small", JOBS[4], range(1), now=101)
    assert sent[2] == (JOBS[4], 0)  # behind two of hog's chunks, not a hundred
    # A worker ends hog's first chunk: hog's next goes, in its own order, still two at a time.
    sent += fair.done("hog", JOBS[0], 0, now=102)
    assert sent[3:] == [(JOBS[0], 2)]
    assert fair.waiting("hog", JOBS[0]) == set(range(1, 25))  # sent or in the backlog, not ended
    assert fair.backlog() == 4 * 25 - 3


def test_chunks_of_a_job_that_ended_are_dropped_when_their_turn_comes(client: redis.Redis) -> None:
    fair = FairQueue(client, per_principal=1, stale_s=600)
    assert fair.submit("alice", JOBS[0], range(3), now=100) == [(JOBS[0], 0)]
    fair.submit("alice", JOBS[1], range(2), now=100)
    client.hset(f"imagerec:job:{JOBS[0]}", "status", "cancelled")
    assert fair.done("alice", JOBS[0], 0, now=101) == [(JOBS[1], 0)]  # JOBS[0]'s 1 and 2 dropped
    assert fair.done("alice", JOBS[1], 0, now=102) == [(JOBS[1], 1)]
    assert fair.done("alice", JOBS[1], 1, now=103) == []
    assert fair.owners() == [] and fair.backlog() == 0  # nothing left: the principal is forgotten


def test_a_place_whose_task_was_lost_is_given_back_after_stale_s(client: redis.Redis) -> None:
    fair = FairQueue(client, per_principal=1, stale_s=600)
    assert fair.submit("alice", JOBS[0], range(2), now=100) == [(JOBS[0], 0)]  # then the task is lost
    assert fair.next("alice", now=699) == []  # still its place
    assert fair.next("alice", now=701) == [(JOBS[0], 1)]  # the watchdog's top-up sends the next
    assert fair.owners() == ["alice"]
