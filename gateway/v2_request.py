"""Reading an Open Inference Protocol v2 infer request: every field the fleet uses, checked against
the protocol's ``inference_request`` schema (kserve/open-inference-protocol, open_inference_rest.yaml),
so a malformed tensor is a 400 naming what is wrong, never a 500.

The binary tensor data extension (Triton's, which KServe's clients speak): with an
``Inference-Header-Content-Length: n`` header the body's first ``n`` bytes are the JSON request and
the rest the tensors' raw bytes; an input that says ``"parameters": {"binary_data_size": k}`` has
no ``data`` and owns the next ``k`` of them. A BYTES element travels as a 4-byte little-endian
length and then its bytes - here an image file as it is, with no base64. An output asked for with
``"binary_data": true`` (or every output, with the request's ``"binary_data_output": true``) is
answered the same way (``encode``).
"""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np

from common.errors import BadRequest, ImageTooLarge
from common.wire import whole_number
from fleet.predict import ImageInput
from fleet.refine import Refinement
from gateway.inputs import decode_base64

OUTPUTS = {"labels": "BYTES", "scores": "FP32", "indices": "INT64"}
TENSOR_FIELDS = ("name", "datatype", "shape", "data")
HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_CONTENT_TYPE = "application/octet-stream"
_LENGTH = struct.Struct("<I")


