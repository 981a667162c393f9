"""The v2 gRPC service (``gateway.v2_grpc``): a real gRPC server over a gateway on the fake fleet,
called through real sockets with the protocol's own messages; NVIDIA's tritonclient, through
Nginx, is in tests/e2e/test_protocol.py."""

from __future__ import annotations

import ast
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from flask.testing import FlaskClient
from prometheus_client import REGISTRY

from gateway import v2_grpc
from gateway import v2_proto as proto
from gateway.app import Gateway, build
from tests.gateway.fakes import FakeModelClient, StubFetcher
from tests.helpers import gateway_settings, photo

CAT, COFFEE = photo("chelsea.jpg"), photo("coffee.jpg")
MAX_BODY = 2 * 1024 * 1024


class Stub:
    """A client of the service: each RPC by name, with the protocol's messages."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel

    def __call__(
        self, rpc: str, metadata: tuple[tuple[str, str], ...] = (), timeout: float = 10, **fields: Any
    ):  # type: ignore[no-untyped-def]
        request_class, response_class = proto.METHODS[rpc]
        call = self.channel.unary_unary(
            f"/{proto.SERVICE}/{rpc}",
            request_serializer=request_class.SerializeToString,
            response_deserializer=response_class.FromString,
        )
        return call.with_call(request_class(**fields), metadata=metadata, timeout=timeout)[0]

    def error(self, rpc: str, **fields: Any) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as caught:
            self(rpc, **fields)
        return caught.value


def packed(*images: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(image)) + image for image in images)


def infer_request(*images: bytes, top_k: int = 3, model: str = "resnet50", **fields: Any) -> dict[str, Any]:
    tensor = proto.message("ModelInferRequest").InferInputTensor(
        name="image", datatype="BYTES", shape=[len(images)]
    )
    request = {"model_name": model, "inputs": [tensor], "raw_input_contents": [packed(*images)], **fields}
    parameters = request.setdefault("parameters", {})
    parameters["top_k"] = proto.InferParameter(int64_param=top_k)
    return request


def labels(response: Any, output: str = "labels") -> list[str]:
    index = [o.name for o in response.outputs].index(output)
    blob, values, offset = response.raw_output_contents[index], [], 0
    while offset < len(blob):
        (size,) = struct.unpack_from("<I", blob, offset)
        values.append(blob[offset + 4 : offset + 4 + size].decode())
        offset += 4 + size
    return values


def trailers(error: grpc.RpcError) -> dict[str, str]:
    return dict(error.trailing_metadata() or ())  # type: ignore[attr-defined]


def make_ready(fake: FakeModelClient) -> None:
    for name in fake.registry.models:
        for replica in fake.registry.replicas(name):
            replica.ready = True
            replica.metadata = {"ready": True, "backend": "openvino-fp32", "weights": "random"}


def gateway_on(fake: FakeModelClient, fetcher: StubFetcher, **settings: Any) -> Gateway:
    """The gateway's parts on the fake fleet; limits as the tests below need them."""
    limits = {
        "max_request_images": 4,
        "max_body_bytes": MAX_BODY,
        "rate_limit": "5/minute",
        "grpc_threads": 4,
    }
    chosen = gateway_settings(**{**limits, **settings})
    return build(chosen, client=fake, fetcher=fetcher, poll_health=False)  # type: ignore[arg-type]


@pytest.fixture
def grpc_gateway(fake: FakeModelClient, stub_fetcher: StubFetcher) -> Gateway:
    return gateway_on(fake, stub_fetcher)


@pytest.fixture
def stub(grpc_gateway: Gateway) -> Iterator[Stub]:
    """The service for ``grpc_gateway`` on a free port, and a channel to it."""
    server, port = v2_grpc.serve(grpc_gateway, bind="127.0.0.1:0")
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield Stub(channel)
    channel.close()
    server.stop(None)


@pytest.fixture
def rest(grpc_gateway: Gateway) -> FlaskClient:
    return grpc_gateway.app.test_client()


