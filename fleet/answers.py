"""Strict reading of a model service's answer: its verdict on the request, or well-formed results,
read into a ``MemberReply``.

Nothing a member sends is trusted: a body that is not the documented shape - not JSON, the wrong
number of results, a NaN or out-of-range score, an undecodable vector - is a
``BadUpstreamResponse`` (502), never passed on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import requests

from common import wire
from common.errors import BadUpstreamResponse, ServiceError
from common.outcomes import Label, Served, error_from_json, labels_from_json
from common.wire import whole_number


@dataclass(frozen=True)
class MemberResult:
    """One image's result in a member's answer: its labels, or the member's error for it; and the
    vectors asked for (``probabilities=true``, ``features=true``)."""

    labels: tuple[Label, ...] | None = None
    error: ServiceError | None = None
    probabilities: np.ndarray | None = None
    features: np.ndarray | None = None

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> MemberResult:
        if "error" in raw:
            return cls(error=error_from_json(raw["error"]))
        vectors = {
            name: wire.decode_vector(raw[name]) if name in raw else None
            for name in ("probabilities", "features")
        }
        return cls(labels_from_json(raw["predictions"]), None, vectors["probabilities"], vectors["features"])


@dataclass(frozen=True)
class MemberReply:
    """A member's answer to one call: what served it, a result per image in order, its timings."""

    served: Served
    results: tuple[MemberResult, ...]
    labels_hash: str | None = None
    timing_ms: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> MemberReply:
        """A member's body (``results``, or a single image's fields at the top), read as it is."""
        results = body.get("results")
        if results is None and "predictions" in body:  # a raw-body answer: one image, inline
            results = [
                {k: body[k] for k in ("predictions", "probabilities", "features", "error") if k in body}
            ]
        timing = body.get("timing_ms") or {}
        return cls(
            Served.from_reply(body),
            tuple(MemberResult.from_json(result) for result in results or ()),
            None if body.get("labels_hash") is None else str(body["labels_hash"]),
            {str(k): float(v) for k, v in timing.items() if isinstance(v, int | float)},
        )


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


def _body(model: str, response: requests.Response) -> dict[str, Any]:
    """A member's JSON object; its own 4xx verdict on the request raised as it is, a body that is
    not a JSON object a ``BadUpstreamResponse``."""
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
    return body


def parse(model: str, response: requests.Response, count: int) -> MemberReply:
    """The member's answer for ``count`` images, with ``results`` in image order.

    Raises:
        ServiceError: the member's own 4xx verdict on the request, passed on as it is.
        BadUpstreamResponse: anything else that is not a 200 with ``count`` well-formed results.
    """
    body = _body(model, response)
    if count == 1 and "results" not in body and "predictions" in body:  # a raw-body answer
        body["results"] = [
            {"index": 0, **{k: body[k] for k in ("predictions", "probabilities", "features") if k in body}}
        ]
    results = body.get("results")
    if response.status_code != 200 or not isinstance(results, list) or len(results) != count:
        raise BadUpstreamResponse(f"{model} answered {response.status_code} with an unexpected body")
    if not all(_valid_result(result) for result in results):
        raise BadUpstreamResponse(f"{model} answered with malformed predictions")
    try:
        return MemberReply.from_json(body)
    except (KeyError, TypeError, ValueError):
        raise BadUpstreamResponse(f"{model} answered with an unreadable vector or field") from None


def explanation(model: str, response: requests.Response) -> dict[str, Any]:
    """A member's explanation (``POST /v1/explain``): its 4xx verdict raised as it is, else a 200
    with a class, a square grid of finite score drops and the passes it cost; anything else is a
    ``BadUpstreamResponse``."""
    body = _body(model, response)
    grid, drops, chosen = body.get("grid"), body.get("drops"), body.get("class")
    well_formed = (
        response.status_code == 200
        and isinstance(grid, int)
        and isinstance(body.get("passes"), int)
        and isinstance(chosen, dict)
        and isinstance(chosen.get("index"), int)
        and isinstance(drops, list)
        and len(drops) == grid
        and all(
            isinstance(row, list)
            and len(row) == grid
            and all(isinstance(v, int | float) and math.isfinite(v) for v in row)
            for row in drops
        )
    )
    if not well_formed:
        raise BadUpstreamResponse(f"{model} answered {response.status_code} with a malformed explanation")
    return body
