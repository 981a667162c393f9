"""Strict reading of a model service's answer: its verdict on the request, or well-formed results.

Nothing a member sends is trusted: a body that is not the documented shape - not JSON, the wrong
number of results, a NaN or out-of-range score - is a ``BadUpstreamResponse`` (502), never passed on.
"""

from __future__ import annotations

import math
from typing import Any

import requests

from common.errors import BadUpstreamResponse, ServiceError
from common.wire import whole_number


def error_code(response: requests.Response) -> str:
    """The ``error.code`` of a JSON error body; empty when there is none."""
    try:
        return str(response.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return ""


def retry_after(response: requests.Response, fallback: int = 1) -> int:
    """The whole seconds of the ``Retry-After`` header; ``fallback`` when absent or not a number."""
    seconds = whole_number(response.headers.get("Retry-After", ""))
    return fallback if seconds is None else seconds


def _valid_prediction(prediction: object) -> bool:
    if not isinstance(prediction, dict):
        return False
    score, index = prediction.get("score"), prediction.get("index")
    return (
        isinstance(score, int | float)
        and math.isfinite(score)
        and -1e-6 <= score <= 1 + 1e-6
        and isinstance(index, int)
        and isinstance(prediction.get("label"), str)
    )


def _valid_result(result: object) -> bool:
    """A member's per-image result: an error, or finite, well-formed predictions (never NaN)."""
    if not isinstance(result, dict):
        return False
    if "error" in result:
        return isinstance(result["error"], dict)
    predictions = result.get("predictions")
    return isinstance(predictions, list) and bool(predictions) and all(map(_valid_prediction, predictions))


def parse(model: str, response: requests.Response, count: int) -> dict[str, Any]:
    """The member's answer for ``count`` images, with ``results`` in image order.

    Raises:
        ServiceError: the member's own 4xx verdict on the request, passed on as it is.
        BadUpstreamResponse: anything else that is not a 200 with ``count`` well-formed results.
    """
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise BadUpstreamResponse(f"{model} answered {response.status_code} without a JSON object")
    if 400 <= response.status_code < 500 and isinstance(body.get("error"), dict):
        error = body["error"]  # the member judged the request itself: pass its verdict on
        raise ServiceError(
            str(error.get("message", "rejected")),
            status=response.status_code,
            code=str(error.get("code", "bad_request")),
        )
    if count == 1 and "results" not in body and "predictions" in body:  # a raw-body answer
        body["results"] = [
            {"index": 0, **{k: body[k] for k in ("predictions", "probabilities", "features") if k in body}}
        ]
    results = body.get("results")
    if response.status_code != 200 or not isinstance(results, list) or len(results) != count:
        raise BadUpstreamResponse(f"{model} answered {response.status_code} with an unexpected body")
    if not all(_valid_result(result) for result in results):
        raise BadUpstreamResponse(f"{model} answered with malformed predictions")
    return body
