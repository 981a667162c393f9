"""Quotas: what one principal, and the whole fleet, may hold at once - reserved in Redis before
anything is written, atomically, so concurrent requests of one key can never together pass one.

An upload first takes a ``Reservation`` (``QuotaBook.reserve``, one Lua script): a place among the
principal's and the fleet's active jobs (and trainings), a place among the job records the
principal keeps (``kept_jobs``: ended ones count until they expire), and a byte ledger entry that
grows as the upload writes (``Reservation.grow``: bytes on disk, the archive as it arrives
included, against ``job_bytes``, ``total_job_bytes`` and the free space above
``QUOTA_MIN_FREE_BYTES``). The job it becomes takes its places over (``commit``); a refused or
failed upload gives them back (``release``); a gateway that dies mid-upload leaves a reservation
that lapses after ``QUOTA_RESERVATION_S`` without news.

Redis keys: active sets ``imagerec:active[:<owner>]`` and ``imagerec:trainings[:<owner>]`` (job ids
and ``r:<token>`` reservations; a set found at its limit first drops the members whose job is no
longer pending or running or whose reservation lapsed, so finishing a job needs no bookkeeping and
each ended one is looked at once); ``imagerec:kept:<owner>`` (sorted by when each entry expires);
the byte ledger ``imagerec:held`` (every entry, by expiry) with each entry's bytes and owner and a
running total per owner and for the fleet, each expired entry subtracted once. Admission never
walks the tenants' kept jobs: O(log n), plus at most one pass over a full active set. A refusal
names the quota and its figures (``common.errors.QuotaExceeded``, 429; 507 for free space).
"""

from __future__ import annotations

import contextlib
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import redis

from common.errors import InsufficientStorage, QuotaExceeded, ServiceError, UploadTooSlow
from common.tenancy.keys import Principal
from common.tenancy.settings import Quotas, QuotaSettings

ACTIVE_JOBS = "imagerec:active"  # + ":<owner>": pending and running jobs (and reservations)
TRAININGS = "imagerec:trainings"  # + ":<owner>": pending and running trainings

_LEDGER = """
local function purge(now)
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', 'imagerec:held', '-inf', now, 'LIMIT', 0, 256)) do
    local size = tonumber(redis.call('HGET', 'imagerec:held:bytes', m) or '0')
    local owner = redis.call('HGET', 'imagerec:held:owner', m)
    redis.call('DECRBY', 'imagerec:held:total', size)
    if owner then redis.call('DECRBY', 'imagerec:held:total:' .. owner, size) end
    redis.call('HDEL', 'imagerec:held:bytes', m)
    redis.call('HDEL', 'imagerec:held:owner', m)
    redis.call('ZREM', 'imagerec:held', m)
  end
end
local function forget(m)
  local size = tonumber(redis.call('HGET', 'imagerec:held:bytes', m) or '0')
  local owner = redis.call('HGET', 'imagerec:held:owner', m)
  if redis.call('ZREM', 'imagerec:held', m) == 1 then
    redis.call('DECRBY', 'imagerec:held:total', size)
    if owner then redis.call('DECRBY', 'imagerec:held:total:' .. owner, size) end
  end
  redis.call('HDEL', 'imagerec:held:bytes', m)
  redis.call('HDEL', 'imagerec:held:owner', m)
end
"""

# KEYS: the active sets to enter. ARGV: their limits, then owner, kept quota ('' none), token, now,
# ttl. Returns {0} when every place was taken, else {index of the first full set (1-based; #KEYS+1
# the kept jobs), its count}.
_RESERVE = (
    _LEDGER
    + """
local n = #KEYS
local owner, kept, token, now, ttl = ARGV[n+1], ARGV[n+2], ARGV[n+3], tonumber(ARGV[n+4]), tonumber(ARGV[n+5])
purge(now)
for i, key in ipairs(KEYS) do
  if redis.call('SCARD', key) >= tonumber(ARGV[i]) then  -- full: first drop whoever has ended
    for _, id in ipairs(redis.call('SMEMBERS', key)) do
      local alive
      if string.sub(id, 1, 2) == 'r:' then
        alive = redis.call('EXISTS', 'imagerec:reservation:' .. string.sub(id, 3)) == 1
      else
        local status = redis.call('HGET', 'imagerec:job:' .. id, 'status')
        alive = status == 'pending' or status == 'running'
      end
      if not alive then redis.call('SREM', key, id) end
    end
    local count = redis.call('SCARD', key)
    if count >= tonumber(ARGV[i]) then return {i, count} end
  end
end
local kept_key = 'imagerec:kept:' .. owner
redis.call('ZREMRANGEBYSCORE', kept_key, '-inf', now)
if kept ~= '' and redis.call('ZCARD', kept_key) >= tonumber(kept) then
  return {n + 1, redis.call('ZCARD', kept_key)}
end
local m = 'r:' .. token
redis.call('SET', 'imagerec:reservation:' .. token, owner, 'EX', math.ceil(ttl))
for _, key in ipairs(KEYS) do redis.call('SADD', key, m) end
redis.call('ZADD', kept_key, now + ttl, m)
redis.call('ZADD', 'imagerec:held', now + ttl, m)
redis.call('HSET', 'imagerec:held:bytes', m, 0)
redis.call('HSET', 'imagerec:held:owner', m, owner)
return {0}
"""
)

