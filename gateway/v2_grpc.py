"""The Open Inference Protocol v2 over gRPC: KServe's ``GRPCInferenceService`` (``gateway/proto``),
served in each gateway worker beside its HTTP routes, behind Nginx's ``grpc_pass``.

Every RPC is answered by the v2 REST route it stands for, run in this process on the gateway's own
Flask app (``Transcoder``): ``ModelInfer`` becomes ``POST /v2/models/{name}[/versions/{v}]/infer``
with the binary tensor extension - the image files travel as they came, with no JSON or base64 -
so keys, scopes, the rate limits, admission, deadlines, the metrics and the access log are the
REST path's, not a copy of them. What crosses over:

- metadata ``authorization``, ``x-request-id``, ``x-deadline-ms`` and what Nginx
  sets (``x-real-ip``, ``x-request-start``) become the same HTTP headers; the peer is the caller's
  address, so ``x-real-ip`` is believed only from a trusted proxy, as on HTTP;
- the call's gRPC deadline, when it has one, is the request's ``X-Deadline-Ms`` (the shorter of the
  two when both are sent);
- an error's status becomes its gRPC code (``CODES``), its message the details, and its ``code``,
  ``request_id`` and ``retry-after`` go in the trailing metadata (``imagerec-code``,
  ``x-request-id``, ``retry-after``);
- a 503 of the readiness routes is ``ready: false``, not an error, and so is ``ModelReady``'s
  404 (a model or version it does not have), as Triton's HTTP client reads that route.

The service's own bounds: ``GATEWAY_GRPC_THREADS`` threads answer at once,
``GATEWAY_GRPC_MAX_CONCURRENT`` calls are held at most (more: ``RESOURCE_EXHAUSTED`` at once), a
message is at most ``GATEWAY_MAX_BODY_BYTES``; every worker binds ``GATEWAY_GRPC_BIND`` with
``SO_REUSEPORT`` and the kernel spreads connections over them.
"""

from __future__ import annotations

import atexit
import json
import logging
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import grpc
from flask import Flask
from werkzeug.datastructures import Headers
from werkzeug.test import EnvironBuilder, run_wsgi_app

from common.web import MAX_DEADLINE_MS
from common.wire import DEADLINE_HEADER
from gateway import v2_proto as proto
from gateway.settings import GatewaySettings
from gateway.v2_request import BINARY_CONTENT_TYPE, HEADER_LENGTH, pack_bytes

log = logging.getLogger(__name__)
Code = grpc.StatusCode
CODES = {
    400: Code.INVALID_ARGUMENT,
    401: Code.UNAUTHENTICATED,
    403: Code.PERMISSION_DENIED,
    404: Code.NOT_FOUND,
    405: Code.UNIMPLEMENTED,
    408: Code.DEADLINE_EXCEEDED,
    409: Code.FAILED_PRECONDITION,
    413: Code.RESOURCE_EXHAUSTED,  # what gRPC itself answers to a message over its limit
    415: Code.INVALID_ARGUMENT,
    422: Code.INVALID_ARGUMENT,
    429: Code.RESOURCE_EXHAUSTED,
    502: Code.UNAVAILABLE,
    503: Code.UNAVAILABLE,
    504: Code.DEADLINE_EXCEEDED,
}
# Call metadata (gRPC keys are lower case) that travels on as the HTTP header of the same name.
FORWARDED = {
    "authorization": "Authorization",
    "x-request-id": "X-Request-ID",
    DEADLINE_HEADER.lower(): DEADLINE_HEADER,
    "x-real-ip": "X-Real-IP",
    "x-request-start": "X-Request-Start",
}


@dataclass(frozen=True)
class Answer:
    """What the REST route answered: its status, headers and body."""

    status: int
    headers: Headers
    body: bytes

    def json(self) -> dict[str, Any]:
        return json.loads(self.body)


