"""Fair queues for job chunks: every principal's chunks wait in a backlog of its own, and at most
``JOBS_CHUNKS_PER_PRINCIPAL`` of them are in Celery's queue or running at once.

Celery's queue is first in, first out across keys: a key that queued four jobs of 1,000 URLs first
held every worker until they were done. Now a job's chunks go to its owner's backlog
(``imagerec:fair:backlog:<owner>``, a list of ``<job id>:<chunk>``), and only a few at a time are
handed to Celery (``imagerec:fair:sent:<owner>``, sorted by when each was sent). When a chunk task
ends, its worker hands the owner's next one over. The queue Celery holds is therefore at most that
many chunks per principal: another key's first chunk waits behind a few chunks of each busy key, not
behind all of them.

A chunk whose task was lost (Redis lost the message, a send failed) would hold its place for ever;
places older than ``stale_s`` are given back, and the stall watchdog queues the lost chunk again
(``common.jobs.upkeep.stalled``, which leaves alone the chunks still waiting here). A chunk of a job
that is no longer pending or running is dropped when its turn comes.
"""

from __future__ import annotations

from collections.abc import Iterable

import redis

from common.jobs.settings import JobSettings

BACKLOG = "imagerec:fair:backlog:"
SENT = "imagerec:fair:sent:"
OWNERS = "imagerec:fair:owners"  # principals with chunks in a backlog or sent

# KEYS: the owner's backlog, its sent set, the owners. ARGV: cap, now, stale_s, owner. Gives back
# stale places, then moves chunks of active jobs from the backlog to the sent set while under the
# cap: those to send.
_TOP_UP = """
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', tonumber(ARGV[2]) - tonumber(ARGV[3]))
local out = {}
while redis.call('ZCARD', KEYS[2]) < tonumber(ARGV[1]) do
  local ref = redis.call('LPOP', KEYS[1])
  if not ref then break end
  local job = string.match(ref, '^([^:]+):')
  local status = redis.call('HGET', 'imagerec:job:' .. job, 'status')
  if status == 'pending' or status == 'running' then
    redis.call('ZADD', KEYS[2], ARGV[2], ref)
    table.insert(out, ref)
  end
end
if redis.call('LLEN', KEYS[1]) == 0 and redis.call('ZCARD', KEYS[2]) == 0 then
  redis.call('SREM', KEYS[3], ARGV[4])
end
return out
"""


def _ref(job_id: str, chunk: int) -> str:
    return f"{job_id}:{chunk}"


def _parse(refs: Iterable[str | bytes]) -> list[tuple[str, int]]:
    found = []
    for ref in refs:
        text = ref.decode() if isinstance(ref, bytes) else ref
        job_id, _, chunk = text.partition(":")
        found.append((job_id, int(chunk)))
    return found


class FairQueue:
    """The backlogs in the jobs' Redis; ``submit`` and ``done`` return the chunks to send now."""

    def __init__(self, client: redis.Redis, per_principal: int, stale_s: float) -> None:
        self.redis = client
        self.per_principal = per_principal
        self.stale_s = stale_s
        self._top_up = client.register_script(_TOP_UP)

    @classmethod
    def of(cls, client: redis.Redis, settings: JobSettings) -> FairQueue:
        """The fair queue ``JOBS_CHUNKS_PER_PRINCIPAL`` and the visibility timeout describe."""
        return cls(client, settings.chunks_per_principal, settings.fair_stale_s)

    def submit(self, owner: str, job_id: str, chunks: Iterable[int], now: float) -> list[tuple[str, int]]:
        """Put a job's chunks at the end of its owner's backlog; the ones to send now."""
        refs = [_ref(job_id, chunk) for chunk in chunks]
        if refs:
            with self.redis.pipeline() as pipe:
                pipe.rpush(BACKLOG + owner, *refs)
                pipe.sadd(OWNERS, owner)
                pipe.execute()
        return self.next(owner, now)

    def done(self, owner: str, job_id: str, chunk: int, now: float) -> list[tuple[str, int]]:
        """A chunk task ended (recorded, skipped or cancelled): its place is free; the ones to send now."""
        self.redis.zrem(SENT + owner, _ref(job_id, chunk))
        return self.next(owner, now)

    def next(self, owner: str, now: float) -> list[tuple[str, int]]:
        """The owner's chunks to send now (its share has room, stale places given back)."""
        refs = self._top_up(
            keys=[BACKLOG + owner, SENT + owner, OWNERS], args=[self.per_principal, now, self.stale_s, owner]
        )
        return _parse(refs)

    def owners(self) -> list[str]:
        """Principals with chunks waiting or sent (the watchdog tops each up)."""
        found: set[str | bytes] = self.redis.smembers(OWNERS)  # type: ignore[assignment]
        return sorted(o.decode() if isinstance(o, bytes) else o for o in found)

    def backlog(self) -> int:
        """Chunks waiting in every principal's backlog (one LLEN per principal with any)."""
        with self.redis.pipeline() as pipe:
            for owner in self.owners():
                pipe.llen(BACKLOG + owner)
            return sum(int(n) for n in pipe.execute())

    def waiting(self, owner: str, job_id: str) -> set[int]:
        """Chunks of ``job_id`` still in its owner's backlog or sent and not ended (the watchdog's view)."""
        backlog: list[str | bytes] = self.redis.lrange(BACKLOG + owner, 0, -1)  # type: ignore[assignment]
        sent: list[str | bytes] = self.redis.zrange(SENT + owner, 0, -1)  # type: ignore[assignment]
        refs = [*backlog, *sent]
        return {chunk for found, chunk in _parse(refs) if found == job_id}