# ARGV: owner, token, want, need, owner's limit ('' none), fleet's limit, now, ttl. Grants ``want``
# bytes more, or at least ``need`` when that is all there is room for. Returns {'ok', granted},
# {'job_bytes' | 'total_job_bytes', used} or {'lapsed'}.
_GROW = (
    _LEDGER
    + """
local owner, token, want, need = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local mine, total, now, ttl = ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local m = 'r:' .. token
if redis.call('EXPIRE', 'imagerec:reservation:' .. token, math.ceil(ttl)) == 0 then return {'lapsed'} end
purge(now)
local used_mine = tonumber(redis.call('GET', 'imagerec:held:total:' .. owner) or '0')
local used_all = tonumber(redis.call('GET', 'imagerec:held:total') or '0')
local room = total - used_all
if mine ~= '' then room = math.min(room, tonumber(mine) - used_mine) end
if room < need then
  if mine ~= '' and tonumber(mine) - used_mine < need then return {'job_bytes', used_mine} end
  return {'total_job_bytes', used_all}
end
local granted = math.min(want, room)
redis.call('INCRBY', 'imagerec:held:total', granted)
redis.call('INCRBY', 'imagerec:held:total:' .. owner, granted)
redis.call('HINCRBY', 'imagerec:held:bytes', m, granted)
redis.call('ZADD', 'imagerec:held', now + ttl, m)
redis.call('ZADD', 'imagerec:kept:' .. owner, 'XX', now + ttl, m)
return {'ok', granted}
"""
)

# KEYS: the active sets. ARGV: owner, token, job id, bytes kept, expires at (unix seconds).
_COMMIT = (
    _LEDGER
    + """
local owner, token, job, size, expires = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local m = 'r:' .. token
forget(m)
for _, key in ipairs(KEYS) do
  redis.call('SREM', key, m)
  redis.call('SADD', key, job)
end
redis.call('ZREM', 'imagerec:kept:' .. owner, m)
redis.call('ZADD', 'imagerec:kept:' .. owner, expires, job)
redis.call('ZADD', 'imagerec:held', expires, job)
redis.call('HSET', 'imagerec:held:bytes', job, size)
redis.call('HSET', 'imagerec:held:owner', job, owner)
redis.call('INCRBY', 'imagerec:held:total', size)
redis.call('INCRBY', 'imagerec:held:total:' .. owner, size)
redis.call('DEL', 'imagerec:reservation:' .. token)
return 1
"""
)

# KEYS: the active sets. ARGV: owner, member (``r:<token>`` or a job id). Gives every place back.
_RELEASE = (
    _LEDGER
    + """
local owner, m = ARGV[1], ARGV[2]
forget(m)
for _, key in ipairs(KEYS) do redis.call('SREM', key, m) end
redis.call('ZREM', 'imagerec:kept:' .. owner, m)
if string.sub(m, 1, 2) == 'r:' then redis.call('DEL', 'imagerec:reservation:' .. string.sub(m, 3)) end
return 1
"""
)


@dataclass(frozen=True)
class _Limit:
    quota: str
    key: str
    limit: int
    what: str


class QuotaBook:
    """The quotas of one process, over the Redis the jobs live in."""

    def __init__(self, settings: QuotaSettings, client: redis.Redis) -> None:
        self.settings = settings
        self.redis = client
        self._reserve = client.register_script(_RESERVE)
        self._grow = client.register_script(_GROW)
        self._commit = client.register_script(_COMMIT)
        self._release = client.register_script(_RELEASE)

    def quotas(self, principal: Principal) -> Quotas:
        return self.settings.defaults.merged(principal.quotas)

    def _active(self, principal: Principal, training: bool) -> list[_Limit]:
        quotas, total = self.quotas(principal), self.settings
        limits = [
            _Limit("total_active_jobs", ACTIVE_JOBS, total.total_active_jobs, "the fleet's active jobs")
        ]
        if not principal.is_admin:
            limits.append(
                _Limit("active_jobs", f"{ACTIVE_JOBS}:{principal.id}", quotas.active_jobs, "your active jobs")
            )
        if training:
            limits.append(
                _Limit("total_trainings", TRAININGS, total.total_trainings, "the fleet's trainings")
            )
            if not principal.is_admin:
                limits.append(
                    _Limit("trainings", f"{TRAININGS}:{principal.id}", quotas.trainings, "your trainings")
                )
        return limits

    def reserve(
        self,
        principal: Principal,
        jobs_dir: Path,
        fleet_max_images: int,
        *,
        training: bool,
        declared: int = 0,
    ) -> Reservation:
        """Take ``principal``'s place for one more job before its upload is read, with the
        ``declared`` bytes it says it brings (its Content-Length), or raise 429 naming the quota it
        would pass (507 when the disk is below its free space): first come, first served."""
        limits = self._active(principal, training)
        kept = "" if principal.is_admin else str(self.quotas(principal).kept_jobs)
        token = uuid.uuid4().hex
        verdict = self._reserve(
            keys=[limit.key for limit in limits],
            args=[
                *(limit.limit for limit in limits),
                principal.id,
                kept,
                token,
                time.time(),
                self.settings.reservation_s,
            ],
        )
        if verdict[0]:
            index, count = int(verdict[0]), int(verdict[1])
            if index > len(limits):
                raise QuotaExceeded(
                    "kept_jobs",
                    int(kept),
                    count,
                    f"you keep {count} jobs of the last JOBS_RETENTION_S (quota 'kept_jobs' = {kept}): "
                    "they count until they expire",
                )
            found = limits[index - 1]
            raise QuotaExceeded(
                found.quota,
                found.limit,
                count,
                f"{found.what} are at their quota ({count} of {found.limit}, quota {found.quota!r}): "
                "wait for one to finish or cancel one",
            )
        images = (
            fleet_max_images
            if principal.is_admin
            else min(fleet_max_images, self.quotas(principal).job_images)
        )
        reservation = Reservation(
            self,
            principal,
            token,
            [limit.key for limit in limits],
            jobs_dir,
            max_images=images,
            images_quota=images < fleet_max_images,
        )
        try:
            reservation.declare(declared)  # refused before anything is read
        except BaseException:
            reservation.release()
            raise
        return reservation