def split(raw: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """The JSON request and the binary data after it (none without ``Inference-Header-Content-Length``)."""
    if header_length is None:
        return raw, b""
    length = whole_number(header_length)
    if length is None:
        raise BadRequest(f"{HEADER_LENGTH} must be a whole number of bytes, got {header_length[:20]!r}")
    if not 0 < length <= len(raw):
        raise BadRequest(f"{HEADER_LENGTH} {length} is not within the body's {len(raw)} bytes")
    return raw[:length], raw[length:]


def unpack_bytes(blob: bytes, max_elements: int, max_bytes: int) -> list[bytes]:
    """A binary BYTES tensor's elements: each a 4-byte little-endian length, then that many bytes."""
    elements: list[bytes] = []
    offset = 0
    while offset < len(blob):
        if len(elements) >= max_elements:
            raise BadRequest(
                f"more than {max_elements} images in one request; that is the limit", code="too_many_images"
            )
        if offset + _LENGTH.size > len(blob):
            raise BadRequest("binary input data ends inside an element's 4-byte length")
        (size,) = _LENGTH.unpack_from(blob, offset)
        offset += _LENGTH.size
        if size > max_bytes:
            raise ImageTooLarge(f"a binary image element of {size} bytes is over the {max_bytes}-byte limit")
        if offset + size > len(blob):
            raise BadRequest(f"a binary element says {size} bytes, but only {len(blob) - offset} are left")
        elements.append(blob[offset : offset + size])
        offset += size
    return elements


def pack_bytes(elements: list[bytes]) -> bytes:
    """A BYTES tensor's elements as the binary extension carries them (``unpack_bytes`` reads it)."""
    return b"".join(_LENGTH.pack(len(element)) + element for element in elements)


def encode(datatype: str, values: list[Any]) -> bytes:
    """An output tensor's values as the binary extension carries them (row-major, little-endian)."""
    if datatype == "BYTES":
        return pack_bytes([str(value).encode() for value in values])
    return np.asarray(values, {"FP32": "<f4", "INT64": "<i8"}[datatype]).tobytes()


def object_field(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be a JSON object")
    return value


def parameters(owner: dict[str, Any], what: str) -> dict[str, Any]:
    """The protocol's ``$parameters`` of ``owner``: strings, numbers and booleans (null: none)."""
    if owner.get("parameters") is None:
        return {}
    parameters = object_field(owner["parameters"], f"{what} 'parameters'")
    wrong = [name for name, value in parameters.items() if not isinstance(value, str | int | float)]
    if wrong:
        raise BadRequest(f"{what} parameters {wrong} must be strings, numbers or booleans")
    return parameters


def tensor(body: dict[str, Any]) -> dict[str, Any]:
    """The request's one input tensor, its protocol fields checked (``$request_input``)."""
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1:
        raise BadRequest("'inputs' must be a list of one BYTES tensor of images")
    tensor = object_field(inputs[0], "the input tensor")
    binary = "binary_data_size" in parameters(tensor, "the input's")
    missing = [field for field in TENSOR_FIELDS if field not in tensor and not (binary and field == "data")]
    if missing:
        raise BadRequest(f"the input tensor has no {', '.join(missing)}; it needs {', '.join(TENSOR_FIELDS)}")
    if not isinstance(tensor["name"], str):
        raise BadRequest("the input's 'name' must be a string")
    if tensor["datatype"] != "BYTES":
        raise BadRequest("the input must be a BYTES tensor of image files (base64 in JSON, raw in binary)")
    if binary and "data" in tensor:
        raise BadRequest("the input has both 'data' and a binary_data_size: send one of them")
    shape = tensor["shape"]
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise BadRequest("the input's 'shape' must be a list of non-negative integers")
    parameters(tensor, "the input's")
    return tensor


def images(tensor: dict[str, Any], blob: bytes, max_images: int, max_bytes: int) -> list[ImageInput]:
    """The input tensor's images: base64 strings in its ``data``, or raw files in ``blob`` (the
    binary data after the JSON header) when it names a ``binary_data_size``."""
    size = parameters(tensor, "the input's").get("binary_data_size")
    if size is None:
        if blob:
            raise BadRequest("binary data follows the JSON header, but the input names no binary_data_size")
        data = _json_elements(tensor, max_images)
        return [ImageInput(f"{tensor['name']}[{i}]", decode_base64(v, max_bytes)) for i, v in enumerate(data)]
    if not isinstance(size, int) or isinstance(size, bool) or size != len(blob):
        raise BadRequest(
            f"the input's binary_data_size {size!r} is not the {len(blob)} bytes after the JSON header"
        )
    elements = unpack_bytes(blob, max_images, max_bytes)
    _check_shape(tensor["shape"], len(elements))
    if not elements:
        raise BadRequest("the input tensor has no images")
    return [ImageInput(f"{tensor['name']}[{i}]", data) for i, data in enumerate(elements)]


def _check_shape(shape: list[int], count: int) -> None:
    if shape not in ([count], [count, 1]):
        raise BadRequest(f"input shape {shape} does not match its {count} elements")


def _json_elements(tensor: dict[str, Any], max_images: int) -> list[Any]:
    data = tensor["data"]
    if isinstance(data, list) and all(isinstance(row, list) and len(row) == 1 for row in data):
        data = [row[0] for row in data]  # shape [N, 1]
    if not isinstance(data, list) or not data:
        raise BadRequest("input 'data' must be a non-empty list of base64 strings")
    _check_shape(tensor["shape"], len(data))
    if len(data) > max_images:
        raise BadRequest(
            f"{len(data)} images in one request; the limit is {max_images}", code="too_many_images"
        )
    return data


def outputs(body: dict[str, Any]) -> list[tuple[str, bool]]:
    """The outputs asked for (``$request_output`` objects; all of them when none are named), each
    with whether it is answered as binary data."""
    every = bool(parameters(body, "the request's").get("binary_data_output", False))
    requested = body.get("outputs")
    if requested is None:
        return [(name, every) for name in OUTPUTS]
    if not isinstance(requested, list):
        raise BadRequest("'outputs' must be a list of objects with a 'name'")
    chosen = []
    for entry in requested:
        output = object_field(entry, "each of 'outputs'")
        if not isinstance(output.get("name"), str):
            raise BadRequest("each of 'outputs' needs a 'name' (a string)")
        binary = parameters(output, "an output's").get("binary_data", every)
        chosen.append((output["name"], bool(binary)))
    unknown = [name for name, _ in chosen if name not in OUTPUTS]
    if unknown:
        raise BadRequest(f"unknown outputs {unknown}; available: {', '.join(OUTPUTS)}")
    return chosen or [(name, every) for name in OUTPUTS]


def refinement(parameters: dict[str, Any]) -> Refinement:
    """The request parameters ``parents`` (bool), ``confidence`` and ``min_score`` (numbers),
    ``include`` and ``exclude`` (comma-separated strings), as ``fleet.refine`` reads them."""

    def number(name: str) -> float | None:
        value = parameters.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise BadRequest(f"parameter {name} must be a number")
        return float(value)

    def names(name: str) -> tuple[str, ...]:
        value = parameters.get(name, "")
        if not isinstance(value, str):
            raise BadRequest(f"parameter {name} must be a comma-separated string")
        return tuple(e.strip() for e in value.split(",") if e.strip())

    parents = parameters.get("parents", False)
    if not isinstance(parents, bool):
        raise BadRequest("parameter parents must be a boolean")
    return Refinement(
        parents=parents,
        min_score=number("min_score") or 0.0,
        include=names("include"),
        exclude=names("exclude"),
        confidence=number("confidence"),
    )
