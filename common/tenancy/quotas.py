"""Quotas: what one principal, and the whole fleet, may hold at once - checked in Redis, atomically.

Active jobs and trainings are sets of job ids (``imagerec:active:<owner>``, ``imagerec:active``,
and the same under ``trainings``). Admitting a job is one Lua script: it first drops the ids whose
record is gone or no longer pending or running (so finishing a job needs no bookkeeping: a job that
ended, expired or was cancelled stops counting by itself), then checks every set against its limit
and adds the job to all of them, or to none. Bytes of job inputs are summed over the owner's (and
every owner's) unexpired job records (``input_bytes``). A refusal names the quota and its figures
(``common.errors.QuotaExceeded``, 429).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import redis

from common.errors import InsufficientStorage, PayloadTooLarge, QuotaExceeded, ServiceError
from common.tenancy.keys import Principal
from common.tenancy.settings import Quotas, QuotaSettings

JOB = "imagerec:job:"
OWNED = "imagerec:jobs:owner:"  # sorted set per owner: job id by creation time (the listing too)
INDEX = "imagerec:jobs"

# KEYS: the sets; ARGV: limits, one per set, then the job id ('' to check without adding).
# Returns {0} when admitted, else {index of the first full set (1-based), its count}.
_ADMIT = """
for i, key in ipairs(KEYS) do
  for _, id in ipairs(redis.call('SMEMBERS', key)) do
    local status = redis.call('HGET', 'imagerec:job:' .. id, 'status')
    if status ~= 'pending' and status ~= 'running' then redis.call('SREM', key, id) end
  end
