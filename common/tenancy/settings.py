"""Tenancy settings: ``AUTH_<FIELD>`` (keys, anonymous access) and ``QUOTA_<FIELD>`` (what one
principal, and the whole fleet, may hold). Read by the gateway and the job workers alike.

The admin key is ``IMAGEREC_ADMIN_KEY`` when set (compose and Kubernetes pass it from a Secret);
otherwise the first process that needs it generates one into ``AUTH_ADMIN_KEY_FILE`` (mode 0600).
Redis is ``AUTH_REDIS_URL``, else ``REDIS_URL``; without either, keys live in the process's memory
(one process only: tests and a single worker)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields

from common.settings import load, load_with_redis, secret, setting

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUOTA_NAMES = (
    "active_jobs",
    "kept_jobs",
    "job_images",
    "job_bytes",
    "custom_models",
    "fine_tuned",
    "trainings",
)


@dataclass(frozen=True)
class AuthSettings:
    redis_url: str = setting("", "Redis holding keys and owners (falls back to REDIS_URL; empty: memory)")
    admin_key: str = setting(
        "", "read from IMAGEREC_ADMIN_KEY (or the file IMAGEREC_ADMIN_KEY_FILE names): the admin's key"
    )
    admin_key_file: str = setting(
        os.path.join(ROOT, "run", "admin.key"),
        "where a generated admin key is written (mode 0600) when IMAGEREC_ADMIN_KEY is empty",
    )
    anonymous_predict: bool = setting(
        True, "callers without a key may predict (only predict: jobs, training and keys need one)"
    )
    key_cache_s: float = setting(
        2.0, "seconds a process trusts what it last read of a key: a revocation lands within this (+1 s)"
    )
    max_keys: int = setting(1000, "most keys that may exist at once (admin's included: 409 beyond)")
    max_name_chars: int = setting(64, "longest key name")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> AuthSettings:
        env = os.environ if environ is None else environ
        return load_with_redis(cls, ("AUTH_",), env, admin_key=secret(env, "IMAGEREC_ADMIN_KEY"))

    def __post_init__(self) -> None:
        if not 0 < self.key_cache_s <= 4:
            raise ValueError("AUTH_KEY_CACHE_S must be in (0, 4]: a revoked key must stop within 5 s")


@dataclass(frozen=True)
class Quotas:
    """What one principal may hold at once: the ``QUOTA_<FIELD>`` defaults, any of which a key may
    override (``POST /v1/keys`` ``{"quotas": {...}}``). Admin is bound by the totals alone."""

    active_jobs: int
    kept_jobs: int
    job_images: int
    job_bytes: int
    custom_models: int
    fine_tuned: int
    trainings: int

    def merged(self, overrides: Mapping[str, int]) -> Quotas:
        return Quotas(**{f.name: int(overrides.get(f.name, getattr(self, f.name))) for f in fields(self)})


@dataclass(frozen=True)
class QuotaSettings:
    """``QUOTA_<FIELD>``: each principal's defaults and the fleet's totals."""

    active_jobs: int = setting(4, "pending or running jobs (inference and training) of one principal")
    kept_jobs: int = setting(
        1_000, "job records one principal keeps, ended ones included, until they expire (JOBS_RETENTION_S)"
    )
    job_images: int = setting(5_000, "images in one job of one principal (JOBS_MAX_IMAGES bounds all)")
    job_bytes: int = setting(
        2 * 1024**3, "bytes of job inputs one principal keeps on disk (until its jobs expire)"
    )
    custom_models: int = setting(5, "custom model names one principal owns (trained or training)")
    fine_tuned: int = setting(1, "of those, fine-tuned ones (each holds a copy of the backbone)")
    trainings: int = setting(1, "training jobs of one principal pending or running at once")
    total_active_jobs: int = setting(64, "pending or running jobs of all principals together")
    total_job_bytes: int = setting(50 * 1024**3, "bytes of job inputs on disk, all principals together")
    total_custom_models: int = setting(200, "custom model names, all principals together")
    total_trainings: int = setting(4, "training jobs pending or running, all principals together")
    min_free_bytes: int = setting(
        2 * 1024**3, "free space the jobs folder must keep: an upload is refused (507) below it"
    )
    reservation_step_bytes: int = setting(
        4 * 1024**2,
        "bytes an upload reserves at a time as it writes: one upload holds at most this much more than "
        "it wrote, until it ends",
    )
    reservation_s: float = setting(
        300.0,
        "an upload's reserved places and bytes lapse after this long without news (a gateway that died "
        "mid-upload); an upload stalled that long is refused (408)",
    )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> QuotaSettings:
        return load(cls, ("QUOTA_",), environ)

    @property
    def defaults(self) -> Quotas:
        return Quotas(**{name: getattr(self, name) for name in QUOTA_NAMES})
