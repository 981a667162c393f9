"""The prediction path's typed values: what answered a request, and each image's outcome.

Every room that carries a prediction - the fleet library, the gateway's protocols, the job workers
and the job results on disk - passes these, and writes and reads their JSON in one place each:

- ``Selection``: which models answer (one, or an ensemble with its vote and weights). A protocol
  builds it from its own input (``gateway.selection``); a job record stores it as JSON.
- ``Label``: one ranked answer (``label``, ``class_id``, ``index``, ``score``).
- ``Predicted`` / ``Failed``: one image's outcome, its labels or the error it met (code, message,
  HTTP status), by its index and name in the request.
- ``Served``: what a member said about itself (weights, their hash, backend, precision, version,
  and for a custom model its base).
- ``Prediction``: the answer to one call of ``fleet.predict.Predictor.predict``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from common.errors import ServiceError


@dataclass(frozen=True)
class Selection:
    """Which models answer: one (``vote`` is None) or an ensemble."""

    name: str
    members: tuple[str, ...]
    vote: str | None = None
    weights: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "members": list(self.members), "vote": self.vote, "weights": self.weights}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Selection:
        """A stored selection; ``ValueError`` when it is not one (e.g. a record of another version)."""
        try:
            members = tuple(str(m) for m in raw["members"])
            weights = {str(m): float(w) for m, w in (raw.get("weights") or {}).items()}
            vote = raw.get("vote")
            return cls(str(raw["name"]), members, None if vote is None else str(vote), weights)
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ValueError(f"not a stored selection: {str(raw)[:120]}") from None


@dataclass(frozen=True)
class Node:
    """A node of the label hierarchy (a WordNet synset for ImageNet): its id, its name, and its
    probability - the sum of the classes' under it - where the full distribution was at hand."""

    class_id: str
    name: str
    score: float | None = None

    def to_json(self) -> dict[str, Any]:
        found: dict[str, Any] = {"class_id": self.class_id, "name": self.name}
        if self.score is not None:
            found["score"] = self.score
        return found

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Node:
        score = raw.get("score")
        return cls(str(raw["class_id"]), str(raw["name"]), None if score is None else float(score))


@dataclass(frozen=True)
class Hedged:
    """The most specific node whose probability meets the confidence asked (``common.hierarchy``):
    how many classes it covers and the information gain, in bits, of answering with it."""

    node: Node
    classes: int
    bits: float
    confidence: float

    def to_json(self) -> dict[str, Any]:
        return {
            **self.node.to_json(),
            "classes": self.classes,
            "information_bits": round(self.bits, 3),
            "confidence": self.confidence,
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Hedged:
        return cls(
            Node.from_json(raw), int(raw["classes"]), float(raw["information_bits"]), float(raw["confidence"])
        )


@dataclass(frozen=True)
class Label:
    """One ranked answer for an image; a hard or weighted vote adds its votes and mean probability."""

    label: str
    index: int
    score: float
    class_id: str | None = None
    votes: float | None = None
    mean_probability: float | None = None
    parents: tuple[Node, ...] | None = None  # nearest first, up to the root (parents=true)
    categories: tuple[str, ...] | None = None  # the broad categories it is in (parents=true)

    def to_json(self) -> dict[str, Any]:
        found: dict[str, Any] = {"label": self.label}
        if self.class_id is not None:
            found["class_id"] = self.class_id
        found["index"] = self.index
        found["score"] = self.score
        if self.votes is not None:
            found["votes"] = self.votes
            found["mean_probability"] = self.mean_probability
        if self.parents is not None:
            found["parents"] = [parent.to_json() for parent in self.parents]
            found["categories"] = list(self.categories or ())
        return found

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Label:
        class_id, votes, mean = raw.get("class_id"), raw.get("votes"), raw.get("mean_probability")
        return cls(
            str(raw["label"]),
            int(raw["index"]),
            float(raw["score"]),
            None if class_id is None else str(class_id),
            None if votes is None else float(votes),
            None if mean is None else float(mean),
            None if raw.get("parents") is None else tuple(Node.from_json(p) for p in raw["parents"]),
            None if raw.get("categories") is None else tuple(str(c) for c in raw["categories"]),
        )


@dataclass(frozen=True)
class Predicted:
    """An image the models answered: its labels, best first (and each member's, for an ensemble)."""

    index: int
    name: str
    labels: tuple[Label, ...]
    members: dict[str, tuple[Label, ...]] | None = None
    hedged: Hedged | None = None  # the answer as specific as the model is sure (confidence=)
    flat: str | None = None  # why parents or a hedged answer could not be given (flat classes)

    def to_json(self) -> dict[str, Any]:
        found: dict[str, Any] = {"index": self.index, "name": self.name, **self.answer()}
        return found

    def answer(self) -> dict[str, Any]:
        """The image's answer without its place in the request (a single image's v1 body)."""
        found: dict[str, Any] = {}
        if self.hedged is not None:
            found["hedged"] = self.hedged.to_json()
        if self.flat is not None:
            found["hierarchy"] = self.flat
        found["predictions"] = [label.to_json() for label in self.labels]
        if self.members is not None:
            found["member_predictions"] = {
                member: [label.to_json() for label in labels] for member, labels in self.members.items()
            }
        return found


@dataclass(frozen=True)
class Failed:
    """An image that got no answer, and why."""

    index: int
    name: str
    error: ServiceError

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "error": error_json(self.error)}