end
for i, key in ipairs(KEYS) do
  local count = redis.call('SCARD', key)
  if count >= tonumber(ARGV[i]) and redis.call('SISMEMBER', key, ARGV[#ARGV]) == 0 then
    return {i, count}
  end
end
if ARGV[#ARGV] ~= '' then
  for _, key in ipairs(KEYS) do redis.call('SADD', key, ARGV[#ARGV]) end
end
return {0}
"""

# KEYS[1]: a sorted set of job ids. Sums their records' input_bytes, forgetting expired ones.
_BYTES = """
local total = 0
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local size = redis.call('HGET', 'imagerec:job:' .. id, 'input_bytes')
  if size then total = total + tonumber(size)
  elseif redis.call('EXISTS', 'imagerec:job:' .. id) == 0 then redis.call('ZREM', KEYS[1], id) end
end
return total
"""


@dataclass(frozen=True)
class Bound:
    """One limit on the bytes a request may write: ``quota`` names it ('' the per-request limit,
    ``free_space`` the disk), ``left`` is what remains, ``used`` and ``limit`` its figures."""

    quota: str
    left: int
    used: int
    limit: int


@dataclass(frozen=True)
class Allowance:
    """What one request may bring: images (``images_quota``: that is the principal's ``job_images``
    quota, not the fleet's limit) and bytes written to disk across all of its parts, within the
    tightest ``bytes`` bound."""

    max_images: int
    images_quota: bool
    bytes: Bound

    @property
    def max_bytes(self) -> int:
        return self.bytes.left

    def over_images(self, count: int) -> ServiceError:
        return QuotaExceeded(
            "job_images",
            self.max_images,
            count,
            f"more than {self.max_images} images in one job (your job_images quota)",
        )

    def over_bytes(self, written: int) -> ServiceError:
        """The refusal for a request that would write ``written`` more bytes than allowed."""
        bound = self.bytes
        if bound.quota == "free_space":
            return InsufficientStorage(
                "the job store is out of space (below QUOTA_MIN_FREE_BYTES free): try again later"
            )
        if bound.quota:
            whose = "your jobs'" if bound.quota == "job_bytes" else "the fleet's jobs'"
            return QuotaExceeded(
                bound.quota,
                bound.limit,
                bound.used + written,
                f"{whose} inputs on disk would pass their quota ({bound.quota} = {bound.limit} bytes, "
                f"{bound.used} used): they go when the jobs expire",
            )
        return PayloadTooLarge(
            f"the job's inputs exceed {bound.limit} bytes on disk (JOBS_MAX_UNCOMPRESSED_BYTES)"
        )


def unlimited(max_images: int, max_bytes: int) -> Allowance:
    """An allowance of the fleet's own limits alone (no principal's quotas)."""
    return Allowance(max_images, False, Bound("", max_bytes, 0, max_bytes))


class QuotaBook:
    """The quota checks of one process, over the Redis the jobs live in."""

    def __init__(self, settings: QuotaSettings, client: redis.Redis) -> None:
        self.settings = settings
        self.redis = client
        self._admit = client.register_script(_ADMIT)
        self._bytes = client.register_script(_BYTES)

    def quotas(self, principal: Principal) -> Quotas:
        return self.settings.defaults.merged(principal.quotas)

    def admit_job(self, principal: Principal, job_id: str, *, training: bool) -> None:
        """Count ``job_id`` as active for ``principal`` (and as a training), or raise 429 naming the
        quota it would pass. ``job_id`` '' only checks (before an upload is read)."""
        quotas, total = self.quotas(principal), self.settings
        limits: list[tuple[str, str, int, str]] = [
            ("total_active_jobs", "imagerec:active", total.total_active_jobs, "the fleet's active jobs"),
        ]
        if not principal.is_admin:
            limits.append(
                ("active_jobs", f"imagerec:active:{principal.id}", quotas.active_jobs, "your active jobs")
            )
        if training:
            limits.append(
                ("total_trainings", "imagerec:trainings", total.total_trainings, "the fleet's trainings")
            )
            if not principal.is_admin:
                limits.append(
                    ("trainings", f"imagerec:trainings:{principal.id}", quotas.trainings, "your trainings")
                )
        keys = [key for _, key, _, _ in limits]
        verdict = self._admit(keys=keys, args=[*(limit for _, _, limit, _ in limits), job_id])
        if verdict[0]:
            quota, _, limit, what = limits[int(verdict[0]) - 1]
            raise QuotaExceeded(
                quota,
                limit,
                int(verdict[1]),
                f"{what} are at their quota ({verdict[1]} of {limit}, quota {quota!r}): wait for one to "
                "finish or cancel one",
            )

    def allowance(
        self, principal: Principal, jobs_dir: Path, per_request_bytes: int, fleet_max_images: int
    ) -> Allowance:
        """What ``principal``'s next upload may bring. Its bytes on disk are the least of the
        per-request limit, what is left of its ``job_bytes`` quota and of the fleet's, and the free
        space above ``QUOTA_MIN_FREE_BYTES``; the allowance remembers which one binds, so a request
        that passes it is refused by that name. Raises 429 or 507 when nothing is left."""
        total = self.settings
        used_all = int(self._bytes(keys=[INDEX]))
        bounds = [
            Bound("", per_request_bytes, 0, per_request_bytes),
            Bound("total_job_bytes", total.total_job_bytes - used_all, used_all, total.total_job_bytes),
        ]
        images = fleet_max_images
        if not principal.is_admin:
            quotas = self.quotas(principal)
            used = int(self._bytes(keys=[OWNED + principal.id]))
            bounds.append(Bound("job_bytes", quotas.job_bytes - used, used, quotas.job_bytes))
            images = min(fleet_max_images, quotas.job_images)
        jobs_dir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(jobs_dir).free - total.min_free_bytes
        bounds.append(Bound("free_space", free, 0, 0))
        tightest = min(bounds, key=lambda bound: bound.left)
        allowance = Allowance(images, images < fleet_max_images, tightest)
        if tightest.left <= 0:
            raise allowance.over_bytes(0)
        return allowance

    def job_images(self, principal: Principal, fleet_max: int) -> int:
        return fleet_max if principal.is_admin else min(fleet_max, self.quotas(principal).job_images)
