"""How the v1 routes answer: what a prediction says about what answered, and the seed routes' shape.

A single model's answer carries its weights, hash, backend, precision, version and - for a custom
model - its base; an ensemble's names its members, the vote and what failed. The per-image
predictions come from the core (``fleet.predict``, typed in ``common.outcomes``) and are placed here.
"""

from __future__ import annotations

from typing import Any

from common.outcomes import Failed, Outcome, Predicted, Prediction, error_json

SERVED = ("weights", "weights_hash", "backend", "precision")


def head(prediction: Prediction) -> dict[str, Any]:
    """What answered: the one model's serving fields, or the ensemble's members and vote."""
    selection, served = prediction.selection, prediction.served
    if selection.vote is None:
        one = served.get(selection.name)
        found: dict[str, Any] = {field: getattr(one, field) if one else None for field in SERVED}
        if one and one.version:
            found["version"] = one.version
        if one and one.base:  # a custom model: the model it was trained on (and how deep)
            found["base"] = one.base
            if one.fine_tune_layers:
                found["fine_tune_layers"] = one.fine_tune_layers
        return found

    def each(field: str) -> dict[str, Any]:
        return {m: getattr(served[m], field) if m in served else None for m in selection.members}

    found = {
        "members": list(selection.members),
        "vote": selection.vote,
        "weights": each("weights"),
        "precision": each("precision"),
    }
    if selection.vote != "soft":
        found["member_weights"] = selection.weights
    found["degraded"] = prediction.degraded
    found["failed_members"] = [
        {"model": m, "code": e.code, "reason": e.message} for m, e in prediction.failures.items()
    ]
    return found


def predictions(body: dict[str, Any], outcomes: tuple[Outcome, ...], batch: bool) -> dict[str, Any]:
    """``POST /v1/predict``'s answer: a batch's ``results``, or the one image's predictions inline
    (its error raised), timings last."""
    if batch:
        body["results"] = [outcome.to_json() for outcome in outcomes]
    elif isinstance(outcomes[0], Failed):
        raise outcomes[0].error
    else:
        body.update(outcomes[0].answer())
    body["timing_ms"] = body.pop("timing_ms")
    return body


def seed(outcome: Outcome) -> list[dict[str, Any]]:
    """The seed article's shape: ``label`` and ``prob`` per prediction (its error raised)."""
    if isinstance(outcome, Failed):
        raise outcome.error
    return [{"label": label.label, "prob": label.score} for label in outcome.labels]


def seed_batch(outcomes: tuple[Outcome, ...]) -> dict[str, Any]:
    """The seed batch route's shape: one entry per file, in order, an error in its place."""
    return {
        "results": [
            {"filename": o.name, "predictions": seed(o)}
            if isinstance(o, Predicted)
            else {"filename": o.name, "error": error_json(o.error)}
            for o in outcomes
        ]
    }
