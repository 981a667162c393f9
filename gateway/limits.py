"""Per-client rate limits (Flask-Limiter): in memory per gateway worker by default, shared across
workers and replicas when ``GATEWAY_RATE_LIMIT_STORAGE`` points at Redis (``redis://host:6379``)."""

from __future__ import annotations

from flask import Flask, request
from flask_limiter import Limiter

from gateway.settings import GatewaySettings


def client_address() -> str:
    """The client as Nginx saw it (X-Real-IP), else the peer. NOTE: only trustworthy while the
    gateway is reachable through Nginx alone, as in every deployment here."""
    return request.headers.get("X-Real-IP") or request.remote_addr or "unknown"


def install(app: Flask, settings: GatewaySettings) -> Limiter | None:
    """Limit every route but health and metadata; a client over its limit gets a JSON 429 with
    Retry-After. Returns None when ``GATEWAY_RATE_LIMIT`` is empty (limits off)."""
    if not settings.rate_limit:
        return None
    limiter = Limiter(
        client_address,
        app=app,
        default_limits=[settings.rate_limit],
        storage_uri=settings.rate_limit_storage or "memory://",
        headers_enabled=True,
        strategy="moving-window",
    )
    for endpoint, view in app.view_functions.items():
        # health, metadata, metrics and docs are never limited; every prediction route is
        if endpoint in ("live", "ready", "models", "metrics") or endpoint.startswith(("docs.", "v2.")):
            if endpoint != "v2.infer":
                limiter.exempt(view)
    return limiter