def test_the_messages_are_the_protocol_tritonclient_speaks() -> None:
    """Every field of every message, by name, number and type, as in tritonclient's descriptors:
    what crosses the wire is the same bytes."""
    from tritonclient.grpc import service_pb2  # its own pool: no clash with ours

    def fields(descriptor: Any) -> dict[str, Any]:
        own = {f.name: (f.number, f.type, f.message_type and f.message_type.name) for f in descriptor.fields}
        nested = {n.name: fields(n) for n in descriptor.nested_types}
        return {"fields": own, "nested": nested}

    triton = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    ours = proto.POOL.FindServiceByName(proto.SERVICE)
    for method in ours.methods:
        theirs = triton.methods_by_name[method.name]
        assert method.full_name == theirs.full_name
        for mine, other in ((method.input_type, theirs.input_type), (method.output_type, theirs.output_type)):
            assert fields(mine) == fields(other), mine.full_name
    for shared in ("InferParameter", "InferTensorContents"):
        assert fields(proto.POOL.FindMessageTypeByName(f"inference.{shared}")) == fields(
            service_pb2.DESCRIPTOR.message_types_by_name[shared]
        )
    # Triton's model configuration: a subset of its fields, each as Triton numbers and types it
    from tritonclient.grpc import model_config_pb2

    for subset in ("ModelConfig", "ModelInput", "ModelOutput"):
        mine = fields(proto.POOL.FindMessageTypeByName(f"inference.{subset}"))["fields"]
        theirs = fields(model_config_pb2.DESCRIPTOR.message_types_by_name[subset])["fields"]
        assert mine.items() <= theirs.items(), subset
    datatype = proto.POOL.FindEnumTypeByName("inference.DataType")
    triton_datatype = model_config_pb2.DESCRIPTOR.enum_types_by_name["DataType"]
    assert {v.name: v.number for v in datatype.values} == {v.name: v.number for v in triton_datatype.values}


def test_health_readiness_and_metadata(stub: Stub, fake: FakeModelClient) -> None:
    assert stub("ServerLive").live is True
    assert stub("ServerReady").ready is False  # the REST route's 503 is the protocol's "not ready"
    assert stub("ModelReady", name="resnet50").ready is False
    make_ready(fake)
    assert stub("ServerReady").ready is True
    assert stub("ModelReady", name="resnet50").ready is True
    assert stub("ModelReady", name="ensemble").ready is True
    assert stub("ServerMetadata").name == "imagerec"
    meta = stub("ModelMetadata", name="resnet50")
    assert (meta.name, list(meta.versions), meta.platform) == ("resnet50", ["1"], "imagerec-openvino-fp32")
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("image", "BYTES", [-1])]
    assert [t.name for t in meta.outputs] == ["labels", "scores", "indices"]
    config = stub("ModelConfig", name="resnet50").config
    assert (config.name, config.platform, config.max_batch_size) == ("resnet50", "imagerec-openvino-fp32", 0)
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [("image", 13, [-1])]  # TYPE_STRING
    assert [t.name for t in config.output] == ["labels", "scores", "indices"]
    error = stub.error("ModelMetadata", name="alexnet")
    assert error.code() == grpc.StatusCode.NOT_FOUND and trailers(error)["imagerec-code"] == "unknown_model"
    assert stub("ModelReady", name="resnet50", version="7").ready is False  # one it never had
    assert stub("ModelReady", name="alexnet").ready is False


def test_infer_answers_what_rest_answers(stub: Stub, rest: FlaskClient) -> None:
    response = stub("ModelInfer", **infer_request(CAT, COFFEE, id="req-9"))
    assert (response.model_name, response.model_version, response.id) == ("resnet50", "1", "req-9")
    shapes = {o.name: (o.datatype, list(o.shape)) for o in response.outputs}
    assert shapes == {"labels": ("BYTES", [2, 3]), "scores": ("FP32", [2, 3]), "indices": ("INT64", [2, 3])}
    assert len(response.raw_output_contents) == 3
    v1 = rest.post("/v1/predict?model=resnet50&top_k=3", data=COFFEE, content_type="image/jpeg").get_json()
    assert labels(response)[3:] == [p["label"] for p in v1["predictions"]]
    scores = np.frombuffer(response.raw_output_contents[1], "<f4").reshape(2, 3)
    assert scores[1].tolist() == pytest.approx([p["score"] for p in v1["predictions"]], abs=1e-6)
    indices = np.frombuffer(response.raw_output_contents[2], "<i8").reshape(2, 3)
    assert indices[1].tolist() == [p["index"] for p in v1["predictions"]]
    assert response.parameters["degraded"].bool_param is False


