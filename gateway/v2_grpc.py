"""The Open Inference Protocol v2 over gRPC: KServe's ``GRPCInferenceService`` (``gateway/proto``),
served in each gateway worker beside its HTTP routes, behind Nginx's ``grpc_pass``.

Each RPC calls the gateway's own parts directly, as its REST route does: the v2 operations
(``gateway.v2_service``, over the one prediction core), the keys and scopes (``gateway.auth``) and
the per-client rate limit, counted in the REST routes' own bucket (``rate_limits.SharedLimit``).
``ModelInfer``'s image files go from the message to the core as they came (no JSON, no base64, no
WSGI request). What a call carries:

- metadata ``authorization``, ``x-request-id``, ``x-deadline-ms`` and what Nginx sets
  (``x-real-ip``, ``x-request-start``), read as the HTTP headers of those names are; the peer is the
  caller's address, so ``x-real-ip`` is believed only from a trusted proxy, as on HTTP;
- the call's gRPC deadline, when it has one, is the request's budget (the shorter of the two when
  ``x-deadline-ms`` is sent too);
- an error's HTTP status becomes its gRPC code (``CODES``), its message the details, and its
  ``code``, the request id and ``retry-after`` go in the trailing metadata (``imagerec-code``,
  ``x-request-id``, ``retry-after``);
- readiness that fails is ``ready: false``, not an error, and so is ``ModelReady`` for a model or
  version it does not have, as Triton's HTTP client reads that route.

Every call is counted and timed in the request metrics under ``component="gateway-grpc"``, the
RPC's name as the route and its gRPC code as the status, and logged as one JSON line.

The service's own bounds: ``GATEWAY_GRPC_THREADS`` threads answer at once,
``GATEWAY_GRPC_MAX_CONCURRENT`` calls are held at most (more: ``RESOURCE_EXHAUSTED`` at once), a
message is at most ``GATEWAY_MAX_BODY_BYTES``; every worker binds ``GATEWAY_GRPC_BIND`` with
``SO_REUSEPORT`` and the kernel spreads connections over them.
"""

from __future__ import annotations

import atexit
import json
import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from common import metrics, web
from common.errors import BadRequest, ServiceError
from common.tenancy.keys import Principal
from common.wire import DEADLINE_HEADER
from gateway import v2_proto as proto
from gateway.app import Gateway, known_model
from gateway.settings import GatewaySettings
from gateway.v2_request import pack_bytes

log = logging.getLogger(__name__)
T = TypeVar("T")
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
COMPONENT = "gateway-grpc"  # the request metrics' label for calls of this service


class TooManyRequests(ServiceError):
    status, code = 429, "too_many_requests"


@dataclass
class Call:
    """One RPC as the gateway sees a request: its metadata, id, caller's address and start, and
    its principal once the key is checked."""

    metadata: dict[str, str]
    request_id: str
    address: str
    started: float
    principal: Principal | None = None

    def deadline(self, context: grpc.ServicerContext, default_s: float) -> float:
        """The request's deadline (``time.monotonic()``): from its arrival, the client's
        ``x-deadline-ms`` or the call's own gRPC deadline (the shorter), else ``default_s``."""
        budget = web.budget_s(self.metadata.get(DEADLINE_HEADER.lower()))
        remaining = context.time_remaining()
        if remaining is not None:
            call_budget = max(0.001, min(remaining, web.MAX_DEADLINE_MS / 1000))
            budget = call_budget if budget is None else min(budget, call_budget)
        return web.arrived_from(self.metadata.get("x-request-start", "")) + (
            default_s if budget is None else budget
        )