@dataclass
class Reservation:
    """One upload's places and bytes (see the module): ``grow`` as it writes, ``commit`` to the job
    it became, or ``release``. As a context manager it is released unless committed."""

    book: QuotaBook
    principal: Principal
    token: str
    keys: list[str]
    jobs_dir: Path
    max_images: int
    images_quota: bool  # max_images is the principal's job_images quota, not the fleet's limit
    used: int = 0  # bytes written so far
    reserved: int = 0  # bytes held in the ledger
    _checked: float = field(default_factory=time.monotonic)
    _done: bool = False

    def __enter__(self) -> Reservation:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._done:
            with contextlib.suppress(redis.RedisError):  # unreachable: it lapses by itself
                self.release()

    def over_images(self, count: int) -> ServiceError:
        return QuotaExceeded(
            "job_images",
            self.max_images,
            count,
            f"more than {self.max_images} images in one job (your job_images quota)",
        )

    def grow(self, size: int) -> None:
        """Count ``size`` more bytes written to disk: reserved first, past what was declared a
        step at a time (fewer Redis calls); raises 429 (``job_bytes``, ``total_job_bytes``) or
        507 (free space) when there is no room."""
        self.used += size
        missing = self.used - self.reserved
        lapsing = time.monotonic() - self._checked > self.book.settings.reservation_s / 3
        if missing > 0 or lapsing:
            self._reserve(max(missing, 0), max(missing, self.book.settings.reservation_step_bytes))

    def declare(self, size: int) -> None:
        """Reserve the ``size`` bytes the upload says it brings (at least one), before any is read."""
        self._reserve(max(1, size), max(1, size))

    def _reserve(self, missing: int, want: int) -> None:
        """``want`` bytes more, or at least ``missing`` when that is all there is room for."""
        settings = self.book.settings
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.jobs_dir).free - settings.min_free_bytes
        if free < missing:
            raise InsufficientStorage(
                "the job store is out of space (below QUOTA_MIN_FREE_BYTES free): try again later"
            )
        want = min(want, free)
        mine = "" if self.principal.is_admin else str(self.book.quotas(self.principal).job_bytes)
        verdict = self.book._grow(
            args=[
                self.principal.id,
                self.token,
                want,
                missing,
                mine,
                settings.total_job_bytes,
                time.time(),
                settings.reservation_s,
            ]
        )
        self._checked = time.monotonic()
        outcome = verdict[0]
        if outcome == "ok":
            self.reserved += int(verdict[1])
            return
        if outcome == "lapsed":
            raise UploadTooSlow(
                f"the upload stalled for longer than QUOTA_RESERVATION_S ({settings.reservation_s:g} s)"
            )
        quota, used = str(outcome), int(verdict[1])
        limit = int(mine) if quota == "job_bytes" else settings.total_job_bytes
        whose = "your jobs'" if quota == "job_bytes" else "the fleet's jobs'"
        raise QuotaExceeded(
            quota,
            limit,
            used + missing,
            f"{whose} inputs on disk would pass their quota ({quota} = {limit} bytes, {used} used): they go "
            "when the jobs expire",
        )

    def commit(self, job_id: str, kept_bytes: int, expires_at: float) -> None:
        """The upload became job ``job_id``, keeping ``kept_bytes`` until ``expires_at``."""
        self.book._commit(
            keys=self.keys, args=[self.principal.id, self.token, job_id, kept_bytes, expires_at]
        )
        self._done = True

    def forget(self, job_id: str) -> None:
        """Give back what job ``job_id`` took over (it was discarded before it was queued)."""
        self.book._release(keys=self.keys, args=[self.principal.id, job_id])

    def release(self) -> None:
        """Give every place and byte back (the upload was refused or failed)."""
        self._done = True
        self.book._release(keys=self.keys, args=[self.principal.id, "r:" + self.token])
