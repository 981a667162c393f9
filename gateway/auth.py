"""Who is calling, and whether they may: keys, scopes, and custom models only their owners see.

Every request's principal comes from ``Authorization: Bearer <key>`` (``common.tenancy.keys``):
the admin, a key's holder, or anonymous when no key is sent. A key that is sent and not valid is a
401 on every route but health. Each route needs one scope (``SCOPES``): anonymous callers hold
``predict`` alone (``AUTH_ANONYMOUS_PREDICT``), so without a key a route that needs more is a 401,
and with a key that lacks the scope a 403. A custom model named by the request (``model``,
``models``, the path) that the principal may not see is a 404, exactly like a name that does not
exist. ``GET /v1/auth/check`` answers the same question for Nginx's ``auth_request`` before it
reads an upload's body (``X-Original-Method``, ``X-Original-URI``): 204, 401 or 403.

Rate limits count per principal when a key was sent, else per client address: ``X-Real-IP`` is
believed only from ``GATEWAY_TRUSTED_PROXIES`` (Nginx), never from a direct caller.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
from typing import Any
from urllib.parse import unquote

from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from common import web
from common.errors import Forbidden, ServiceError, Unauthorized
from common.models import BASE_MODELS
from common.tenancy import audit as audit_log
from common.tenancy import keys as keys_mod
from common.tenancy.keys import KeyStore, KeysUnavailable, Principal
from common.tenancy.owners import Owners
from common.tenancy.settings import AuthSettings
from fleet.registry import Registry

# The scope each route needs; every other route needs none (PUBLIC, and OPEN, docs and static).
# tests/gateway/test_tenancy.py fails on a route named in neither.
SCOPES = {
    "v1.predict": "predict",
    "v1.explain": "predict",
    "v1.seed_predict": "predict",
    "v1.seed_batch_predict": "predict",
    "v2.infer": "predict",
    "jobs.submit": "jobs",
    "jobs.listing": "jobs|train",
    "jobs.status": "jobs|train",
    "jobs.results": "jobs|train",
    "jobs.cancel": "jobs|train",
    "training.submit": "train",
    "models.remove": "train",
    "models.share": "train",
    "keys.create": "admin",
    "keys.listing": "admin",
    "keys.revoke": "admin",
}
# Metadata and health: a key is checked when one is sent, but no scope is needed.
PUBLIC = frozenset(
    {"models.listing", "models.model", "metrics", "v2.server", "v2.live", "v2.ready", "v2.metadata"}
    | {"v2.ready_model", "v2.config"}
)
OPEN = ("live", "ready", "auth_check")  # never asks for a key, even a bad one
# The status the key check gives a route or method the gateway does not serve (Nginx answers it).
REFUSAL_HEADER = "X-Imagerec-Refusal"
BUILTIN = frozenset((*BASE_MODELS, "ensemble"))


class AuthUnavailable(ServiceError):
    status, code, retry_after = 503, "auth_unavailable", 2


class Auth:
    """The gateway's view of keys and owners; Redis is reached on first use."""

    def __init__(
        self, settings: AuthSettings, trusted_proxies: tuple[str, ...] = (), store: KeyStore | None = None
    ) -> None:
        self.settings = settings
        self.store = store or KeyStore(settings)
        self.owners = Owners(self.store.redis, settings.key_cache_s)
        self.anonymous = keys_mod.anonymous(settings.anonymous_predict)
        self.proxies = [ipaddress.ip_network(cidr, strict=False) for cidr in trusted_proxies]

    def client_address(self) -> str:
        """The caller's address: ``X-Real-IP`` when the peer is a trusted proxy, else the peer."""
        return self.address_of(request.remote_addr or "unknown", request.headers.get("X-Real-IP"))

    def address_of(self, peer: str, real_ip: str | None) -> str:
        """``real_ip`` (what the proxy says) when ``peer`` is a trusted proxy and said it, else the peer."""
        try:
            proxied = any(ipaddress.ip_address(peer) in network for network in self.proxies)
        except ValueError:
            proxied = False
        return real_ip if proxied and real_ip else peer

    def principal(self) -> Principal:
        """The current request's principal (authenticated once per request)."""
        if "principal" not in g:
            g.principal = self.authenticate(request.headers.get("Authorization", ""))
        return g.principal

    def authenticate(self, header: str) -> Principal:
        """The principal an ``Authorization`` header names (anonymous when empty); 401 or 503."""
        if not header:
            return self.anonymous
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthorized("send the API key as 'Authorization: Bearer <key>'")
        try:
            found = self.store.authenticate(key.strip())
        except KeysUnavailable:
            raise AuthUnavailable("the key store (Redis) cannot be reached; try again shortly") from None
        if found is None:
            raise Unauthorized("the API key is not valid (revoked, mistyped or never issued)")
        return found

    def require(self, endpoint: str, principal: Principal | None = None) -> None:
        """Raise 401/403 unless ``principal`` (default: the current request's) holds the scope
        ``endpoint`` needs."""
        needed = SCOPES.get(endpoint)
        principal = self.principal() if principal is None else principal
        if needed is None:
            return
        options = needed.split("|")
        if any(principal.can(scope) for scope in options):
            return
        wanted = " or ".join(repr(scope) for scope in options)
        if principal.anonymous:
            raise Unauthorized(
                f"this route needs an API key with the {wanted} scope (Authorization: Bearer <key>)"
            )
        raise Forbidden(f"this key lacks the {wanted} scope this route needs")

    def rate_limit_key(self) -> str:
        """Flask-Limiter's key, decided before the key check (which may ask Redis): the principal
        of a key this process has already verified, else the client's address. A bad or made-up
        key - each one would cost a Redis lookup - counts against its address, and so does a good
        key's first request here."""
        return self.limit_key(request.headers.get("Authorization", ""), self.client_address())

    def limit_key(self, header: str, address: str) -> str:
        """:meth:`rate_limit_key` for this ``Authorization`` header and client address."""
        scheme, _, key = header.partition(" ")
        known = self.store.cached(key.strip()) if scheme.lower() == "bearer" and key.strip() else None
        return f"key:{known.id}" if known is not None else f"ip:{address}"

    def caller(self) -> str:
        """Who the current request counts as, for what is shared out per client (its response-cache
        entries, its URL fetches): its key's principal, or an anonymous caller's address."""
        principal = self.principal()
        return f"ip:{self.client_address()}" if principal.anonymous else f"key:{principal.id}"

    def audit(self, action: str, target: str, outcome: str = "ok", **extra: Any) -> None:
        """One audit line for the current request's principal (``common.tenancy.audit``)."""
        audit_log.record(self.principal(), action, target, outcome, web.request_id(), **extra)

    def check_visible(self, names: list[str], registry: Registry, principal: Principal | None = None) -> None:
        """A 404 for any custom model in ``names`` ``principal`` (default: the current request's) may
        not see, as if it did not exist."""
        principal = self.principal() if principal is None else principal
        for name in names:
            if name in BUILTIN or not registry.is_custom(name):
                continue
            if not self.owners.visible(name, principal):
                raise registry.unknown(name)


