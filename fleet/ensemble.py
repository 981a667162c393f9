"""Merging member answers: soft (mean probability), weighted (weighted mean), hard (majority)."""

from __future__ import annotations

import numpy as np

from common.labels import Labels
from common.outcomes import Label

VOTES = ("soft", "hard", "weighted")


def distribution(vote: str, probabilities: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """The merged distribution: the members' mean (``soft``), or their weighted mean (``weighted``,
    and ``hard``'s tie-breaker)."""
    stacked = np.stack(probabilities).astype(np.float64)
    w = np.asarray(weights if vote != "soft" else [1.0] * len(probabilities), np.float64)
    return (w[:, None] * stacked).sum(axis=0) / w.sum()


def merge(
    vote: str, probabilities: list[np.ndarray], weights: list[float], labels: Labels, top_k: int
) -> list[Label]:
    """Merged top-k predictions of one image from each member's full probability vector."""
    stacked = np.stack(probabilities).astype(np.float64)
    w = np.asarray(weights if vote != "soft" else [1.0] * len(probabilities), np.float64)
    mean = distribution(vote, probabilities, weights)
    if vote in ("soft", "weighted"):
        return labels.top_k(mean, top_k)
    votes = np.zeros(stacked.shape[1])
    np.add.at(votes, stacked.argmax(axis=1), w)
    # Most votes first; ties broken by the mean probability, then by the lower index.
    order = np.lexsort((np.arange(len(votes)), -mean, -votes))[: min(top_k, len(votes))]
    return [
        Label(
            labels.names[i],
            int(i),
            float(votes[i] / w.sum()),
            labels.class_ids[i],
            votes=float(votes[i]),
            mean_probability=float(mean[i]),
        )
        for i in order
    ]
