"""API keys: who is calling, and what they may do.

A key is ``irk_<id>_<secret>``: the id (12 hex digits) finds its record, the secret is 32 random
bytes. Only the key's SHA-256 is stored, and it is compared in constant time; the key itself is
shown once, when it is created. A record (Redis hash ``imagerec:key:<id>``) has a name, scopes
(``predict``, ``jobs``, ``train``, ``admin``) and quota overrides. Every process caches what it read
of a key for ``AUTH_KEY_CACHE_S`` (2 s), so a revoked key stops working everywhere within that.

The admin principal's key is not stored: it is ``IMAGEREC_ADMIN_KEY``, or the key generated once
into ``AUTH_ADMIN_KEY_FILE``. Jobs and custom models made before keys existed belong to it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from cachetools import TTLCache

from common import wire
from common.tenancy.settings import QUOTA_NAMES, AuthSettings

SCOPES = ("predict", "jobs", "train", "admin")
ADMIN_ID = "admin"
PREFIX = "imagerec:key:"
INDEX = "imagerec:keys"
KEY = re.compile(r"^irk_([0-9a-f]{12})_[A-Za-z0-9_-]{43}$")
ID = re.compile(r"^[0-9a-f]{12}$")

_CREATE = """
if redis.call('SCARD', KEYS[2]) >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('SADD', KEYS[2], ARGV[2])
return 1
"""


@dataclass(frozen=True)
class Principal:
    """A caller: the admin, a key's holder, or anonymous (``id`` ``anonymous``, no key)."""

    id: str
    name: str
    scopes: frozenset[str]
    quotas: Mapping[str, int] = field(default_factory=dict)

    @property
    def is_admin(self) -> bool:
        return "admin" in self.scopes

    @property
    def anonymous(self) -> bool:
        return self.id == "anonymous"

    def can(self, scope: str) -> bool:
        return self.is_admin or scope in self.scopes

    def sees(self, owner: str) -> bool:
        """Whether this principal may see what ``owner`` made (its own, or anything for admin)."""
        return self.is_admin or (not self.anonymous and owner == self.id)

    def audit(self) -> dict[str, str]:
        """What a log line names: the id and the name, never the secret."""
        return {"principal": self.id, "principal_name": self.name}


ADMIN = Principal(ADMIN_ID, "admin", frozenset(SCOPES))


def anonymous(can_predict: bool) -> Principal:
    return Principal("anonymous", "anonymous", frozenset({"predict"} if can_predict else ()))


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


class KeysUnavailable(Exception):
    """Keys other than admin's need Redis, and it cannot be reached (or is not configured)."""


class TooManyKeys(Exception):
    pass