def test_bytes_contents_and_chosen_outputs(stub: Stub) -> None:
    """BYTES in the tensor's ``contents`` (not raw) work too; ``outputs`` picks what comes back."""
    message = proto.message("ModelInferRequest")
    tensor = message.InferInputTensor(name="image", datatype="BYTES", shape=[1])
    tensor.contents.bytes_contents.append(CAT)
    response = stub(
        "ModelInfer",
        model_name="ensemble",
        inputs=[tensor],
        outputs=[message.InferRequestedOutputTensor(name="labels")],
    )
    assert [o.name for o in response.outputs] == ["labels"] and len(labels(response)) == 5


@pytest.mark.parametrize(
    ("fields", "code", "imagerec_code"),
    [
        ({"model": "alexnet"}, grpc.StatusCode.NOT_FOUND, "unknown_model"),
        # a name, never a path: it reaches no other route
        ({"model": "../v1/keys"}, grpc.StatusCode.NOT_FOUND, "unknown_model"),
        ({"top_k": 0}, grpc.StatusCode.INVALID_ARGUMENT, "bad_request"),
    ],
)
def test_bad_requests_are_the_routes_errors(
    stub: Stub, fields: dict, code: grpc.StatusCode, imagerec_code: str
) -> None:
    error = stub.error("ModelInfer", **infer_request(CAT, **fields))
    assert error.code() == code, error.details()
    assert trailers(error)["imagerec-code"] == imagerec_code and trailers(error)["x-request-id"]


