"""Who owns each custom model name, on which base, and whether others may use it.

A record per name (Redis hash ``imagerec:model-owner:<name>``: owner, base, kind, public) is
written when a training is accepted - the name is claimed then, so a second principal cannot train
over it while the first one's job runs - and removed when the model is deleted (or its first
training failed before anything was published). A name with no record is a model from before keys
existed: it belongs to the admin and is private. Claiming is one Lua script: it refuses another
owner's name, the same name on a second base, and a principal's name or fine-tuned quota, or the
fleet's total, atomically.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import redis
from cachetools import TTLCache

from common.errors import QuotaExceeded, ServiceError
from common.tenancy.keys import ADMIN_ID, Principal

RECORD = "imagerec:model-owner:"
NAMES = "imagerec:model-owners"  # every claimed name
OWNED = "imagerec:models:owner:"  # + owner: their names;  + owner + ":fine-tuned": those fine-tuned

# KEYS: record, all names, owner's names, owner's fine-tuned; ARGV: owner, base, fine-tuned (0/1),
# public (0/1), owner's names quota, fine-tuned quota, fleet total ('' = no per-owner quotas).
_CLAIM = """
local owner = redis.call('HGET', KEYS[1], 'owner')
if owner and owner ~= ARGV[1] then return {'taken'} end
if owner and redis.call('HGET', KEYS[1], 'base') ~= ARGV[2] then
  return {'other_base', redis.call('HGET', KEYS[1], 'base')}
end
if not owner then
  if redis.call('SCARD', KEYS[2]) >= tonumber(ARGV[7]) then
    return {'total_custom_models', redis.call('SCARD', KEYS[2])}
  end
  if ARGV[5] ~= '' and redis.call('SCARD', KEYS[3]) >= tonumber(ARGV[5]) then
    return {'custom_models', redis.call('SCARD', KEYS[3])}
  end
end
if ARGV[3] == '1' and redis.call('SISMEMBER', KEYS[4], KEYS[1]) == 0 then
  if ARGV[6] ~= '' and redis.call('SCARD', KEYS[4]) >= tonumber(ARGV[6]) then
    return {'fine_tuned', redis.call('SCARD', KEYS[4])}
  end
