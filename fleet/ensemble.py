"""Merging member answers: soft (mean probability), weighted (weighted mean), hard (majority)."""

from __future__ import annotations

import numpy as np

from common.errors import BadRequest
from common.labels import Labels

VOTES = ("soft", "hard", "weighted")


def parse_member_weights(raw: str, members: list[str]) -> dict[str, float]:
    """``"resnet50:2,vgg16:1"`` -> weights for every member (unlisted members weigh 1)."""
    weights = dict.fromkeys(members, 1.0)
    for item in filter(None, (part.strip() for part in raw.split(","))):
        name, sep, value = item.partition(":")
        if not sep or name not in weights:
            raise BadRequest(
                f"member_weights entry {item!r} must be <member>:<weight> with a member "
                f"of this ensemble ({', '.join(members)})"
            )
        try:
            weights[name] = float(value)
        except ValueError:
            raise BadRequest(f"member_weights: {value!r} is not a number") from None
        if not np.isfinite(weights[name]) or weights[name] < 0:
            raise BadRequest(f"member_weights: {name} needs a finite weight >= 0")
    if sum(weights.values()) <= 0:
        raise BadRequest("member_weights: at least one weight must be positive")
    return weights


def merge(
    vote: str, probabilities: list[np.ndarray], weights: list[float], labels: Labels, top_k: int
) -> list[dict[str, object]]:
    """Merged top-k predictions of one image from each member's full probability vector."""
    stacked = np.stack(probabilities).astype(np.float64)
    w = np.asarray(weights if vote != "soft" else [1.0] * len(probabilities), np.float64)
    mean = (w[:, None] * stacked).sum(axis=0) / w.sum()
    if vote in ("soft", "weighted"):
        return labels.top_k(mean, top_k)
    votes = np.zeros(stacked.shape[1])
    np.add.at(votes, stacked.argmax(axis=1), w)
    # Most votes first; ties broken by the mean probability, then by the lower index.
    order = np.lexsort((np.arange(len(votes)), -mean, -votes))[: min(top_k, len(votes))]
    return [
        {
            "label": labels.names[i],
            "class_id": labels.class_ids[i],
            "index": int(i),
            "score": float(votes[i] / w.sum()),
            "votes": float(votes[i]),
            "mean_probability": float(mean[i]),
        }
        for i in order
    ]
