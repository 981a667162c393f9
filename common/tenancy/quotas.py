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
from pathlib import Path

import redis

from common.errors import InsufficientStorage, QuotaExceeded
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

    def bytes_left(self, principal: Principal, jobs_dir: Path) -> int:
        """Bytes of job inputs ``principal`` may still write: its quota, the fleet's, and the free
        space above ``QUOTA_MIN_FREE_BYTES``, whichever is least. Raises 429 or 507 at none."""
        total = self.settings
        used_all = int(self._bytes(keys=[INDEX]))
        left = total.total_job_bytes - used_all
        if left <= 0:
            raise QuotaExceeded(
                "total_job_bytes",
                total.total_job_bytes,
                used_all,
                "the fleet's job inputs are at their quota: try again when older jobs expire",
            )
        if not principal.is_admin:
            quota = self.quotas(principal).job_bytes
            used = int(self._bytes(keys=[OWNED + principal.id]))
            if used >= quota:
                raise QuotaExceeded(
                    "job_bytes",
                    quota,
                    used,
                    f"your jobs' inputs take {used} bytes on disk, your quota (job_bytes) is {quota}: "
                    "they go when your jobs expire",
                )
            left = min(left, quota - used)
        jobs_dir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(jobs_dir).free - total.min_free_bytes
        if free <= 0:
            raise InsufficientStorage(
                "the job store is out of space (below QUOTA_MIN_FREE_BYTES free): try again later"
            )
        return min(left, free)

    def job_images(self, principal: Principal, fleet_max: int) -> int:
        return fleet_max if principal.is_admin else min(fleet_max, self.quotas(principal).job_images)
