"""Response cache: the same image, model, weights and parameters get the stored answer.

Key: SHA-256 of the caller and the image bytes + the model (or ensemble members and vote) + every
member's weights hash + the parameters that shape the answer. The caller is the key's principal,
or an anonymous caller's address: one client never learns from a hit (``X-Cache`` or its speed)
that another sent the same photo. Because the weights hashes are in the key, an
answer computed with old weights is never served; ``drop(model)`` also deletes a model's entries
as soon as the gateway sees its weights change. In memory by default (cachetools' TTL+LRU, per
gateway worker, ``GATEWAY_CACHE_SIZE`` entries); with ``GATEWAY_CACHE_REDIS_URL`` (or
``REDIS_URL``) in Redis too, shared by every worker and gateway replica, with each worker's memory
in front of it (``TieredCache``). Only whole single-image answers are cached.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Mapping
from typing import Any, Protocol

import cachetools

from common import metrics
from common.outcomes import Selection, Served
from fleet.registry import Registry

log = logging.getLogger(__name__)
PREFIX = "imagerec:cache:"


def digest(image: bytes, caller: str) -> str:
    """The image's part of a key: SHA-256 of the caller and the client's bytes (computed once per
    request); ``caller`` names whose entries these are (``gateway.auth.caller``)."""
    hashed = hashlib.sha256(caller.encode() + b"\n")
    hashed.update(image)
    return hashed.hexdigest()


def key(image_digest: str, models: Mapping[str, str], parameters: Mapping[str, object]) -> str:
    """``models``: member name -> weights hash. The members lead the key, so ``drop`` can find them."""
    shape = json.dumps(sorted(parameters.items()), separators=(",", ":"))
    members = ",".join(f"{name}@{weights}" for name, weights in sorted(models.items()))
    return f"{PREFIX}{members}:{hashlib.sha256(shape.encode()).hexdigest()[:16]}:{image_digest}"


def _members(cache_key: str) -> set[str]:
    return {member.split("@", 1)[0] for member in cache_key[len(PREFIX) :].split(":", 1)[0].split(",")}


class Cache(Protocol):
    def get(self, cache_key: str) -> dict[str, Any] | None: ...
    def put(self, cache_key: str, body: dict[str, Any]) -> None: ...
    def drop(self, model: str) -> int: ...


class MemoryCache:
    """One gateway worker's entries: least recently used first out past ``size``, each for its own
    time (``ttl_s``, or what ``put`` says: a copy of a Redis entry lives no longer than it)."""

    def __init__(self, size: int, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._entries: cachetools.TLRUCache[str, tuple[dict[str, Any], float]] = cachetools.TLRUCache(
            size, lambda _key, entry, now: now + entry[1]
        )
        self._lock = threading.Lock()

    def get(self, cache_key: str) -> dict[str, Any] | None:
        with self._lock:
            found = self._entries.get(cache_key)
        return found[0] if found else None

    def put(self, cache_key: str, body: dict[str, Any], ttl_s: float | None = None) -> None:
        with self._lock:
            self._entries[cache_key] = (body, self.ttl_s if ttl_s is None else ttl_s)

    def drop(self, model: str) -> int:
        with self._lock:
            stale = [k for k in list(self._entries) if model in _members(k)]
            for k in stale:
                self._entries.pop(k, None)
        return len(stale)


class RedisCache:
    """Entries as JSON strings with a TTL; a Redis failure is a miss, never an error."""

    def __init__(self, url: str, ttl_s: float) -> None:
        import redis

        self._redis = redis.Redis.from_url(url, socket_timeout=0.2, socket_connect_timeout=0.2)
        self._ttl_ms = int(ttl_s * 1000)
        self._errors = (redis.RedisError, OSError)

    def get(self, cache_key: str) -> dict[str, Any] | None:
        found = self.get_with_ttl(cache_key)
        return found[0] if found else None

    def get_with_ttl(self, cache_key: str) -> tuple[dict[str, Any], float] | None:
        """The entry and the seconds it has left, in one round trip (GET and PTTL pipelined)."""
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.get(cache_key)
            pipe.pttl(cache_key)
            raw, left_ms = pipe.execute()
        except self._errors as exc:
            log.warning("response cache unavailable: %s", exc)
            return None
        if not raw or left_ms is None or left_ms <= 0:
            return None
        return json.loads(raw), left_ms / 1000

    def put(self, cache_key: str, body: dict[str, Any]) -> None:
        try:
            self._redis.set(cache_key, json.dumps(body), px=self._ttl_ms)
        except self._errors as exc:
            log.warning("response cache unavailable: %s", exc)

    def drop(self, model: str) -> int:
        dropped = 0
        try:
            for found in self._redis.scan_iter(match=f"{PREFIX}*{model}@*", count=500):
                if model in _members(found.decode()):
                    dropped += int(self._redis.delete(found))  # type: ignore[arg-type]
        except self._errors as exc:
            log.warning("response cache unavailable: %s", exc)
        return dropped


class TieredCache:
    """Redis, shared by every worker and gateway replica, with each worker's own memory in front:
    an answer this worker stored or read before is a hit without a round trip. A copy in memory
    lives no longer than its Redis entry (it takes the entry's remaining time), ``drop`` empties
    both, and the key holds every member's weights, so no tier can serve an answer of old weights.
    While Redis is down, what this worker holds still answers."""

    def __init__(self, size: int, ttl_s: float, url: str) -> None:
        self.local = MemoryCache(size, ttl_s)
        self.shared = RedisCache(url, ttl_s)

    def get(self, cache_key: str) -> dict[str, Any] | None:
        found = self.local.get(cache_key)
        if found is not None:
            return found
        shared = self.shared.get_with_ttl(cache_key)
        if shared is None:
            return None
        self.local.put(cache_key, *shared)
        return shared[0]

    def put(self, cache_key: str, body: dict[str, Any]) -> None:
        self.local.put(cache_key, body)
        self.shared.put(cache_key, body)

    def drop(self, model: str) -> int:
        self.local.drop(model)
        return self.shared.drop(model)


class Policy:
    """Which answers the cache holds, under which key: whole single-image answers, keyed by the
    digest of the client's bytes (before any re-encoding; ``digest``, once per request), the
    answer's parameters and the weights of every member - and only while every member's weights
    hash is known."""

    def __init__(self, cache: Cache, registry: Registry) -> None:
        self.cache = cache
        self.registry = registry
        registry.on_weights_change = cache.drop

    def lookup(self, selection: Selection, image_digest: str, top_k: int) -> dict[str, Any] | None:
        """The stored ``{"body", "outcomes"}`` for the weights each member serves now, or None."""
        expected = {m: Served.from_reply(self.registry.metadata(m)).answered_as for m in selection.members}
        found = self._key(selection, image_digest, top_k, expected)
        hit = self.cache.get(found) if found else None
        metrics.CACHE.labels("hit" if hit else "miss").inc()
        return hit

    def store(
        self,
        selection: Selection,
        image_digest: str,
        top_k: int,
        served: Mapping[str, Served],
        entry: dict[str, Any],
    ) -> None:
        """Keyed by the weights that actually answered (``served``): during a rollout the replica
        that answered may not be the one the lookup's hashes came from."""
        found = self._key(selection, image_digest, top_k, {m: s.answered_as for m, s in served.items()})
        if found:
            self.cache.put(found, entry)

    @staticmethod
    def _key(
        selection: Selection, image_digest: str, top_k: int, weights: Mapping[str, str | None]
    ) -> str | None:
        if not all(weights.values()):
            return None
        parameters = {"top_k": top_k, "vote": selection.vote, "member_weights": selection.weights}
        return key(image_digest, weights, parameters)  # type: ignore[arg-type]


def create(size: int, ttl_s: float, redis_url: str) -> Cache | None:
    if size <= 0 or ttl_s <= 0:
        return None
    return TieredCache(size, ttl_s, redis_url) if redis_url else MemoryCache(size, ttl_s)
