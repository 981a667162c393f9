"""How the v1 routes answer: what a prediction says about what answered, and the seed routes' shape.

A single model's answer carries its weights, hash, backend, precision, version and - for a custom
model - its base; an ensemble's names its members, the vote and what failed. The per-image
predictions come from the fleet (``fleet.predict``) and are placed here.
"""

from __future__ import annotations

from typing import Any

from fleet.predict import Selection, item_error

SERVED = ("weights", "weights_hash", "backend", "precision")


def head(selection: Selection, result: dict[str, Any]) -> dict[str, Any]:
    """What answered: the one model's serving fields, or the ensemble's members and vote."""
    replies = result["replies"]
    if selection.vote is None:
        reply = replies.get(selection.name, {})
        found = {field: reply.get(field) for field in SERVED}
        if reply.get("version"):
            found["version"] = reply["version"]
        if reply.get("base"):  # a custom model: the model it was trained on (and how deep)
            found["base"] = reply["base"]
            if reply.get("fine_tune_layers"):
                found["fine_tune_layers"] = reply["fine_tune_layers"]
        return found

    def each(field: str) -> dict[str, Any]:
        return {m: replies[m].get(field) if m in replies else None for m in selection.members}

    found = {
        "members": list(selection.members),
        "vote": selection.vote,
        "weights": each("weights"),
        "precision": each("precision"),
    }
    if selection.vote != "soft":
        found["member_weights"] = selection.weights
    found["degraded"] = bool(result["failures"])
    found["failed_members"] = [
        {"model": m, "code": e.code, "reason": e.message} for m, e in result["failures"].items()
    ]
    return found


def predictions(body: dict[str, Any], outcomes: list[dict[str, Any]], batch: bool) -> dict[str, Any]:
    """``POST /v1/predict``'s answer: a batch's ``results``, or the one image's predictions inline
    (its error raised), timings last."""
    if batch:
        body["results"] = outcomes
    elif "error" in outcomes[0]:
        raise item_error(outcomes[0])
    else:
        body.update({k: v for k, v in outcomes[0].items() if k not in ("index", "name")})
    body["timing_ms"] = body.pop("timing_ms")
    return body


def seed(outcome: dict[str, Any]) -> list[dict[str, Any]]:
    """The seed article's shape: ``label`` and ``prob`` per prediction."""
    return [{"label": p["label"], "prob": p["score"]} for p in outcome["predictions"]]


def seed_batch(outcomes: list[dict[str, Any]]) -> dict[str, Any]:
    """The seed batch route's shape: one entry per file, in order, an error in its place."""
    return {
        "results": [
            {"filename": o["name"], "predictions": seed(o)}
            if "predictions" in o
            else {"filename": o["name"], "error": o["error"]}
            for o in outcomes
        ]
    }