def peer_address(peer: str) -> str:
    """The caller's address from gRPC's ``ipv4:1.2.3.4:5``, ``ipv6:[::1]:5`` (else the whole)."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    if kind == "ipv6":
        return rest.rpartition(":")[0].strip("[]")
    return peer


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


def infer_body(request: Any) -> tuple[dict[str, Any], bytes]:
    """A ``ModelInferRequest`` as the protocol's JSON request object with the binary tensor data
    after it (``gateway.v2_service`` reads both): every input's bytes are its
    ``raw_input_contents``, or its BYTES ``contents`` packed the same way."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise BadRequest(
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
            entry["data"] = []  # no BYTES contents: the core says what the input lacks
        inputs.append(entry)
    body: dict[str, Any] = {"inputs": inputs, "parameters": parameters_json(request.parameters)}
    if request.id:
        body["id"] = request.id
    if request.outputs:
        body["outputs"] = [
            {"name": output.name, "parameters": {**parameters_json(output.parameters), "binary_data": True}}
            for output in request.outputs
        ]
    else:
        body["parameters"]["binary_data_output"] = True
    return body, b"".join(blobs)


def infer_response(head: dict[str, Any], blob: bytes) -> Any:
    """The core's answer (every output as binary data) as a ``ModelInferResponse``."""
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
    """Each RPC of ``GRPCInferenceService``: the caller checked as on HTTP, then the v2 operation."""

    def __init__(self, gateway: Gateway) -> None:
        self.auth, self.limit, self.v2 = gateway.auth, gateway.limit, gateway.protocol
        self.registry = gateway.registry
        self.default_deadline_s = gateway.settings.default_deadline_ms / 1000
        messages = proto.METHODS
        self._live, self._server_ready = messages["ServerLive"][1], messages["ServerReady"][1]
        self._model_ready, self._server = messages["ModelReady"][1], messages["ServerMetadata"][1]
        self._metadata = messages["ModelMetadata"][1]
        self._config = messages["ModelConfig"][1]

    def _run(
        self,
        context: grpc.ServicerContext,
        rpc: str,
        endpoint: str,
        work: Callable[[Call], T],
        *,
        model: str = "",
        limited: bool = False,
        visible: bool = True,
    ) -> T:
        """``work`` for this call once its caller may make it (the rate limit first, when
        ``limited``: a flood of bad keys costs no lookups; then the key, its scope and the model's
        visibility, unless ``work`` checks that itself), with its error as the call's status,
        counted, timed and logged."""
        sent = {key: value for key, value in context.invocation_metadata() if isinstance(value, str)}
        peer = peer_address(context.peer())
        call = Call(
            sent,
            web.safe_request_id(sent.get("x-request-id", "")),
            self.auth.address_of(peer, sent.get("x-real-ip")),
            time.perf_counter(),
        )
        code = Code.OK
        try:
            header = sent.get("authorization", "")
            if limited and (wait := self.limit.hit(self.auth.limit_key(header, call.address))) is not None:
                raise TooManyRequests(f"over the rate limit; retry in {wait} s", retry_after=wait)
            call.principal = principal = self.auth.authenticate(header)
            self.auth.require(endpoint, principal)
            if model and visible:
                self.auth.check_visible([model], self.registry, principal)
            return work(call)
        except ServiceError as exc:
            code = CODES.get(exc.status, Code.INTERNAL)
            self._abort(context, call, exc, code)
        except Exception:
            code = Code.INTERNAL
            log.exception("unhandled error (request_id=%s)", call.request_id)
            self._abort(
                context, call, ServiceError("internal error; see the server log for this request id"), code
            )
        finally:
            self._account(rpc, model, call, code)
        raise AssertionError("unreachable: abort raises")

    @staticmethod
    def _abort(context: grpc.ServicerContext, call: Call, error: ServiceError, code: grpc.StatusCode) -> None:
        trailers = [("x-request-id", call.request_id), ("imagerec-code", error.code)]
        if error.retry_after is not None and error.status in web.RETRY_STATUSES:
            trailers.append(("retry-after", str(error.retry_after)))
        context.set_trailing_metadata(tuple(trailers))
        context.abort(code, error.message)

    def _account(self, rpc: str, model: str, call: Call, code: grpc.StatusCode) -> None:
        elapsed = time.perf_counter() - call.started
        label = known_model(model, self.registry)
        metrics.REQUESTS.labels(COMPONENT, rpc, label, code.name).inc()
        metrics.REQUEST_SECONDS.labels(COMPONENT, rpc, label).observe(elapsed)
        level = logging.INFO if rpc == "ModelInfer" else logging.DEBUG  # probes come every few seconds
        if web.request_log.isEnabledFor(level):
            web.request_log.log(
                level,
                "request",
                extra={
                    "component": COMPONENT,
                    "request_id": call.request_id,
                    "method": "grpc",
                    "path": rpc,
                    "model": model[:100],
                    "status": code.name,
                    "duration_ms": round(elapsed * 1000, 2),
                    "client": call.address,
                },
            )

    @staticmethod
    def _ready_flag(check: Callable[[], None], not_ready: tuple[int, ...]) -> bool:
        try:
            check()
        except ServiceError as exc:
            if exc.status in not_ready:
                return False
            raise
        return True

    def ServerLive(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802 (the RPC's name)
        return self._run(context, "ServerLive", "v2.live", lambda call: self._live(live=True))

    def ServerReady(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        def ready(call: Call) -> Any:
            return self._server_ready(ready=self._ready_flag(self.v2.check_ready, (503,)))

        return self._run(context, "ServerReady", "v2.ready", ready)

    def ModelReady(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        def ready(call: Call) -> Any:
            def check() -> None:
                self.auth.check_visible([request.name], self.registry, call.principal)
                self.v2.check_model_ready(request.name, request.version or None)

            # a model it does not know (or may not see) is not ready, as Triton's HTTP client reads
            # the route's 404
            return self._model_ready(ready=self._ready_flag(check, (404, 503)))

        return self._run(context, "ModelReady", "v2.ready_model", ready, model=request.name, visible=False)

    def ServerMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        def server(call: Call) -> Any:
            body = self.v2.server()
            return self._server(name=body["name"], version=body["version"], extensions=body["extensions"])

        return self._run(context, "ServerMetadata", "v2.server", server)

    def ModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        def metadata(call: Call) -> Any:
            body = self.v2.metadata(request.name, request.version or None)
            response = self._metadata(name=body["name"], versions=body["versions"], platform=body["platform"])
            for field in ("inputs", "outputs"):
                for tensor in body[field]:
                    getattr(response, field).add(
                        name=tensor["name"], datatype=tensor["datatype"], shape=tensor["shape"]
                    )
            return response

        return self._run(context, "ModelMetadata", "v2.metadata", metadata, model=request.name)

    def ModelConfig(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        def config(call: Call) -> Any:
            return self._config(config=self.v2.config(request.name, request.version or None))

        return self._run(context, "ModelConfig", "v2.config", config, model=request.name)

    def ModelInfer(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        def infer(call: Call) -> Any:
            body, blob = infer_body(request)
            head, binary = self.v2.infer(
                request.model_name,
                request.model_version or None,
                body,
                blob,
                request_id=call.request_id,
                deadline=call.deadline(context, self.default_deadline_s),
            )
            return infer_response(head, binary)

        return self._run(context, "ModelInfer", "v2.infer", infer, model=request.model_name, limited=True)


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


def serve(gateway: Gateway, bind: str | None = None) -> tuple[grpc.Server, int]:
    """Start the service for ``gateway`` on ``bind`` (default ``GATEWAY_GRPC_BIND``; port 0: any
    free one) and return it with its port. It stops when the process exits, letting its calls
    finish for up to ``GATEWAY_GRPC_GRACE_S``."""
    settings = gateway.settings
    address = bind or settings.grpc_bind
    server = grpc.server(
        ThreadPoolExecutor(max_workers=settings.grpc_threads, thread_name_prefix="grpc"),
        handlers=[handler(Servicer(gateway))],
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
