"""Flask glue shared by the gateway and the services: request ids and the one JSON error shape."""

from __future__ import annotations

import logging
import math
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from common import metrics
from common.errors import BadRequest, ServiceError
from common.wire import DEADLINE_HEADER, REQUEST_ID_HEADER, REQUEST_START_HEADER, whole_number

log = logging.getLogger(__name__)
request_log = logging.getLogger("imagerec.request")
_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
RETRY_STATUSES = (429, 503)  # the only answers that say when to come back (RFC 9110 10.2.3)


def request_id() -> str:
    """The current request's id: the caller's ``X-Request-ID`` when sane, else a fresh one."""
    if "request_id" not in g:
        g.request_id = safe_request_id(request.headers.get(REQUEST_ID_HEADER, ""))
    return str(g.request_id)


def safe_request_id(incoming: str) -> str:
    """``incoming`` when it is safe to echo and log, else a fresh id."""
    return incoming if _SAFE_REQUEST_ID.match(incoming) else uuid.uuid4().hex


def error_response(error: ServiceError) -> Response:
    response = jsonify({"error": error.to_dict(request_id())})
    response.status_code = error.status
    if error.retry_after is not None and error.status in RETRY_STATUSES:
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


class DrainBody:
    """WSGI middleware: read what is left of the request body before the answer goes out.

    An answer given before the body was read (a 404 for an unknown model, a 429, a 503 refusal)
    leaves the body in the socket; Gunicorn drains at most 64 KiB of it and then resets the
    connection, so Nginx (which never retries a POST) answers 502 and a direct client sees a reset.
    Reading the rest here, up to ``max_bytes``, keeps the connection clean for the next request: on
    loopback a 10 MB body takes a few milliseconds, far less than a refusal's round trip through a
    new connection. Bodies beyond ``max_bytes`` are left alone (Gunicorn then closes).
    """

    CHUNK = 256 * 1024

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        try:
            return self.app(environ, start_response)
        finally:
            self.drain(environ)

    def drain(self, environ: dict[str, Any]) -> None:
        stream = environ.get("wsgi.input")
        declared = whole_number(environ.get("CONTENT_LENGTH") or "")
        if stream is None or (declared is not None and declared > self.max_bytes):
            return
        left = self.max_bytes
        try:
            while left > 0 and (chunk := stream.read(min(self.CHUNK, left))):
                left -= len(chunk)
        except (OSError, ValueError):  # the client went away: nothing left to keep clean
            return


def install(app: Flask, drain_max_bytes: int = 0) -> None:
    """Register request-id propagation and JSON error handlers on ``app``; with
    ``drain_max_bytes``, unread request bodies up to that size are drained (``DrainBody``)."""
    app.json.sort_keys = False  # type: ignore[attr-defined]
    if drain_max_bytes:
        app.wsgi_app = DrainBody(app.wsgi_app, drain_max_bytes)  # type: ignore[method-assign]
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


def query_float(name: str) -> float | None:
    """A finite number query parameter (None when absent), or a 400 naming it."""
    raw = request.args.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        raise BadRequest(f"{name} must be a number, got {raw[:40]!r}") from None
    if not math.isfinite(value):
        raise BadRequest(f"{name} must be a finite number, got {raw[:40]!r}")
    return value


def query_list(name: str) -> tuple[str, ...]:
    """A comma-separated query parameter, repeated or not: its non-empty entries, trimmed."""
    return tuple(e.strip() for raw in request.args.getlist(name) for e in raw.split(",") if e.strip())


def query_flag(name: str) -> bool:
    return request.args.get(name, "").lower() in {"1", "true", "yes"}


MAX_DEADLINE_MS = 600_000


def arrived_at() -> float:
    """When the request reached the fleet, as ``time.monotonic()``: the ``X-Request-Start:
    t=<epoch seconds>`` that Nginx (or the gateway, towards a member) sets, when it is plausible;
    else now. Time spent queued for a thread or in a proxy then counts against the deadline."""
    return arrived_from(request.headers.get(REQUEST_START_HEADER, ""))


def arrived_from(started: str) -> float:
    """:func:`arrived_at` from the header's value itself (a gRPC call's metadata)."""
    now = time.monotonic()
    raw = started.strip().removeprefix("t=")
    try:
        stamp = float(raw)
    except ValueError:
        return now
    while stamp > 1e11:  # milliseconds or microseconds since the epoch, as some proxies send
        stamp /= 1000
    waited = time.time() - stamp
    if not 0 <= waited <= MAX_DEADLINE_MS / 1000:  # clock skew or garbage: trust only our own clock
        return now
    return now - waited


def deadline(default_s: float) -> float:
    """This request's deadline (``time.monotonic()``): its arrival plus the client's budget
    (``X-Deadline-Ms`` or ``?timeout_ms=``) or ``default_s``."""
    return arrived_at() + (deadline_s() or default_s)


def deadline_s() -> float | None:
    """The time this request may still take, from ``X-Deadline-Ms`` or ``?timeout_ms=``, if given."""
    return budget_s(request.headers.get(DEADLINE_HEADER) or request.args.get("timeout_ms"))


def budget_s(raw: str | None) -> float | None:
    """A client's ``X-Deadline-Ms`` in seconds (None when absent); a 400 when it is not a sane
    number of milliseconds."""
    if raw is None:
        return None
    try:
        value = float(raw) if raw.isascii() else math.nan  # float() also reads '٣' and '1_0'
    except ValueError:
        raise BadRequest(f"{DEADLINE_HEADER} / timeout_ms must be a number of milliseconds") from None
    if "_" in raw or not math.isfinite(value):
        raise BadRequest(f"{DEADLINE_HEADER} / timeout_ms must be a number of milliseconds")
    if not 0 < value <= MAX_DEADLINE_MS:
        raise BadRequest(f"{DEADLINE_HEADER} / timeout_ms must be between 0 and {MAX_DEADLINE_MS}")
    return value / 1000


def json_ok(payload: dict[str, Any], status: int = 200) -> Response:
    response = jsonify(payload)
    response.status_code = status
    return response


def install_metrics(app: Flask, component: str, model: Callable[[], str]) -> None:
    """Count and time every request of ``app`` (on the clock ``install`` starts) in
    ``common.metrics``, and serve ``GET /metrics``.

    ``model`` names the request's model as a label; it must return a bounded set of values
    (callers map unknown names to "other"), never what a client typed.
    """

    @app.after_request
    def _count(response: Response) -> Response:
        route = request.url_rule.rule if request.url_rule else "unmatched"
        if route != "/metrics":
            name = model()
            metrics.REQUESTS.labels(component, route, name, str(response.status_code)).inc()
            elapsed = time.perf_counter() - g.get("started", time.perf_counter())
            metrics.REQUEST_SECONDS.labels(component, route, name).observe(elapsed)
        return response

    def exposition() -> Response:
        return Response(metrics.scrape(), mimetype=metrics.CONTENT_TYPE)

    app.add_url_rule("/metrics", "metrics", exposition, methods=["GET"])