def admin_key(settings: AuthSettings) -> str:
    """``IMAGEREC_ADMIN_KEY``, else the key in ``AUTH_ADMIN_KEY_FILE``, generated there (0600) by
    the first process that asks: written aside, then linked into place, so no process reads half
    of one and two processes starting at once agree on one key."""
    if settings.admin_key:
        return settings.admin_key
    path = Path(settings.admin_key_file)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(prefix=".admin-key-", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as out:  # mkstemp makes it 0600
                out.write(new_key() + "\n")
            try:
                os.link(temporary, path)
            except FileExistsError:
                pass  # another process won the race: its key is the key
        finally:
            os.unlink(temporary)
    return path.read_text().strip()


def new_key(key_id: str | None = None) -> str:
    return f"irk_{key_id or secrets.token_hex(6)}_{secrets.token_urlsafe(32)}"


class KeyStore:
    """Keys in Redis (every process sees the same ones) and the admin key, behind a short cache."""

    def __init__(self, settings: AuthSettings, client: redis.Redis | None = None) -> None:
        self.settings = settings
        self.admin_digest = digest(admin_key(settings))
        self.redis = client
        if client is None and settings.redis_url:
            self.redis = redis.Redis.from_url(
                settings.redis_url, decode_responses=True, socket_timeout=2, socket_connect_timeout=1
            )
        self._create = self.redis.register_script(_CREATE) if self.redis is not None else None
        self._cache: TTLCache[str, Principal | None] = TTLCache(10_000, settings.key_cache_s)
        self._live: TTLCache[str, bool] = TTLCache(10_000, settings.key_cache_s)
        self._lock = threading.Lock()

    # --- who is calling --------------------------------------------------------------------

    def authenticate(self, key: str) -> Principal | None:
        """The principal ``key`` belongs to; None for a key that is not (or no longer) valid.
        Raises ``KeysUnavailable`` when a non-admin key cannot be checked (Redis down)."""
        hashed = digest(key)
        if hmac.compare_digest(hashed, self.admin_digest):
            return ADMIN
        with self._lock:
            if hashed in self._cache:
                return self._cache[hashed]
        found = None
        match = KEY.match(key)
        if match:
            record = self._read(match.group(1))
            if record and hmac.compare_digest(record.get("hash", ""), hashed):
                found = _principal(record)
        with self._lock:
            self._cache[hashed] = found
        return found

    def cached(self, key: str) -> Principal | None:
        """The principal ``key`` was last found to belong to, from this process's cache alone
        (never Redis); None when it is unknown here or invalid (the rate limiter's view)."""
        hashed = digest(key)
        if hmac.compare_digest(hashed, self.admin_digest):
            return ADMIN
        with self._lock:
            return self._cache.get(hashed)

    def is_live(self, principal_id: str) -> bool:
        """Whether ``principal_id`` still has a key (admin always): job workers stop a revoked
        principal's jobs. Cached like ``authenticate``; an unreachable Redis counts as live."""
        if principal_id == ADMIN_ID:
            return True
        with self._lock:
            if principal_id in self._live:
                return self._live[principal_id]
        try:
            live = bool(self.redis is not None and self.redis.exists(PREFIX + principal_id))
        except redis.RedisError:
            return True
        with self._lock:
            self._live[principal_id] = live
        return live

    # --- managing keys (admin) -------------------------------------------------------------

    def create(
        self, name: str, scopes: list[str], quotas: Mapping[str, int], created_by: str
    ) -> dict[str, Any]:
        """A new key: its record as listed, plus ``key`` (the secret, shown this once)."""
        self._client()
        key_id = secrets.token_hex(6)
        key = new_key(key_id)
        record = {
            "id": key_id,
            "name": name,
            "scopes": ",".join(scopes),
            "quotas": json.dumps(dict(quotas)),
            "hash": digest(key),
            "created_at": f"{time.time():.3f}",
            "created_by": created_by,
        }
        flat = [item for pair in record.items() for item in pair]
        assert self._create is not None
        try:
            made = self._create(keys=[PREFIX + key_id, INDEX], args=[self.settings.max_keys, key_id, *flat])
        except redis.RedisError as exc:
            raise KeysUnavailable(str(exc)) from exc
        if not made:
            raise TooManyKeys(f"{self.settings.max_keys} keys exist already (AUTH_MAX_KEYS)")
        return {"key": key, **public(record)}

    def list(self) -> list[dict[str, Any]]:
        client = self._client()
        try:
            ids = sorted(client.smembers(INDEX))  # type: ignore[arg-type]
            with client.pipeline() as pipe:
                for key_id in ids:
                    pipe.hgetall(PREFIX + key_id)
                records = pipe.execute()
        except redis.RedisError as exc:
            raise KeysUnavailable(str(exc)) from exc
        found = [public(record) for record in records if record]
        return sorted(found, key=lambda record: record["created_at"])

    def get(self, key_id: str) -> dict[str, Any] | None:
        record = self._read(key_id) if ID.match(key_id) else None
        return public(record) if record else None

    def revoke(self, key_id: str) -> dict[str, Any] | None:
        """Delete a key; returns what it was (None: no such key). Every process stops accepting it
        within ``AUTH_KEY_CACHE_S``."""
        client = self._client()
        if not ID.match(key_id):
            return None
        try:
            with client.pipeline() as pipe:
                pipe.hgetall(PREFIX + key_id)
                pipe.delete(PREFIX + key_id)
                pipe.srem(INDEX, key_id)
                record, _, _ = pipe.execute()
        except redis.RedisError as exc:
            raise KeysUnavailable(str(exc)) from exc
        with self._lock:
            self._cache.clear()
            self._live.pop(key_id, None)
        return public(record) if record else None

    # --- helpers ---------------------------------------------------------------------------

    def _client(self) -> redis.Redis:
        if self.redis is None:
            raise KeysUnavailable(
                "keys other than the admin key need Redis: set REDIS_URL (or AUTH_REDIS_URL)"
            )
        return self.redis

    def _read(self, key_id: str) -> dict[str, str] | None:
        if self.redis is None:
            return None
        try:
            return self.redis.hgetall(PREFIX + key_id) or None  # type: ignore[return-value]
        except redis.RedisError as exc:
            raise KeysUnavailable(str(exc)) from exc


def _principal(record: Mapping[str, str]) -> Principal:
    quotas = {k: int(v) for k, v in json.loads(record.get("quotas") or "{}").items() if k in QUOTA_NAMES}
    scopes = frozenset(s for s in record.get("scopes", "").split(",") if s in SCOPES)
    return Principal(record["id"], record.get("name", ""), scopes, quotas)


def public(record: Mapping[str, str]) -> dict[str, Any]:
    """A key as ``GET /v1/keys`` lists it: never its hash, never its secret."""
    return {
        "id": record["id"],
        "name": record.get("name", ""),
        "scopes": [s for s in record.get("scopes", "").split(",") if s],
        "quotas": json.loads(record.get("quotas") or "{}"),
        "created_at": wire.timestamp(float(record.get("created_at") or 0)),
        "created_by": record.get("created_by", ""),
    }
