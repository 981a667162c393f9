"""Reading an Open Inference Protocol v2 infer request: every field the fleet uses, checked against
the protocol's ``inference_request`` schema (kserve/open-inference-protocol, open_inference_rest.yaml),
so a malformed tensor is a 400 naming what is wrong, never a 500.
"""

from __future__ import annotations

from typing import Any

from common.errors import BadRequest
from fleet.predict import ImageInput
from gateway.inputs import decode_base64

OUTPUTS = {"labels": "BYTES", "scores": "FP32", "indices": "INT64"}
TENSOR_FIELDS = ("name", "datatype", "shape", "data")


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
    missing = [field for field in TENSOR_FIELDS if field not in tensor]
    if missing:
        raise BadRequest(f"the input tensor has no {', '.join(missing)}; it needs {', '.join(TENSOR_FIELDS)}")
    if not isinstance(tensor["name"], str):
        raise BadRequest("the input's 'name' must be a string")
    if tensor["datatype"] != "BYTES":
        raise BadRequest("the input must be a BYTES tensor of base64-encoded image files")
    shape = tensor["shape"]
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise BadRequest("the input's 'shape' must be a list of non-negative integers")
    parameters(tensor, "the input's")
    return tensor


def images(tensor: dict[str, Any], max_images: int, max_bytes: int) -> list[ImageInput]:
    data = tensor["data"]
    if isinstance(data, list) and all(isinstance(row, list) and len(row) == 1 for row in data):
        data = [row[0] for row in data]  # shape [N, 1]
    if not isinstance(data, list) or not data:
        raise BadRequest("input 'data' must be a non-empty list of base64 strings")
    shape = tensor["shape"]
    if shape not in ([len(data)], [len(data), 1]):
        raise BadRequest(f"input shape {shape} does not match its {len(data)} elements")
    if len(data) > max_images:
        raise BadRequest(
            f"{len(data)} images in one request; the limit is {max_images}", code="too_many_images"
        )
    return [ImageInput(f"{tensor['name']}[{i}]", decode_base64(v, max_bytes)) for i, v in enumerate(data)]


def outputs(body: dict[str, Any]) -> list[str]:
    """The outputs asked for (``$request_output`` objects), all of them when none are named."""
    requested = body.get("outputs")
    if requested is None:
        return list(OUTPUTS)
    if not isinstance(requested, list):
        raise BadRequest("'outputs' must be a list of objects with a 'name'")
    names = []
    for entry in requested:
        output = object_field(entry, "each of 'outputs'")
        if not isinstance(output.get("name"), str):
            raise BadRequest("each of 'outputs' needs a 'name' (a string)")
        parameters(output, "an output's")
        names.append(output["name"])
    unknown = [n for n in names if n not in OUTPUTS]
    if unknown:
        raise BadRequest(f"unknown outputs {unknown}; available: {', '.join(OUTPUTS)}")
    return names or list(OUTPUTS)