Outcome = Predicted | Failed


def error_json(error: ServiceError) -> dict[str, Any]:
    """An image's error as results carry it: the error object with its HTTP status."""
    return {**error.to_dict(), "status": error.status}


def error_from_json(raw: Mapping[str, Any]) -> ServiceError:
    """The inverse of :func:`error_json` (a missing status is a 400: the image's own fault)."""
    return ServiceError(
        str(raw.get("message", "invalid image")),
        code=str(raw.get("code")),
        status=int(raw.get("status", 400)),
    )


def labels_from_json(raw: Any) -> tuple[Label, ...]:
    return tuple(Label.from_json(p) for p in raw)


def outcome_from_json(raw: Mapping[str, Any]) -> Outcome:
    """An outcome as :meth:`Predicted.to_json` or :meth:`Failed.to_json` wrote it."""
    index, name = int(raw["index"]), str(raw["name"])
    if "error" in raw:
        return Failed(index, name, error_from_json(raw["error"]))
    members = raw.get("member_predictions")
    return Predicted(
        index,
        name,
        labels_from_json(raw["predictions"]),
        None if members is None else {str(m): labels_from_json(p) for m, p in members.items()},
        None if raw.get("hedged") is None else Hedged.from_json(raw["hedged"]),
        None if raw.get("hierarchy") is None else str(raw["hierarchy"]),
    )


@dataclass(frozen=True)
class Served:
    """What a member's answer says about what computed it."""

    weights: str | None = None  # "imagenet", "random", ... (a custom model's: its base's)
    weights_hash: str | None = None
    backend: str | None = None
    precision: str | None = None
    version: str | None = None  # a model served from a repository
    base: str | None = None  # a custom model's base model
    fine_tune_layers: int | None = None

    @classmethod
    def from_reply(cls, reply: Mapping[str, Any]) -> Served:
        def text(key: str) -> str | None:
            value = reply.get(key)
            return None if value is None or value == "" else str(value)

        layers = reply.get("fine_tune_layers")
        return cls(
            text("weights"),
            text("weights_hash"),
            text("backend"),
            text("precision"),
            text("version"),
            text("base"),
            int(layers) if isinstance(layers, int) and not isinstance(layers, bool) else None,
        )

    @property
    def answered_as(self) -> str | None:
        """The weights' hash and the precision they ran at (the response cache's key part)."""
        return f"{self.weights_hash}/{self.precision or 'fp32'}" if self.weights_hash else None


@dataclass(frozen=True)
class Prediction:
    """One call's answer: an outcome per image in request order, what answered, what failed (an
    ensemble answers without the members that failed, above its quorum), and the timings."""

    selection: Selection
    outcomes: tuple[Outcome, ...]
    served: dict[str, Served]
    failures: dict[str, ServiceError]
    timing_ms: dict[str, float]

    @property
    def degraded(self) -> bool:
        return bool(self.failures)

    def first_error(self) -> ServiceError | None:
        """The first image's error, for answers that are all or nothing (v2, a single image)."""
        return next((o.error for o in self.outcomes if isinstance(o, Failed)), None)