def named_models() -> list[str]:
    """Every model name the current request names: ``model``, ``models`` and the path."""
    names = [request.args.get("model", "")]
    names += request.args.get("models", "").split(",")
    view = request.view_args or {}
    names += [str(view.get("name", "")), str(view.get("model_name", ""))]
    return [name.strip() for name in names if name.strip()]


def install(app: Flask, auth: Auth, registry: Registry) -> None:
    """Check every request's key, scope and the custom models it names, before its body is read."""

    @app.before_request
    def _authorize() -> None:
        endpoint = request.endpoint or ""
        if endpoint in OPEN or endpoint.startswith(("docs.", "static")):
            return
        auth.require(endpoint)
        auth.check_visible(named_models(), registry)

    @app.get("/v1/auth/check")
    def auth_check() -> Response:
        """For Nginx's ``auth_request``, before an upload's body is read: may this request's key
        call the original route? The path is read as Nginx matched its location (``nginx_path``),
        and Nginx sends the upload to that route. A route or method the gateway does not serve is
        refused here too, never spooled: auth_request passes only 401 and 403 on, so the answer is
        a 403 with the real status in ``X-Imagerec-Refusal`` (and ``Allow`` for a 405)."""
        method = request.headers.get("X-Original-Method", "GET")
        # NOTE: not urlsplit: a request target '//v1//jobs' would read as host 'v1'
        path = nginx_path(request.headers.get("X-Original-URI", "/").split("?", 1)[0].split("#", 1)[0])
        try:
            endpoint, _ = app.url_map.bind("").match(path, method)
        except MethodNotAllowed as exc:
            allowed = ", ".join(sorted(exc.valid_methods or ()))
            refused = refusal(f"{method[:16]} is not allowed on {path[:64]} (Allow: {allowed})", "405")
            refused.headers["Allow"] = allowed
            return refused
        except HTTPException:  # no such route (or only a redirect to one)
            return refusal(f"no route {path[:64]}", "404")
        auth.require(str(endpoint))
        return Response(status=204)

    def refusal(message: str, status: str) -> Response:
        """A 403 for Nginx carrying the real status; JSON like every other answer."""
        refused = web.error_response(Forbidden(message))
        refused.headers[REFUSAL_HEADER] = status
        return refused


def nginx_path(raw: str) -> str:
    """A request path as Nginx matches locations: percent-decoded, runs of slashes merged, dot
    segments resolved (a trailing slash kept)."""
    path = re.sub("/{2,}", "/", unquote(raw)) or "/"
    normal = posixpath.normpath(path)
    return normal + "/" if path.endswith("/") and normal != "/" else normal