class Transcoder:
    """Runs an RPC's REST request on ``app`` in this thread, and turns a REST error into the RPC's."""

    def __init__(self, app: Flask) -> None:
        self.app = app

    def call(
        self,
        context: grpc.ServicerContext,
        method: str,
        path: str,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
    ) -> Answer:
        sent = dict(context.invocation_metadata())
        forwarded = {header: str(sent[key]) for key, header in FORWARDED.items() if key in sent}
        remaining = context.time_remaining()
        if remaining is not None:
            forwarded[DEADLINE_HEADER] = _budget_ms(remaining, forwarded.get(DEADLINE_HEADER))
        environ = EnvironBuilder(
            path=path,
            method=method,
            headers=Headers([*forwarded.items(), *(headers or {}).items()]),
            data=body,
            environ_base={"REMOTE_ADDR": peer_address(context.peer())},
        ).get_environ()
        chunks, status, response_headers = run_wsgi_app(self.app, environ, buffered=True)
        try:
            answered = b"".join(chunks)
        finally:
            getattr(chunks, "close", lambda: None)()
        return Answer(int(status.split()[0]), Headers(response_headers), answered)

    def ok(self, context: grpc.ServicerContext, answer: Answer, not_ready: tuple[int, ...] = ()) -> bool:
        """True when the route answered 200; False for a status in ``not_ready``; else the RPC
        fails with the route's error (``context.abort`` raises)."""
        if answer.status == 200:
            return True
        if answer.status in not_ready:
            return False
        try:
            error = answer.json()
        except ValueError:
            error = {}
        trailers = [("x-request-id", answer.headers.get("X-Request-ID", ""))]
        if error.get("code"):
            trailers.append(("imagerec-code", str(error["code"])))
        if answer.headers.get("Retry-After"):
            trailers.append(("retry-after", answer.headers["Retry-After"]))
        context.set_trailing_metadata(tuple(trailers))
        message = error.get("error")
        if isinstance(message, dict):  # the fleet's shape, from a route outside /v2
            message = message.get("message")
        context.abort(CODES.get(answer.status, Code.INTERNAL), str(message or f"HTTP {answer.status}"))
        raise AssertionError("unreachable: abort raises")


def _budget_ms(remaining_s: float, sent: str | None) -> str:
    """``X-Deadline-Ms`` for a call with ``remaining_s`` of its gRPC deadline left: the shorter of
    that and what the client sent; what the client sent as it is when it is not a positive number,
    so the route refuses it as on HTTP."""
    budget = max(1.0, min(remaining_s * 1000, MAX_DEADLINE_MS))
    if sent is None:
        return f"{budget:.0f}"
    try:
        asked = float(sent)
    except ValueError:
        return sent
    return f"{min(budget, asked):.0f}" if asked > 0 else sent


def peer_address(peer: str) -> str:
    """The caller's address from gRPC's ``ipv4:1.2.3.4:5``, ``ipv6:[::1]:5`` (else the whole)."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    if kind == "ipv6":
        return rest.rpartition(":")[0].strip("[]")
    return peer


def model_path(name: str, version: str) -> str:
    """``/v2/models/{name}[/versions/{version}]``, each part one path segment whatever it holds."""
    path = f"/v2/models/{quote(name, safe='')}"
    return f"{path}/versions/{quote(version, safe='')}" if version else path


def parameters_json(parameters: Any) -> dict[str, Any]:
    """A map of ``InferParameter`` as the REST protocol's JSON ``parameters``."""
    values = {}
    for key, parameter in parameters.items():
        choice = parameter.WhichOneof("parameter_choice")
        if choice is not None:
            values[key] = getattr(parameter, choice)
    return values


def parameters_proto(target: Any, values: dict[str, Any]) -> None:
    """JSON ``parameters`` into a map of ``InferParameter``; a list or object travels as JSON text."""
    for key, value in values.items():
        entry = target[key]
        if isinstance(value, bool):
            entry.bool_param = value
        elif isinstance(value, int):
            entry.int64_param = value
        elif isinstance(value, float):
            entry.double_param = value
        elif isinstance(value, str):
            entry.string_param = value
        else:
            entry.string_param = json.dumps(value, separators=(",", ":"))


def infer_body(request: Any) -> tuple[bytes, dict[str, str]]:
    """A ``ModelInferRequest`` as the REST route's binary-extension request: the JSON header, then
    every input's bytes (``raw_input_contents``, or BYTES ``contents`` packed the same way)."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise ValueError(
            f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs: send one per input"
        )
    inputs, blobs = [], []
    for i, tensor in enumerate(request.inputs):
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
            "parameters": parameters_json(tensor.parameters),
        }
        blob = raw[i] if raw else pack_bytes(list(tensor.contents.bytes_contents))
        if raw or tensor.contents.bytes_contents:
            entry["parameters"]["binary_data_size"] = len(blob)
            blobs.append(blob)
        else:
            entry["data"] = []  # no BYTES contents: the route says what the input lacks
        inputs.append(entry)
    header: dict[str, Any] = {"inputs": inputs, "parameters": parameters_json(request.parameters)}
    if request.id:
        header["id"] = request.id
    if request.outputs:
        header["outputs"] = [
            {"name": output.name, "parameters": {**parameters_json(output.parameters), "binary_data": True}}
            for output in request.outputs
        ]
    else:
        header["parameters"]["binary_data_output"] = True
    encoded = json.dumps(header, separators=(",", ":")).encode()
    headers = {"Content-Type": BINARY_CONTENT_TYPE, HEADER_LENGTH: str(len(encoded))}
    return encoded + b"".join(blobs), headers


def infer_response(answer: Answer) -> Any:
    """The REST route's binary-extension answer as a ``ModelInferResponse``."""
    length = int(answer.headers.get(HEADER_LENGTH) or len(answer.body))
    head, blob = json.loads(answer.body[:length]), answer.body[length:]
    response = proto.METHODS["ModelInfer"][1](
        model_name=head["model_name"], model_version=head["model_version"], id=head["id"]
    )
    parameters_proto(response.parameters, head.get("parameters") or {})
    offset = 0
    for output in head["outputs"]:
        # the values are all in raw_output_contents, none in the tensor's contents
        response.outputs.add(name=output["name"], datatype=output["datatype"], shape=output["shape"])
        size = int((output.get("parameters") or {}).get("binary_data_size", 0))
        response.raw_output_contents.append(blob[offset : offset + size])
        offset += size
    return response