def test_malformed_tensors_are_refused(stub: Stub) -> None:
    too_many = stub.error("ModelInfer", **infer_request(*[CAT] * 5))
    assert too_many.code() == grpc.StatusCode.INVALID_ARGUMENT and "limit" in too_many.details()
    broken = infer_request(CAT)
    broken["raw_input_contents"] = [packed(CAT)[:-10]]
    assert stub.error("ModelInfer", **broken).code() == grpc.StatusCode.INVALID_ARGUMENT
    extra = infer_request(CAT)
    extra["raw_input_contents"] = [packed(CAT), b"more"]
    error = stub.error("ModelInfer", **extra)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "one per input" in error.details()
    not_an_image = stub.error("ModelInfer", **infer_request(b"this is not a picture"))
    assert not_an_image.code() == grpc.StatusCode.INVALID_ARGUMENT
    fp32 = infer_request(CAT)
    fp32["inputs"][0].datatype = "FP32"
    assert "BYTES" in stub.error("ModelInfer", **fp32).details()
    # over the message limit: gRPC's own refusal, before any of it reaches the app
    assert (
        stub.error("ModelInfer", **infer_request(b"x" * MAX_BODY)).code()
        == grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    assert stub("ServerLive").live  # and it keeps serving


def test_keys_rate_limits_and_deadlines_are_the_rest_paths(stub: Stub, fake: FakeModelClient) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub("ModelInfer", metadata=(("authorization", "Basic abc"),), **infer_request(CAT))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    started = time.monotonic()
    stub("ModelInfer", timeout=4, **infer_request(CAT))
    # the call's gRPC deadline became the request's (not the default 30 s): the members were told it
    assert started + 3 < fake.deadlines[-1] < started + 4.5
    answered = 1
    with pytest.raises(grpc.RpcError) as caught:  # 5 a minute per client
        while answered <= 5:
            stub("ModelInfer", **infer_request(CAT))
            answered += 1
    limited = caught.value
    assert limited.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (
        trailers(limited)["imagerec-code"] == "too_many_requests"
        and int(trailers(limited)["retry-after"]) >= 1
    )


def test_peer_addresses() -> None:
    assert v2_grpc.peer_address("ipv4:10.1.2.3:5555") == "10.1.2.3"
    assert v2_grpc.peer_address("ipv6:[::1]:5555") == "::1"
    assert v2_grpc.peer_address("unix:/tmp/socket") == "unix:/tmp/socket"


def test_calls_past_the_bound_are_refused_at_once_and_the_rest_answered(
    fake: FakeModelClient, stub_fetcher: StubFetcher
) -> None:
    """Clients that all call at once, and call again when refused: past GATEWAY_GRPC_MAX_CONCURRENT
    they get RESOURCE_EXHAUSTED without waiting; the calls held are answered; it keeps serving."""
    release, entered = threading.Event(), threading.Semaphore(0)
    answer = fake.predict

    def held(*args: Any, **kwargs: Any) -> dict[str, Any]:
        entered.release()
        assert release.wait(10), "the test never let the held calls go"
        return answer(*args, **kwargs)

    fake.predict = held  # type: ignore[method-assign]
    bounded = gateway_on(fake, stub_fetcher, grpc_threads=2, grpc_max_concurrent=2)
    server, port = v2_grpc.serve(bounded, bind="127.0.0.1:0")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            request_class, response_class = proto.METHODS["ModelInfer"]
            call = channel.unary_unary(
                f"/{proto.SERVICE}/ModelInfer",
                request_serializer=request_class.SerializeToString,
                response_deserializer=response_class.FromString,
            )
            request = request_class(**infer_request(CAT))
            first = [call.future(request, timeout=20) for _ in range(2)]
            for _ in first:  # both held calls reached the fleet
                assert entered.acquire(timeout=10), "the first two calls never reached the fleet"
            refused = [call.future(request, timeout=20) for _ in range(6)]
            codes = [f.exception().code() for f in refused]  # type: ignore[union-attr]
            assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 6
            release.set()
            assert all(len(labels(f.result())) == 3 for f in first)
            assert len(labels(call(request, timeout=20))) == 3
    finally:
        release.set()
        server.stop(None)


def test_rest_and_grpc_count_against_one_rate_limit(stub: Stub, rest: FlaskClient) -> None:
    """A client has one count (5 a minute here), whichever protocol it calls."""
    for _ in range(3):
        assert rest.post("/v1/predict?model=resnet50", data=CAT, content_type="image/jpeg").status_code == 200
    stub("ModelInfer", **infer_request(CAT))
    stub("ModelInfer", **infer_request(CAT))
    assert stub.error("ModelInfer", **infer_request(CAT)).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert rest.post("/v1/predict?model=resnet50", data=CAT, content_type="image/jpeg").status_code == 429


def test_calls_are_counted_under_their_own_labels(stub: Stub) -> None:
    def counted(route: str, status: str) -> float:
        value = REGISTRY.get_sample_value(
            "imagerec_requests_total",
            {"component": "gateway-grpc", "route": route, "model": "resnet50", "status": status},
        )
        return value or 0.0

    before = counted("ModelInfer", "OK"), counted("ModelInfer", "INVALID_ARGUMENT")
    stub("ModelInfer", **infer_request(CAT))
    stub.error("ModelInfer", **infer_request(CAT, top_k=0))
    assert (counted("ModelInfer", "OK"), counted("ModelInfer", "INVALID_ARGUMENT")) == (
        before[0] + 1,
        before[1] + 1,
    )


def test_the_service_calls_the_core_not_the_web_app() -> None:
    """No WSGI request is built per call: the module has no web framework to build one with."""
    tree = ast.parse(Path(v2_grpc.__file__).read_text())
    imported = {
        (node.module or "").split(".")[0] if isinstance(node, ast.ImportFrom) else alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    assert not imported & {"flask", "werkzeug"}
