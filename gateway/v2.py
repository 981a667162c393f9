"""The Open Inference Protocol v2 (KServe, Triton, MLServer) on the gateway.

``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``; ``GET /v2/models/{name}[/versions/{v}]``,
``GET .../ready`` and ``POST .../infer``, where ``name`` is a model or ``ensemble``. The one input
is a BYTES tensor of shape ``[N]`` (or ``[N, 1]``) whose elements are base64-encoded image files
(what Triton's JSON clients send for BYTES), or raw image files with the binary tensor data
extension (``gateway.v2_request``, both ways); parameters ``top_k`` and, for ensembles, ``vote``.
Outputs, all ``[N, top_k]``: ``labels`` (BYTES), ``scores`` (FP32), ``indices`` (INT64); ask for a
subset with ``outputs``.

Versions: a model served from a repository lists its versions; the others, and the ensemble, have
one, "1". The fleet serves only a model's newest version: that one answers on the versioned routes
as on the unversioned ones; a listed older version is a known model version that is not ready
(503 ``version_not_served``, naming the served one); any other version is a 404.

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
from common.errors import BadRequest, ModelUnavailable, ServiceError
from common.outcomes import Predicted, Prediction, Selection
from fleet.predict import Predictor
from gateway import selection as selections
from gateway import v2_request as read
from gateway.settings import GatewaySettings

log = logging.getLogger(__name__)
VERSION = "1"


class UnknownVersion(ServiceError):
    status, code = 404, "unknown_version"


class VersionNotServed(ServiceError):
    """A version the model has, but not the one the fleet serves (no Retry-After: waiting will not
    bring it back)."""

    status, code = 503, "version_not_served"


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


def create_blueprint(settings: GatewaySettings, predictor: Predictor) -> Blueprint:
    """The ``/v2`` routes over ``predictor``. NOTE: registering it also installs app-wide 404 and 405
    handlers (routing errors never reach a blueprint's own): ``/v2`` paths get the protocol's shape,
    every other path the fleet's, as before."""
    registry = predictor.client.registry
    v2 = Blueprint("v2", __name__, url_prefix="/v2")
    v2.register_error_handler(ServiceError, _error)
    v2.register_error_handler(HTTPException, _http_error)
    v2.register_error_handler(Exception, _unexpected)
    v2.app_errorhandler(NotFound)(_routing_error)
    v2.app_errorhandler(MethodNotAllowed)(_routing_error)

    def selection(name: str, vote: str = "soft") -> Selection:
        return selections.named(name, vote, settings, registry)

    def model_ready(name: str) -> bool:
        return all(registry.metadata(member) for member in selection(name).members)

    def versions(chosen: Selection) -> tuple[str, list[str]]:
        """The version ``chosen`` serves, and every version it has."""
        if chosen.vote is not None:
            return VERSION, [VERSION]
        meta = registry.metadata(chosen.name)
        if not meta:
            raise ModelUnavailable(f"{chosen.name} has no ready replica to say which versions it has")
        served = str(meta.get("version") or VERSION)
        return served, [str(v) for v in meta.get("versions") or [served]]

    def check_version(chosen: Selection, version: str | None) -> None:
        """Nothing when ``version`` is absent or the one served; else why it cannot be used."""
        if version is None:
            return
        served, known = versions(chosen)
        if version == served:
            return
        if version in known:
            raise VersionNotServed(
                f"{chosen.name} version {version} is not served: "
                f"the fleet serves only its newest version, {served}"
            )
        raise UnknownVersion(
            f"{chosen.name} has no version {version[:64]!r}; it has {', '.join(known)} (serving {served})"
        )

    @v2.get("")
    def server() -> Response:
        return web.json_ok({"name": "imagerec", "version": VERSION, "extensions": []})

    @v2.get("/health/live")
    def live() -> Response:
        return web.json_ok({"live": True})

    @v2.get("/health/ready")
    def ready() -> Response:
        """Ready when every base model has a ready replica (the protocol's server readiness); a
        custom model is ready with its base, and is never named here (it may be private)."""
        missing = [name for name in registry.bases if not registry.metadata(name)]
        if missing:
            raise ModelUnavailable(f"not ready: {', '.join(missing)}")
        return web.json_ok({"ready": True})

    @v2.get("/models/<name>", defaults={"version": None})
    @v2.get("/models/<name>/versions/<version>")
    def metadata(name: str, version: str | None) -> Response:
        chosen = selection(name)
        check_version(chosen, version)
        members = chosen.members
        meta = registry.metadata(members[0])
        single = chosen.vote is None
        return web.json_ok(
            {
                "name": name,
                # a model served from a repository lists its versions; others have one, "1"
                "versions": (meta.get("versions") or [VERSION]) if single else [VERSION],
                "platform": f"imagerec-{meta.get('backend') or 'unavailable'}"
                if single
                else "imagerec-ensemble",
                "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1]}],
                "outputs": [{"name": n, "datatype": t, "shape": [-1, -1]} for n, t in read.OUTPUTS.items()],
                "parameters": {
                    "members": list(members),
                    "weights": {m: registry.metadata(m).get("weights") for m in members},
                    "precision": {m: registry.metadata(m).get("precision") for m in members},
                },
            }
        )

    @v2.get("/models/<name>/ready", defaults={"version": None})
    @v2.get("/models/<name>/versions/<version>/ready")
    def ready_model(name: str, version: str | None) -> Response:
        check_version(selection(name), version)
        if not model_ready(name):
            raise ModelUnavailable(f"{name} is not ready")
        return web.json_ok({"name": name, "ready": True})

    @v2.post("/models/<name>/infer", defaults={"version": None})
    @v2.post("/models/<name>/versions/<version>/infer")
    def infer(name: str, version: str | None) -> Response:
        check_version(selection(name), version)
        body, blob = read_body()
        tensor = read.tensor(body)
        parameters = read.parameters(body, "the request's")
        chosen = selection(name, str(parameters.get("vote", "soft")))
        top_k = parameters.get("top_k", settings.default_top_k)
        if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= settings.max_top_k:
            raise BadRequest(f"parameter top_k must be an integer between 1 and {settings.max_top_k}")
        wanted = read.outputs(body)
        deadline = web.deadline(settings.default_deadline_ms / 1000)
        items = read.images(tensor, blob, settings.max_request_images, settings.max_image_bytes)
        # a tensor is answered whole or not at all: its first bad image refuses it before any decoding
        prediction = predictor.predict(
            chosen, items, top_k=top_k, request_id=web.request_id(), deadline=deadline, whole=True
        )
        head, binary = answer(name, version, body, wanted, prediction)
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


def answer(
    name: str,
    version: str | None,
    body: dict[str, Any],
    wanted: list[tuple[str, bool]],
    prediction: Prediction,
) -> tuple[dict[str, Any], bytes]:
    """The inference response: the ``wanted`` outputs, ``[N, k]`` each, and the version that
    answered; with the binary data of the outputs asked for as binary (empty: none)."""
    if error := prediction.first_error():
        raise error
    rows = [o.labels for o in prediction.outcomes if isinstance(o, Predicted)]
    k = min(len(row) for row in rows)
    columns: dict[str, list[Any]] = {
        "labels": [p.label for row in rows for p in row[:k]],
        "scores": [p.score for row in rows for p in row[:k]],
        "indices": [p.index for row in rows for p in row[:k]],
    }
    served = prediction.served
    # a model served from a repository names the version that answered; others are "1"
    answered = {s.version or VERSION for s in served.values()}
    answered_by = answered.pop() if prediction.selection.vote is None and len(answered) == 1 else VERSION
    if version is not None and answered_by != version:  # the model moved on during the request
        raise VersionNotServed(f"{name} switched to version {answered_by}; version {version} is not served")
    outputs, binary = [], []
    for output, as_binary in wanted:
        datatype = read.OUTPUTS[output]
        entry: dict[str, Any] = {"name": output, "datatype": datatype, "shape": [len(rows), k]}
        if as_binary:
            binary.append(read.encode(datatype, columns[output]))
            entry["parameters"] = {"binary_data_size": len(binary[-1])}
        else:
            entry["data"] = columns[output]
        outputs.append(entry)
    head = {
        "model_name": name,
        "model_version": answered_by,
        "id": body.get("id") or web.request_id(),
        "parameters": {
            "weights": {m: s.weights for m, s in served.items()},
            "degraded": prediction.degraded,
        },
        "outputs": outputs,
    }
    return head, b"".join(binary)