class Servicer:
    """Each RPC of ``GRPCInferenceService`` as its REST request."""

    def __init__(self, app: Flask) -> None:
        self.rest = Transcoder(app)
        messages = proto.METHODS
        self._live, self._ready = messages["ServerLive"][1], messages["ServerReady"][1]
        self._model_ready, self._server = messages["ModelReady"][1], messages["ServerMetadata"][1]
        self._metadata = messages["ModelMetadata"][1]

    def ServerLive(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802 (the RPC's name)
        answer = self.rest.call(context, "GET", "/v2/health/live")
        return self._live(live=self.rest.ok(context, answer, not_ready=(503,)))

    def ServerReady(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        answer = self.rest.call(context, "GET", "/v2/health/ready")
        return self._ready(ready=self.rest.ok(context, answer, not_ready=(503,)))

    def ModelReady(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        answer = self.rest.call(context, "GET", model_path(request.name, request.version) + "/ready")
        # a model it does not know is not ready, as Triton's HTTP client reads the route's 404
        return self._model_ready(ready=self.rest.ok(context, answer, not_ready=(404, 503)))

    def ServerMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        answer = self.rest.call(context, "GET", "/v2")
        self.rest.ok(context, answer)
        body = answer.json()
        return self._server(name=body["name"], version=body["version"], extensions=body["extensions"])

    def ModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        answer = self.rest.call(context, "GET", model_path(request.name, request.version))
        self.rest.ok(context, answer)
        body = answer.json()
        response = self._metadata(name=body["name"], versions=body["versions"], platform=body["platform"])
        for field in ("inputs", "outputs"):
            for tensor in body[field]:
                getattr(response, field).add(
                    name=tensor["name"], datatype=tensor["datatype"], shape=tensor["shape"]
                )
        return response

    def ModelInfer(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        try:
            body, headers = infer_body(request)
        except ValueError as exc:
            context.abort(Code.INVALID_ARGUMENT, str(exc))
        path = model_path(request.model_name, request.model_version) + "/infer"
        answer = self.rest.call(context, "POST", path, body, headers)
        self.rest.ok(context, answer)
        return infer_response(answer)


def handler(servicer: Servicer) -> grpc.GenericRpcHandler:
    """The service's method table (what generated ``add_..._to_server`` code would build)."""
    methods: dict[str, grpc.RpcMethodHandler] = {}
    for name, (request_class, response_class) in proto.METHODS.items():
        behaviour: Callable[[Any, grpc.ServicerContext], Any] = getattr(servicer, name)
        methods[name] = grpc.unary_unary_rpc_method_handler(
            behaviour,
            request_deserializer=request_class.FromString,
            response_serializer=response_class.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(proto.SERVICE, methods)


def serve(app: Flask, settings: GatewaySettings, bind: str | None = None) -> tuple[grpc.Server, int]:
    """Start the service for ``app`` on ``bind`` (default ``GATEWAY_GRPC_BIND``; port 0: any free
    one) and return it with its port. It stops when the process exits, letting its calls finish for
    up to ``GATEWAY_GRPC_GRACE_S``."""
    address = bind or settings.grpc_bind
    server = grpc.server(
        ThreadPoolExecutor(max_workers=settings.grpc_threads, thread_name_prefix="grpc"),
        handlers=[handler(Servicer(app))],
        maximum_concurrent_rpcs=settings.grpc_max_concurrent,
        options=_options(settings),
    )
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"the v2 gRPC service cannot bind {address}")
    server.start()
    atexit.register(server.stop, settings.grpc_grace_s)
    log.info("v2 gRPC service listening", extra={"bind": address, "port": port})
    return server, port


def _options(settings: GatewaySettings) -> Iterable[tuple[str, int]]:
    return (
        ("grpc.max_receive_message_length", settings.max_body_bytes),
        ("grpc.max_send_message_length", settings.max_body_bytes),
        ("grpc.so_reuseport", 1),  # every gateway worker binds the one port
    )