end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'base', ARGV[2])
redis.call('HDEL', KEYS[1], 'deleting')  -- its owner trains it again: the name is wanted after all
if not owner then redis.call('HSET', KEYS[1], 'public', ARGV[4]) end
redis.call('SADD', KEYS[2], KEYS[1])
redis.call('SADD', KEYS[3], KEYS[1])
if ARGV[3] == '1' then redis.call('SADD', KEYS[4], KEYS[1]) else redis.call('SREM', KEYS[4], KEYS[1]) end
if owner then return {'ok', 0} end
return {'ok', 1}
"""


# KEYS: record, all names. Forgets the name (as ``release``) only while it is marked deleting.
_RELEASE_DELETING = """
if redis.call('HGET', KEYS[1], 'deleting') ~= '1' then return 0 end
local owner = redis.call('HGET', KEYS[1], 'owner')
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], KEYS[1])
redis.call('SREM', 'imagerec:models:owner:' .. owner, KEYS[1])
redis.call('SREM', 'imagerec:models:owner:' .. owner .. ':fine-tuned', KEYS[1])
return 1
"""


class OwnersUnavailable(ServiceError):
    status, code, retry_after = 503, "auth_unavailable", 2


class NameTaken(ServiceError):
    status, code = 409, "model_name_taken"


@dataclass(frozen=True)
class Ownership:
    owner: str
    base: str
    public: bool


LEGACY = Ownership(ADMIN_ID, "", False)


class Owners:
    """The ownership records, with a short cache for the prediction path."""

    def __init__(self, client: redis.Redis | None, cache_s: float = 2.0) -> None:
        self.redis = client
        self._claim = client.register_script(_CLAIM) if client is not None else None
        self._release_deleting = client.register_script(_RELEASE_DELETING) if client is not None else None
        self._cache: TTLCache[str, Ownership] = TTLCache(10_000, cache_s)
        self._lock = threading.Lock()

    def of(self, name: str) -> Ownership:
        """``name``'s owner; the admin (private) for a model with no record, or without Redis."""
        with self._lock:
            if name in self._cache:
                return self._cache[name]
        found = LEGACY
        if self.redis is not None:
            try:
                record: dict[str, str] = self.redis.hgetall(RECORD + name)  # type: ignore[assignment]
            except redis.RedisError:  # who may see it cannot be told: refuse, do not guess
                raise OwnersUnavailable("custom models' owners (Redis) cannot be read; try again") from None
            if record:
                found = Ownership(record["owner"], record.get("base", ""), record.get("public") == "1")
        with self._lock:
            self._cache[name] = found
        return found

    def check_free(self, name: str, principal: Principal) -> None:
        """A 409 when ``name`` is another principal's (before an upload is read; claimed after)."""
        found = self.of(name)
        if found is not LEGACY and found.owner != principal.id:
            raise NameTaken(f"the model name {name!r} belongs to another principal: choose another name")

    def visible(self, name: str, principal: Principal) -> bool:
        found = self.of(name)
        return found.public or principal.sees(found.owner)

    def claim(
        self,
        name: str,
        principal: Principal,
        base: str,
        *,
        fine_tuned: bool,
        public: bool,
        quotas: tuple[int, int] | None,
        total: int,
    ) -> bool:
        """Claim ``name`` for ``principal`` on ``base`` (a retraining keeps its claim), or raise:
        409 for another owner's name or another base, 429 past a quota. ``quotas``: the
        principal's (custom models, fine-tuned), None for the admin. True: the claim is new."""
        if self._claim is None:
            return False
        owned = OWNED + principal.id
        names, tuned = ("", "") if quotas is None else (str(quotas[0]), str(quotas[1]))
        verdict = self._claim(
            keys=[RECORD + name, NAMES, owned, owned + ":fine-tuned"],
            args=[principal.id, base, int(fine_tuned), int(public), names, tuned, total],
        )
        with self._lock:
            self._cache.pop(name, None)
        outcome = verdict[0]
        if outcome == "ok":
            return bool(int(verdict[1]))
        if outcome == "taken":
            raise NameTaken(f"the model name {name!r} belongs to another principal: choose another name")
        if outcome == "other_base":
            raise NameTaken(
                f"{name!r} is already a custom model on {verdict[1]}: one name is one model on one base; "
                "delete it first or choose another name"
            )
        limits = {"custom_models": names, "fine_tuned": tuned, "total_custom_models": str(total)}
        what = {
            "custom_models": "your custom models",
            "fine_tuned": "your fine-tuned models",
            "total_custom_models": "the fleet's custom models",
        }[outcome]
        raise QuotaExceeded(
            outcome,
            int(limits[outcome]),
            int(verdict[1]),
            f"{what} are at their quota ({verdict[1]} of {limits[outcome]}, quota {outcome!r}): "
            "delete one first",
        )

    def set_public(self, name: str, public: bool) -> None:
        if self.redis is None:
            raise ServiceError("sharing a model needs Redis", code="owners_unavailable", status=503)
        with self.redis.pipeline() as pipe:
            if not self.redis.exists(RECORD + name):  # a model from before keys: the admin's
                pipe.hset(RECORD + name, mapping={"owner": ADMIN_ID, "base": ""})
                pipe.sadd(NAMES, RECORD + name)
                pipe.sadd(OWNED + ADMIN_ID, RECORD + name)
            pipe.hset(RECORD + name, "public", str(int(public)))
            pipe.execute()
        with self._lock:
            self._cache.pop(name, None)

    def mark_deleting(self, name: str) -> None:
        """``name`` was deleted while a training of it is in flight: it stays its owner's (no one
        else may claim it) until that training stops and the trainer releases it
        (``release_if_deleting``), and nothing of it may be published meanwhile."""
        if self.redis is not None:
            self.redis.hset(RECORD + name, "deleting", "1")
        with self._lock:
            self._cache.pop(name, None)

    def release_if_deleting(self, name: str) -> bool:
        """Forget ``name``'s owner if it was deleted during a training (the trainer, once the
        training stopped); True when it was."""
        if self._release_deleting is None:
            return False
        released = bool(self._release_deleting(keys=[RECORD + name, NAMES]))
        with self._lock:
            self._cache.pop(name, None)
        return released

    def publishable(self, name: str, owner: str) -> bool:
        """Whether a training of ``owner``'s may publish ``name`` now (read from Redis, uncached):
        the name is still its owner's and not being deleted. Nothing is published without an owner."""
        if self.redis is None:
            return True  # no owners kept at all (one process, no Redis)
        record: dict[str, str] = self.redis.hgetall(RECORD + name)  # type: ignore[assignment]
        return bool(record) and record.get("owner") == owner and record.get("deleting") != "1"

    def release(self, name: str) -> None:
        """Forget ``name``'s owner (the model was deleted): anyone may claim it again."""
        if self.redis is None:
            return
        owner = self.of(name).owner
        with self.redis.pipeline() as pipe:
            pipe.delete(RECORD + name)
            pipe.srem(NAMES, RECORD + name)
            pipe.srem(OWNED + owner, RECORD + name)
            pipe.srem(OWNED + owner + ":fine-tuned", RECORD + name)
            pipe.execute()
        with self._lock:
            self._cache.pop(name, None)
