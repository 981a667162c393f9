"""The Open Inference Protocol v2 (KServe, Triton, MLServer) on the gateway.

``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``, ``/v2/models/{name}``,
``/v2/models/{name}/ready`` and ``POST /v2/models/{name}/infer``, where ``name`` is a model or
``ensemble``. The one input is a BYTES tensor of shape ``[N]`` (or ``[N, 1]``) whose elements are
base64-encoded image files (what Triton's JSON clients send for BYTES); parameters ``top_k`` and,
for ensembles, ``vote``. Outputs, all ``[N, top_k]``: ``labels`` (BYTES), ``scores`` (FP32),
``indices`` (INT64); ask for a subset with ``outputs``. Errors follow the protocol
(``{"error": "<message>"}``), with the fleet's ``code`` and ``request_id`` beside it.
"""

from __future__ import annotations

import json
import time
from typing import Any

from flask import Blueprint, Response, jsonify, request
from werkzeug.datastructures import MultiDict
from werkzeug.exceptions import HTTPException

from common import web
from common.errors import BadRequest, ModelUnavailable, ServiceError
from gateway.inputs import ImageInput, decode_base64
from gateway.predict import Predictor, Selection, item_error, select
from gateway.settings import GatewaySettings

OUTPUTS = {"labels": "BYTES", "scores": "FP32", "indices": "INT64"}
VERSION = "1"


def _error(exc: ServiceError) -> Response:
    response = jsonify({"error": exc.message, "code": exc.code, "request_id": web.request_id()})
    response.status_code = exc.status
    if exc.retry_after is not None:
        response.headers["Retry-After"] = str(exc.retry_after)
    return response


def _http_error(exc: HTTPException) -> Response:
    return _error(web.as_service_error(exc))


def _images(tensor: dict[str, Any], max_images: int, max_bytes: int) -> list[ImageInput]:
    if tensor.get("datatype") != "BYTES":
        raise BadRequest("the input must be a BYTES tensor of base64-encoded image files")
    data = tensor.get("data")
    if isinstance(data, list) and all(isinstance(row, list) and len(row) == 1 for row in data):
        data = [row[0] for row in data]  # shape [N, 1]
    if not isinstance(data, list) or not data:
        raise BadRequest("input 'data' must be a non-empty list of base64 strings")
    shape = tensor.get("shape")
    if shape not in ([len(data)], [len(data), 1]):
        raise BadRequest(f"input shape {shape} does not match its {len(data)} elements")
    if len(data) > max_images:
        raise BadRequest(
            f"{len(data)} images in one request; the limit is {max_images}", code="too_many_images"
        )
    return [
        ImageInput(f"{tensor.get('name', 'image')}[{i}]", decode_base64(v, max_bytes))
        for i, v in enumerate(data)
    ]


