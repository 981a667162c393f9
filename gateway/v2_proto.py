"""The v2 gRPC protocol's messages, from ``gateway/proto/grpc_predict_v2.proto``.

The file is compiled when this module is first imported, by grpcio-tools' ``protoc`` in a child
process (about 0.1 s), so the tree holds the protocol's definition and no generated code.
NOTE: a child, not ``protoc.main`` in this process: its C++ protobuf crashes a process that has
loaded TensorFlow's (the test suite's). The messages go into a descriptor pool of their own: the
protocol's package is ``inference``, as in the modules tritonclient generates, and one pool
refuses two files that define the same names.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PROTO = Path(__file__).resolve().parent / "proto" / "grpc_predict_v2.proto"
PACKAGE = "inference"
SERVICE = f"{PACKAGE}.GRPCInferenceService"


def _compile(proto: Path) -> descriptor_pool.DescriptorPool:
    with tempfile.TemporaryDirectory() as folder:
        compiled = Path(folder) / "descriptors.pb"
        args = [
            f"--proto_path={proto.parent}",
            f"--descriptor_set_out={compiled}",
            "--include_imports",  # model_config.proto's messages with the service's
            str(proto),
        ]
        done = subprocess.run(
            [sys.executable, "-m", "grpc_tools.protoc", *args], capture_output=True, text=True, timeout=60
        )
        if done.returncode != 0:
            raise RuntimeError(f"protoc could not compile {proto}: {done.stderr.strip()}")
        files = descriptor_pb2.FileDescriptorSet.FromString(compiled.read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for file in files.file:
        pool.Add(file)
    return pool


POOL = _compile(PROTO)


def message(name: str) -> Any:
    """The message class ``inference.<name>``."""
    return message_factory.GetMessageClass(POOL.FindMessageTypeByName(f"{PACKAGE}.{name}"))


# Each RPC of the service: its request and response classes.
METHODS: dict[str, tuple[Any, Any]] = {
    method.name: (
        message_factory.GetMessageClass(method.input_type),
        message_factory.GetMessageClass(method.output_type),
    )
    for method in POOL.FindServiceByName(SERVICE).methods
}
InferParameter = message("InferParameter")
