"""The ImageNet label hierarchy: each class's ancestors, broad categories, node probabilities and
answers as specific as the model is sure.

The graph is WordNet 3.0's hypernyms over the 1,000 classes (``common/wordnet.py`` derives it into
``common/data/imagenet_hierarchy.json``). A node's probability is the sum of the probabilities of
the classes under it, each class counted once however many paths lead to it (WordNet gives some
synsets several hypernyms: "dog" is both a canine and a domestic animal).

Hedging follows Deng, Krause, Berg and Fei-Fei, "Hedging Your Bets: Optimizing
Accuracy-Specificity Trade-offs in Large Scale Visual Recognition" (CVPR 2012), in its simple
threshold form: the answer is the most informative node whose probability meets the requested
confidence, informative as their reward measures it, the information gain
``log2(classes) - log2(classes under the node)``; ties go to the more probable node, then the
deeper one (a class before the parents that hold only it: "fox squirrel", not "tree squirrel"). The root
(``entity``, probability 1) always qualifies, so there is always an answer. Their DARTS, which
picks the threshold that guarantees an accuracy on held-out data, needs a calibration set scored
with real weights: not done here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from functools import cache, cached_property
from pathlib import Path

import numpy as np

from common.labels import IMAGENET_INDEX, Labels, load
from common.outcomes import Hedged, Node

HIERARCHY = Path(__file__).parent / "data" / "imagenet_hierarchy.json"

CATEGORIES: dict[str, tuple[str, ...]] = {
    "animal": ("n00015388",),
    "plant": ("n00017222",),
    "fungus": ("n12992868",),
    "food": ("n00021265", "n07555863"),  # "food, nutrient" and "food, solid food": two synsets
    "person": ("n00007846",),
    "vehicle": ("n04524313",),
    "device": ("n03183080",),
    "structure": ("n04341686",),
    "container": ("n03094503",),
    "clothing": ("n03051540",),
    "furniture": ("n03405725",),
    "equipment": ("n03294048",),
    "natural object": ("n00019128",),
    "geological formation": ("n09287968",),
}
"""Broad categories, each the synsets (WordNet 3.0) whose descendants belong to it. A class may
be in several (a dog is an animal; a car a vehicle and a container, as WordNet has it) or none."""


class Hierarchy:
    """The graph over one label set's classes (ImageNet's, in its index order)."""

    def __init__(self, nodes: dict[str, tuple[str, tuple[str, ...]]], labels: Labels) -> None:
        """``nodes``: synset -> (name, hypernym synsets); every class of ``labels`` among them."""
        missing = [c for c in labels.class_ids if c not in nodes]
        if missing:
            raise ValueError(f"{len(missing)} classes are not in the graph, e.g. {missing[0]}")
        self.labels = labels
        self.ids = tuple(sorted(nodes))
        self.position = {synset: i for i, synset in enumerate(self.ids)}
        self.nodes = {synset: Node(synset, name) for synset, (name, _) in nodes.items()}
        self.parents = {synset: parents for synset, (_, parents) in nodes.items()}
        self._ancestors = {synset: self._nearest_first(synset) for synset in self.ids}
        # under[node, class]: the class is the node or below it (once, whatever the paths)
        self.under = np.zeros((len(self.ids), len(labels)), bool)
        for index, class_id in enumerate(labels.class_ids):
            for synset in (class_id, *self._ancestors[class_id]):
                self.under[self.position[synset], index] = True
        # the same as runs of class indices, one run per node, for exact float64 sums
        self._members = np.nonzero(self.under)[1]
        self.counts = self.under.sum(axis=1)
        self._starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
        self.depth = np.array([len(self._ancestors[s]) for s in self.ids])
        self.bits = np.log2(len(labels)) - np.log2(self.counts.astype(np.float64))
        self._categories = {
            index: tuple(
                name
                for name, synsets in CATEGORIES.items()
                if any(s == class_id or s in self._ancestors[class_id] for s in synsets)
            )
            for index, class_id in enumerate(labels.class_ids)
        }

    def _nearest_first(self, synset: str) -> tuple[str, ...]:
        """Every ancestor once, nearest first: by the longest path up from ``synset`` (so each
        comes after everything below it, whichever path, and ``entity`` last), WordNet's order
        among equals."""
        distance: dict[str, int] = {}
        frontier, step = list(self.parents[synset]), 1
        while frontier:
            following: list[str] = []
            for parent in frontier:
                distance[parent] = step  # a longer path overrides a shorter one
                following.extend(self.parents[parent])
            frontier, step = following, step + 1
        order = {s: i for i, s in enumerate(distance)}
        return tuple(sorted(distance, key=lambda s: (distance[s], order[s])))

    def known(self, synset: str) -> bool:
        return synset in self.nodes

    def ancestors(self, index: int, probabilities: np.ndarray | None = None) -> tuple[Node, ...]:
        """Class ``index``'s ancestors, nearest first, up to ``entity``; each with its probability
        when the distribution is given."""
        found = self._ancestors[self.labels.class_ids[index]]
        if probabilities is None:
            return tuple(self.nodes[s] for s in found)
        scores = self.node_probabilities(probabilities)
        return tuple(Node(s, self.nodes[s].name, float(scores[self.position[s]])) for s in found)

    def categories(self, index: int) -> tuple[str, ...]:
        """The broad categories (``CATEGORIES``) class ``index`` is in."""
        return self._categories[index]

    def node_probabilities(self, probabilities: np.ndarray) -> np.ndarray:
        """Every node's probability (``self.ids`` order): the sum over the classes under it, in
        float64 (~0.1 ms for ImageNet's 1,860 nodes)."""
        return np.add.reduceat(probabilities.astype(np.float64)[self._members], self._starts)

    def hedge(self, probabilities: np.ndarray, confidence: float) -> Hedged:
        """The most informative node whose probability is at least ``confidence`` (see module)."""
        scores = self.node_probabilities(probabilities)
        # a distribution's sum falls a little short of 1 at the root: it qualifies all the same
        eligible = scores >= min(confidence, float(scores[self.position[self.root]]))
        # most bits first, then most probable, then the deepest (a class before its one-class parents)
        order = np.lexsort((-self.depth, -scores, -self.bits))
        best = int(next(i for i in order if eligible[i]))
        node = self.nodes[self.ids[best]]
        scored = Node(node.class_id, node.name, float(scores[best]))
        return Hedged(scored, int(self.counts[best]), float(self.bits[best]), confidence)

    @cached_property
    def root(self) -> str:
        """The one synset without a hypernym (``entity``)."""
        return next(s for s in self.ids if not self.parents[s])

    def allowed(self, include: Iterable[str], exclude: Iterable[str]) -> np.ndarray:
        """Which classes pass: under any ``include`` synset (all when none given) and under no
        ``exclude`` one. Raises KeyError naming a synset the graph does not have."""
        include, exclude = list(include), list(exclude)
        for synset in (*include, *exclude):
            if synset not in self.position:
                raise KeyError(synset)
        keep: np.ndarray = np.ones(len(self.labels), bool)
        if include:
            keep = np.asarray(self.under[[self.position[s] for s in include]].any(axis=0))
        if exclude:
            keep &= ~self.under[[self.position[s] for s in exclude]].any(axis=0)
        return keep


def from_file(path: Path = HIERARCHY, labels: Labels | None = None) -> Hierarchy:
    raw = json.loads(path.read_text(encoding="utf-8"))["nodes"]
    nodes = {synset: (node["words"][0], tuple(node["parents"])) for synset, node in raw.items()}
    return Hierarchy(nodes, labels or load(IMAGENET_INDEX))


@cache
def imagenet() -> Hierarchy:
    """The shipped graph over ImageNet's classes (read once per process, ~50 ms)."""
    return from_file()