def create_blueprint(settings: GatewaySettings, predictor: Predictor) -> Blueprint:
    registry = predictor.client.registry
    v2 = Blueprint("v2", __name__, url_prefix="/v2")
    v2.register_error_handler(ServiceError, _error)
    v2.register_error_handler(HTTPException, _http_error)

    def selection(name: str, vote: str = "soft") -> Selection:
        return select(MultiDict({"model": name, "vote": vote}), settings, predictor.client)

    def model_ready(name: str) -> bool:
        return all(registry.metadata(member) for member in selection(name).members)

    @v2.get("")
    def server() -> Response:
        return web.json_ok({"name": "imagerec", "version": VERSION, "extensions": []})

    @v2.get("/health/live")
    def live() -> Response:
        return web.json_ok({"live": True})

    @v2.get("/health/ready")
    def ready() -> Response:
        """Ready when every routed model has a ready replica (the protocol's server readiness)."""
        missing = [name for name in registry.models if not registry.metadata(name)]
        if missing:
            raise ModelUnavailable(f"not ready: {', '.join(missing)}")
        return web.json_ok({"ready": True})

    @v2.get("/models/<name>")
    def metadata(name: str) -> Response:
        members = selection(name).members
        meta = registry.metadata(members[0])
        single = len(members) == 1
        return web.json_ok(
            {
                "name": name,
                # a model served from a repository lists its versions; others have one, "1"
                "versions": (meta.get("versions") or [VERSION]) if single else [VERSION],
                "platform": f"imagerec-{meta.get('backend') or 'unavailable'}"
                if single
                else "imagerec-ensemble",
                "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1]}],
                "outputs": [{"name": n, "datatype": t, "shape": [-1, -1]} for n, t in OUTPUTS.items()],
                "parameters": {
                    "members": list(members),
                    "weights": {m: registry.metadata(m).get("weights") for m in members},
                },
            }
        )

    @v2.get("/models/<name>/ready")
    def ready_model(name: str) -> Response:
        if not model_ready(name):
            raise ModelUnavailable(f"{name} is not ready")
        return web.json_ok({"name": name, "ready": True})

    @v2.post("/models/<name>/infer")
    def infer(name: str) -> Response:
        try:
            body = json.loads(request.get_data(cache=False))
        except (ValueError, RecursionError):
            raise BadRequest("body is not valid JSON", code="invalid_json") from None
        if not isinstance(body, dict) or not isinstance(body.get("inputs"), list) or len(body["inputs"]) != 1:
            raise BadRequest("body must be an object with 'inputs': one BYTES tensor of images")
        parameters = body.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise BadRequest("'parameters' must be an object")
        chosen = selection(name, str(parameters.get("vote", "soft")))
        top_k = parameters.get("top_k", settings.default_top_k)
        if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= settings.max_top_k:
            raise BadRequest(f"parameter top_k must be an integer between 1 and {settings.max_top_k}")
        wanted = [str(o.get("name")) for o in body.get("outputs") or [] if isinstance(o, dict)] or list(
            OUTPUTS
        )
        unknown = [n for n in wanted if n not in OUTPUTS]
        if unknown:
            raise BadRequest(f"unknown outputs {unknown}; available: {', '.join(OUTPUTS)}")

        budget_s = web.deadline_s()
        deadline = time.monotonic() + budget_s if budget_s else float("inf")
        items = _images(body["inputs"][0], settings.max_batch_images, settings.max_image_bytes)
        predictor.validate(items)
        for item in items:  # a tensor is answered whole or not at all: refuse before any decoding
            if item.error is not None:
                error = item.error
                raise ServiceError(f"{item.name}: {error.message}", code=error.code, status=error.status)
        predictor.canonicalize(chosen, items)
        result = predictor.run(chosen, items, top_k=top_k, request_id=web.request_id(), deadline=deadline)
        failed = next((o for o in result["outcomes"] if "error" in o), None)
        if failed:
            raise item_error(failed)
        rows = [o["predictions"] for o in result["outcomes"]]
        k = min(len(row) for row in rows)
        columns = {
            "labels": [p["label"] for row in rows for p in row[:k]],
            "scores": [p["score"] for row in rows for p in row[:k]],
            "indices": [p["index"] for row in rows for p in row[:k]],
        }
        replies = result["replies"]
        # a model served from a repository names the version that answered; others are "1"
        versions = {str(reply.get("version") or VERSION) for reply in replies.values()}
        answered_by = versions.pop() if len(chosen.members) == 1 and len(versions) == 1 else VERSION
        return web.json_ok(
            {
                "model_name": name,
                "model_version": answered_by,
                "id": str(body.get("id") or web.request_id()),
                "parameters": {
                    "weights": {m: r.get("weights") for m, r in replies.items()},
                    "degraded": bool(result["failures"]),
                },
                "outputs": [
                    {"name": n, "datatype": OUTPUTS[n], "shape": [len(rows), k], "data": columns[n]}
                    for n in wanted
                ],
            }
        )

    return v2
