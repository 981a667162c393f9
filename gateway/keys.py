"""The key routes (scope ``admin``): ``POST /v1/keys`` (JSON ``{"name", "scopes", "quotas"}``) makes
a key and shows it once; ``GET /v1/keys`` lists them (never a secret, never a hash);
``DELETE /v1/keys/<id>`` revokes one, which every gateway and job worker honours within
``AUTH_KEY_CACHE_S``."""

from __future__ import annotations

import re
from typing import Any

from flask import Blueprint, Response, request

from common import web
from common.errors import BadRequest, NotFound, ServiceError
from common.tenancy.keys import SCOPES, KeysUnavailable, TooManyKeys
from common.tenancy.settings import QUOTA_NAMES
from gateway.auth import Auth

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._@-]*$")
MAX_QUOTA = 10**15


def _body(max_name: int) -> tuple[str, list[str], dict[str, int]]:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise BadRequest('send JSON {"name": ..., "scopes": [...], "quotas": {...}}', code="invalid_json")
    name, scopes, quotas = body.get("name"), body.get("scopes", ["predict"]), body.get("quotas", {})
    problems = []
    if not isinstance(name, str) or not 1 <= len(name) <= max_name or not NAME.match(name):
        problems.append(
            f"name: 1-{max_name} of letters, digits, space and ._@- (starting with a letter or digit)"
        )
    if not isinstance(scopes, list) or not scopes or not all(s in SCOPES for s in scopes):
        problems.append(f"scopes: a non-empty list of {', '.join(SCOPES)}")
    if not isinstance(quotas, dict) or not all(
        k in QUOTA_NAMES and isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_QUOTA
        for k, v in quotas.items()
    ):
        problems.append(f"quotas: an object of {', '.join(QUOTA_NAMES)} -> non-negative integers")
    if problems:
        raise BadRequest("key refused: " + "; ".join(problems), code="invalid_key_request")
    return str(name), list(dict.fromkeys(scopes)), dict(quotas)


def _store_call(method: Any, *args: Any) -> Any:
    try:
        return method(*args)
    except KeysUnavailable as exc:
        raise ServiceError(str(exc), code="keys_unavailable", status=503, retry_after=5) from None


def create_blueprint(auth: Auth) -> Blueprint:
    blueprint = Blueprint("keys", __name__)

    @blueprint.post("/v1/keys")
    def create() -> Response:
        name, scopes, quotas = _body(auth.settings.max_name_chars)
        try:
            made = _store_call(auth.store.create, name, scopes, quotas, auth.principal().id)
        except TooManyKeys as exc:
            raise ServiceError(str(exc), code="too_many_keys", status=409) from None
        auth.audit("key.create", made["id"], key_name=name, scopes=scopes)
        response = web.json_ok(made, status=201)
        response.headers["Location"] = f"/v1/keys/{made['id']}"
        return response

    @blueprint.get("/v1/keys")
    def listing() -> Response:
        return web.json_ok({"keys": _store_call(auth.store.list)})

    @blueprint.delete("/v1/keys/<key_id>")
    def revoke(key_id: str) -> Response:
        gone = _store_call(auth.store.revoke, key_id)
        auth.audit("key.revoke", key_id[:32], "ok" if gone else "not_found")
        if gone is None:
            raise NotFound(f"no key {key_id[:32]!r}", code="unknown_key")
        return web.json_ok({"revoked": gone})

    return blueprint
