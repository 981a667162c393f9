"""Per-client rate limits (Flask-Limiter): one count per client across every limited route - per
key when the request sent one this process has verified, else per address
(``gateway.auth.Auth.rate_limit_key``). Checked before the key is, so a flood of bad keys is refused
before each costs a Redis lookup.

Counted in Redis when ``GATEWAY_RATE_LIMIT_STORAGE`` (or ``REDIS_URL``) names one, so every gateway
worker and replica shares it; else in each worker's memory. A Redis outage falls back to counting in
memory (Flask-Limiter's fallback, re-checking Redis with a back-off), never an error. The check runs
before the request body is read: a refusal is a JSON 429 whose ``Retry-After`` says when the
client's window frees a request, and its unread body is drained (``common.web.DrainBody``) so the
connection stays usable. Only a 429 carries that ``Retry-After``: other answers keep theirs (a 503's
comes from the model's drain time) or have none; every limited answer has ``X-RateLimit-*``.

Callers outside Flask (the gRPC service) count through ``SharedLimit``: the same storage, strategy
and bucket as Flask-Limiter's application limit, so one client has one count whichever protocol it
calls.
"""

from __future__ import annotations

import logging
import math
import time

from flask import Flask, Response, request
from flask_limiter import Limiter
from limits import parse_many

from gateway import auth
from gateway.settings import GatewaySettings

# Health, metadata, metrics and docs are never limited; every prediction route is.
EXEMPT = ("live", "ready", "models.listing", "metrics", "static", "auth_check")
REDIS_TIMEOUTS: dict[str, str | int] = {"socket_connect_timeout": 1, "socket_timeout": 1}
SCOPE = "global"  # Flask-Limiter's bucket for an application limit (its ApplicationLimit.scope)
log = logging.getLogger(__name__)


def _exempt() -> bool:
    endpoint = request.endpoint or ""
    if endpoint.startswith("v2.infer"):  # the unversioned and the versioned route
        return False
    return endpoint in EXEMPT or endpoint.startswith(("docs.", "v2."))


def install(app: Flask, settings: GatewaySettings, access: auth.Auth) -> Limiter | None:
    """Limit every prediction route with one shared count per client, checked before the key is
    (installed first: Flask runs its before-request checks in order). Returns None when
    ``GATEWAY_RATE_LIMIT`` is empty (limits off)."""
    if not settings.rate_limit:
        return None
    storage = settings.rate_limit_storage or "memory://"
    limiter = Limiter(
        access.rate_limit_key,
        app=app,
        application_limits=[settings.rate_limit],
        application_limits_exempt_when=_exempt,
        storage_uri=storage,
        storage_options=REDIS_TIMEOUTS if storage.startswith(("redis://", "rediss://")) else {},
        strategy="moving-window",
        headers_enabled=False,  # it would set Retry-After on every answer, and rewrite a 503's
        in_memory_fallback_enabled=True,
        swallow_errors=True,
    )

    @app.after_request
    def _rate_limit_headers(response: Response) -> Response:
        current = limiter.current_limit
        if current is None:
            return response
        response.headers["X-RateLimit-Limit"] = str(current.limit.amount)
        response.headers["X-RateLimit-Remaining"] = str(current.remaining)
        response.headers["X-RateLimit-Reset"] = str(int(current.reset_at))
        if response.status_code == 429:
            response.headers["Retry-After"] = str(max(1, math.ceil(current.reset_at - time.time())))
        return response

    return limiter


class SharedLimit:
    """The application limit for a caller outside Flask: ``hit(key)`` counts one request of the
    client ``key`` (``Auth.limit_key``) in Flask-Limiter's own bucket for it."""

    def __init__(self, limiter: Limiter | None, settings: GatewaySettings) -> None:
        self.limiter = limiter
        self.items = sorted(parse_many(settings.rate_limit)) if limiter is not None else []

    def hit(self, key: str) -> int | None:
        """None when the request may go on; else the seconds until the client's window frees one.
        Like Flask-Limiter's, the strategy is its fallback in memory while Redis is down, and an
        error of the storage lets the request through."""
        if self.limiter is None:
            return None
        strategy = self.limiter.limiter
        try:
            for item in self.items:
                if not strategy.hit(item, key, SCOPE):
                    reset, _ = strategy.get_window_stats(item, key, SCOPE)
                    return max(1, math.ceil(reset - time.time()))
        except Exception as exc:  # noqa: BLE001 - swallow_errors, as the routes' limiter is set up
            log.warning("rate limit storage failed; request let through: %r", exc)
        return None
