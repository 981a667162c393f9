"""Flask glue shared by the gateway and the services: request ids and the one JSON error shape."""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from common.errors import BadRequest, ServiceError

log = logging.getLogger(__name__)
request_log = logging.getLogger("imagerec.request")
REQUEST_ID_HEADER = "X-Request-ID"
_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def request_id() -> str:
    """The current request's id: the caller's ``X-Request-ID`` when sane, else a fresh one."""
    if "request_id" not in g:
        incoming = request.headers.get(REQUEST_ID_HEADER, "")
        g.request_id = incoming if _SAFE_REQUEST_ID.match(incoming) else uuid.uuid4().hex
    return str(g.request_id)


def error_response(error: ServiceError) -> Response:
    response = jsonify({"error": error.to_dict(request_id())})
    response.status_code = error.status
    if error.retry_after is not None:
        response.headers["Retry-After"] = str(error.retry_after)
    return response


def as_service_error(exc: HTTPException) -> ServiceError:
    """Werkzeug's HTTP errors (404, 405, 413...) in the fleet's terms: a code from their name."""
    code = (exc.name or "error").lower().replace(" ", "_")
    return ServiceError(exc.description or exc.name, code=code, status=exc.code or 500)


def _http_error(exc: HTTPException) -> Response:
    return error_response(as_service_error(exc))


def _unexpected(exc: Exception) -> Response:
    # NOTE: never leak internals in a 5xx body; the log has the traceback and the request id.
    log.exception("unhandled error (request_id=%s)", request_id())
    return error_response(ServiceError("internal error; see the server log for this request id"))


def install(app: Flask) -> None:
    """Register request-id propagation and JSON error handlers on ``app``."""
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.register_error_handler(ServiceError, error_response)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected)

    @app.before_request
    def _start_clock() -> None:
        g.started = time.perf_counter()

    @app.after_request
    def _echo_request_id(response: Response) -> Response:
        response.headers[REQUEST_ID_HEADER] = request_id()
        return response

    @app.after_request
    def _log_request(response: Response) -> Response:
        """One structured line per request (health probes at DEBUG: they come every few seconds)."""
        route = request.url_rule.rule if request.url_rule else None
        level = (
            logging.DEBUG
            if route and route.endswith(("/live", "/ready", "/v1/model", "/metrics"))
            else logging.INFO
        )
        if request_log.isEnabledFor(level):
            request_log.log(
                level,
                "request",
                extra={
                    "component": app.name,
                    "request_id": request_id(),
                    "method": request.method,
                    "path": request.path[:200],
                    "route": route,
                    "model": (request.args.get("model") or (request.view_args or {}).get("name") or "")[:100],
                    "status": response.status_code,
                    "duration_ms": round(
                        (time.perf_counter() - g.get("started", time.perf_counter())) * 1000, 2
                    ),
                    "client": request.headers.get("X-Real-IP") or request.remote_addr,
                },
            )
        return response


def query_int(name: str, default: int, low: int, high: int) -> int:
    """An integer query parameter within ``[low, high]``, or a 400 naming it."""
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{name} must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise BadRequest(f"{name} must be between {low} and {high}, got {value}")
    return value


def query_flag(name: str) -> bool:
    return request.args.get(name, "").lower() in {"1", "true", "yes"}


DEADLINE_HEADER = "X-Deadline-Ms"
MAX_DEADLINE_MS = 600_000


def deadline_s() -> float | None:
    """The time this request may still take, from ``X-Deadline-Ms`` or ``?timeout_ms=``, if given."""
    raw = request.headers.get(DEADLINE_HEADER) or request.args.get("timeout_ms")
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise BadRequest(f"{DEADLINE_HEADER} / timeout_ms must be a number of milliseconds") from None
    if not 0 < value <= MAX_DEADLINE_MS:
        raise BadRequest(f"{DEADLINE_HEADER} / timeout_ms must be between 0 and {MAX_DEADLINE_MS}")
    return value / 1000


def json_ok(payload: dict[str, Any], status: int = 200) -> Response:
    response = jsonify(payload)
    response.status_code = status
    return response
