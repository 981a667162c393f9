"""Answers people can use, on request: each label's parents and broad categories, filters, and the
answer as specific as the model is sure (``common.hierarchy``).

A ``Refinement`` is what the client asked for; ``refine`` rewrites one image's ``Predicted`` from
the full probability distribution (a single model's, or an ensemble's merged one). ImageNet
classes have the WordNet hierarchy; a custom model's classes are flat: its answers filter by class
id or name and say, in ``hierarchy``, why they carry no parents and no hedged answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import numpy as np

from common import hierarchy
from common.errors import BadRequest
from common.labels import Labels
from common.outcomes import Label, Predicted

MAX_FILTERS = 32  # ids (or category names) in include and in exclude, each
_FILTER = re.compile(r"^[A-Za-z0-9 _.,:'-]{1,100}$")


@dataclass(frozen=True)
class Refinement:
    """What a client asked of an answer beyond the flat top-k.

    ``parents``: each label's ancestors (nearest first, each with its probability) and categories.
    ``min_score``: labels below it are left out. ``include`` / ``exclude``: class ids, ancestor
    ids (e.g. ``n00015388``, animal) or category names (``animal``): the top-k is taken among the
    classes under an included node and under no excluded one. ``confidence``: the hedged answer,
    the most specific node whose probability meets it.
    """

    parents: bool = False
    min_score: float = 0.0
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    confidence: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_score <= 1.0:
            raise BadRequest(f"min_score must be between 0 and 1, got {self.min_score}")
        if self.confidence is not None and not 0.0 < self.confidence <= 1.0:
            raise BadRequest(f"confidence must be above 0 and at most 1, got {self.confidence}")
        for name, found in (("include", self.include), ("exclude", self.exclude)):
            if len(found) > MAX_FILTERS:
                raise BadRequest(f"{name}: at most {MAX_FILTERS} classes or categories, got {len(found)}")
            bad = next((f for f in found if not _FILTER.match(f)), None)
            if bad is not None:
                raise BadRequest(f"{name}: {bad[:40]!r} is not a class id, class name or category")

    @property
    def asked(self) -> bool:
        return self != PLAIN

    @property
    def needs_distribution(self) -> bool:
        """Parents' probabilities, filters and hedging read the full distribution."""
        return self.parents or bool(self.include or self.exclude) or self.confidence is not None

    def check_vote(self, vote: str | None) -> None:
        """A hard vote ranks by votes, not probability: filters and hedging do not apply to it."""
        if vote == "hard" and (self.include or self.exclude or self.confidence is not None):
            raise BadRequest("include, exclude and confidence need a soft or weighted vote, not vote=hard")


PLAIN = Refinement()
"""The flat top-k, as asked for nothing more."""


def imagenet_labels() -> Labels:
    """ImageNet's classes, as the shipped index and the hierarchy have them."""
    return hierarchy.imagenet().labels


def is_imagenet(labels: Labels) -> bool:
    return labels.digest == imagenet_labels().digest


def refine(
    predicted: Predicted,
    distribution: np.ndarray | None,
    labels: Labels | None,
    refinement: Refinement,
    top_k: int,
    *,
    ranked: bool = True,
    model: str = "",
) -> Predicted:
    """``predicted`` with what ``refinement`` asks: re-ranked from ``distribution`` where given and
    ``ranked`` (False: a hard vote's labels, which keep their order), filtered, with parents and the
    hedged answer where the classes are ImageNet's. ``labels``: the classes ``distribution`` ranks.

    Raises:
        BadRequest: an include or exclude entry that names nothing in these classes.
    """
    graph = hierarchy.imagenet() if labels is not None and is_imagenet(labels) else None
    found = list(predicted.labels)
    if distribution is not None and labels is not None and ranked:
        keep = _allowed(graph, labels, refinement)
        masked = np.where(keep, distribution, -1.0)
        order = np.argsort(-masked, kind="stable")[: min(top_k, int(keep.sum()))]
        found = [Label(labels.names[i], int(i), float(distribution[i]), labels.class_ids[i]) for i in order]
    found = [label for label in found if label.score >= refinement.min_score]
    if graph is None:
        flat = None
        if refinement.parents or refinement.confidence is not None:
            flat = f"{model or 'this model'} has flat classes of its own: no parents, no hedged answer"
        return replace(predicted, labels=tuple(found), flat=flat)
    if refinement.parents:
        found = [
            replace(
                label,
                parents=graph.ancestors(label.index, distribution),
                categories=graph.categories(label.index),
            )
            for label in found
        ]
    hedged = None
    if refinement.confidence is not None and distribution is not None:
        hedged = graph.hedge(distribution, refinement.confidence)
    return replace(predicted, labels=tuple(found), hedged=hedged)


def _allowed(graph: hierarchy.Hierarchy | None, labels: Labels, refinement: Refinement) -> np.ndarray:
    """Which classes the filters let through (all when there are none)."""
    if graph is not None:
        include = _synsets(graph, labels, refinement.include, "include")
        exclude = _synsets(graph, labels, refinement.exclude, "exclude")
        return graph.allowed(include, exclude)
    known = {name: i for i, name in enumerate(labels.names)} | {c: i for i, c in enumerate(labels.class_ids)}
    keep = np.ones(len(labels), bool)
    for name, entries in (("include", refinement.include), ("exclude", refinement.exclude)):
        unknown = next((e for e in entries if e not in known), None)
        if unknown is not None:
            raise BadRequest(
                f"{name}: {unknown[:40]!r} is none of this model's classes", code="unknown_class"
            )
    if refinement.include:
        keep[:] = False
        keep[[known[e] for e in refinement.include]] = True
    if refinement.exclude:
        keep[[known[e] for e in refinement.exclude]] = False
    return keep


def _synsets(graph: hierarchy.Hierarchy, labels: Labels, entries: tuple[str, ...], name: str) -> list[str]:
    """Synset ids for filter entries: ids of the graph, category names, or class names."""
    by_name = {label: labels.class_ids[i] for i, label in enumerate(labels.names)}
    found: list[str] = []
    for entry in entries:
        if graph.known(entry):
            found.append(entry)
        elif entry in hierarchy.CATEGORIES:
            found.extend(hierarchy.CATEGORIES[entry])
        elif entry in by_name:
            found.append(by_name[entry])
        else:
            raise BadRequest(
                f"{name}: {entry[:40]!r} is no ImageNet class, ancestor (WordNet id) or category "
                f"({', '.join(hierarchy.CATEGORIES)})",
                code="unknown_class",
            )
    return found
