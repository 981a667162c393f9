"""The Open Inference Protocol v2 (KServe, Triton, MLServer) on the gateway.

``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``; ``GET /v2/models/{name}[/versions/{v}]``,
``GET .../ready`` and ``POST .../infer``, where ``name`` is a model or ``ensemble``. The one input
is a BYTES tensor of shape ``[N]`` (or ``[N, 1]``) whose elements are base64-encoded image files
(what Triton's JSON clients send for BYTES), or raw image files with the binary tensor data
extension (``gateway.v2_request``, both ways); parameters ``top_k`` and, for ensembles, ``vote``.
Outputs, all ``[N, top_k]``: ``labels`` (BYTES), ``scores`` (FP32), ``indices`` (INT64); ask for a
subset with ``outputs``.

Each route translates its request into a call of ``gateway.v2_service`` (what the gRPC service
calls too) and the answer back; versions are explained there.

Every error under ``/v2`` is in the protocol's shape, ``{"error": "<message>"}``, with the fleet's
``code`` and ``request_id`` beside it: those of the views, the rate limiter's 429 and a body over
the limit (413), unexpected failures (500, no internals), and the 404 and 405 that routing raises
before Flask knows the blueprint (hence app-wide handlers that decide by path).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from flask import Blueprint, Response, jsonify, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound

from common import web
from common.errors import BadRequest, ServiceError
from gateway import v2_request as read
from gateway.settings import GatewaySettings
from gateway.v2_service import V2Service

log = logging.getLogger(__name__)


def _error(exc: ServiceError) -> Response:
    response = jsonify({"error": exc.message, "code": exc.code, "request_id": web.request_id()})
    response.status_code = exc.status
    if exc.retry_after is not None and exc.status in web.RETRY_STATUSES:
        response.headers["Retry-After"] = str(exc.retry_after)
    return response


def _http_error(exc: HTTPException) -> Response:
    return _error(web.as_service_error(exc))


def _unexpected(exc: Exception) -> Response:
    # NOTE: never leak internals in a 5xx body; the log has the traceback and the request id.
    log.exception("unhandled error (request_id=%s)", web.request_id())
    return _error(ServiceError("internal error; see the server log for this request id"))


def _routing_error(exc: HTTPException) -> Response:
    """A 404 or 405 from routing, app-wide: the protocol's shape under ``/v2``, else the fleet's."""
    error = web.as_service_error(exc)
    v2 = request.path == "/v2" or request.path.startswith("/v2/")
    response = _error(error) if v2 else web.error_response(error)
    if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
        response.headers["Allow"] = ", ".join(sorted(exc.valid_methods))
    return response


def create_blueprint(settings: GatewaySettings, service: V2Service) -> Blueprint:
    """The ``/v2`` routes over ``service``. NOTE: registering it also installs app-wide 404 and 405
    handlers (routing errors never reach a blueprint's own): ``/v2`` paths get the protocol's shape,
    every other path the fleet's, as before."""
    v2 = Blueprint("v2", __name__, url_prefix="/v2")
    v2.register_error_handler(ServiceError, _error)
    v2.register_error_handler(HTTPException, _http_error)
    v2.register_error_handler(Exception, _unexpected)
    v2.app_errorhandler(NotFound)(_routing_error)
    v2.app_errorhandler(MethodNotAllowed)(_routing_error)

    @v2.get("")
    def server() -> Response:
        return web.json_ok(service.server())

    @v2.get("/health/live")
    def live() -> Response:
        return web.json_ok({"live": True})

    @v2.get("/health/ready")
    def ready() -> Response:
        service.check_ready()
        return web.json_ok({"ready": True})

    @v2.get("/models/<name>", defaults={"version": None})
    @v2.get("/models/<name>/versions/<version>")
    def metadata(name: str, version: str | None) -> Response:
        return web.json_ok(service.metadata(name, version))

    @v2.get("/models/<name>/config", defaults={"version": None})
    @v2.get("/models/<name>/versions/<version>/config")
    def config(name: str, version: str | None) -> Response:
        return web.json_ok(service.config(name, version))

    @v2.get("/models/<name>/ready", defaults={"version": None})
    @v2.get("/models/<name>/versions/<version>/ready")
    def ready_model(name: str, version: str | None) -> Response:
        service.check_model_ready(name, version)
        return web.json_ok({"name": name, "ready": True})

    @v2.post("/models/<name>/infer", defaults={"version": None})
    @v2.post("/models/<name>/versions/<version>/infer")
    def infer(name: str, version: str | None) -> Response:
        service.check_version(service.selection(name), version)  # before the body is read
        body, blob = read_body()
        deadline = web.deadline(settings.default_deadline_ms / 1000)
        head, binary = service.infer(
            name, version, body, blob, request_id=web.request_id(), deadline=deadline
        )
        if not binary:
            return web.json_ok(head)
        encoded = json.dumps(head, separators=(",", ":")).encode()
        response = Response(encoded + binary, content_type=read.BINARY_CONTENT_TYPE)
        response.headers[read.HEADER_LENGTH] = str(len(encoded))
        return response

    return v2


def read_body() -> tuple[dict[str, Any], bytes]:
    """The inference request's JSON object (its ``id`` a string when given) and the binary tensor
    data after it, if an ``Inference-Header-Content-Length`` says where the JSON ends."""
    header, blob = read.split(request.get_data(cache=False), request.headers.get(read.HEADER_LENGTH))
    try:
        body = json.loads(header)
    except (ValueError, RecursionError):
        raise BadRequest("body is not valid JSON", code="invalid_json") from None
    body = read.object_field(body, "the body")
    if not isinstance(body.get("id"), str | None):
        raise BadRequest("'id' must be a string")
    return body, blob
