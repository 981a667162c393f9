"""Vote arithmetic: soft, weighted and hard, with their tie-breaks."""

from __future__ import annotations

import numpy as np
import pytest

from common.labels import Labels
from fleet.ensemble import merge

LABELS = Labels(class_ids=("a", "b", "c", "d"), names=("ant", "bee", "cat", "dog"))


def vec(*values: float) -> np.ndarray:
    return np.array(values, np.float32)


def test_soft_vote_averages_probabilities() -> None:
    merged = merge("soft", [vec(0.6, 0.4, 0, 0), vec(0.0, 0.9, 0.1, 0)], [5.0, 1.0], LABELS, 2)
    assert [p.label for p in merged] == ["bee", "ant"]  # weights are ignored by soft
    assert [p.score for p in merged] == pytest.approx([0.65, 0.30])


def test_weighted_vote_uses_member_weights() -> None:
    members = [vec(0.6, 0.4, 0, 0), vec(0.0, 0.9, 0.1, 0)]
    merged = merge("weighted", members, [5.0, 1.0], LABELS, 2)
    assert [p.label for p in merged] == ["ant", "bee"]  # soft would rank bee first
    assert [p.score for p in merged] == pytest.approx([0.5, (2.0 + 0.9) / 6])


def test_hard_vote_counts_top1_and_breaks_ties_by_mean_probability() -> None:
    members = [vec(0.5, 0.4, 0.1, 0), vec(0.1, 0.2, 0.7, 0), vec(0.45, 0.5, 0.05, 0)]
    merged = merge("hard", members, [1, 1, 1], LABELS, 4)
    # ant, cat, bee each get one vote; ties go to the higher mean probability (bee 0.367 first).
    assert [p.label for p in merged] == ["bee", "ant", "cat", "dog"]
    assert [p.votes for p in merged] == [1, 1, 1, 0]
    assert merged[0].score == pytest.approx(1 / 3)


def test_hard_vote_majority_wins() -> None:
    members = [vec(0.9, 0.1, 0, 0), vec(0.9, 0.1, 0, 0), vec(0.0, 0.0, 0.0, 1.0)]
    merged = merge("hard", members, [1, 1, 1], LABELS, 2)
    assert merged[0].label == "ant" and merged[0].score == pytest.approx(2 / 3)
