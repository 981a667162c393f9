"""Class labels: the shipped ImageNet index (Keras' layout) or a custom model's labels file."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from common.outcomes import Label

IMAGENET_INDEX = Path(__file__).parent / "data" / "imagenet_class_index.json"


@dataclass(frozen=True)
class Labels:
    """Index -> (class id, label). ``class_id`` is the WordNet id for ImageNet."""

    class_ids: tuple[str, ...]
    names: tuple[str, ...]

    @cached_property  # every answer names it: hashed once (0.13 ms for ImageNet's 1,000), not each time
    def digest(self) -> str:
        """Short hash that identifies the label set (ensembles need members that agree)."""
        payload = json.dumps([self.class_ids, self.names]).encode()
        return hashlib.blake2b(payload, digest_size=6).hexdigest()

    def __len__(self) -> int:
        return len(self.names)

    def to_json(self) -> list[list[str]]:
        return [list(pair) for pair in zip(self.class_ids, self.names, strict=True)]

    def top_k(self, probabilities: np.ndarray, k: int) -> list[Label]:
        """Top ``k`` predictions, highest first (ties keep the lower index first, like Keras)."""
        k = min(k, len(probabilities))
        order = np.argsort(-probabilities, kind="stable")[:k]
        return [Label(self.names[i], int(i), float(probabilities[i]), self.class_ids[i]) for i in order]


def from_json(data: object) -> Labels:
    """Accept Keras' ``{"0": ["n01440764", "tench"], ...}``, a list of pairs, or a list of names."""
    if isinstance(data, dict):
        pairs = [data[str(i)] for i in range(len(data))]
    elif isinstance(data, list):
        pairs = [[item, item] if isinstance(item, str) else item for item in data]
    else:
        raise ValueError("labels must be a JSON object or list")
    if not pairs or any(len(pair) != 2 for pair in pairs):
        raise ValueError("each label needs exactly a class id and a name")
    return Labels(class_ids=tuple(str(p[0]) for p in pairs), names=tuple(str(p[1]) for p in pairs))


def load(path: Path | str = IMAGENET_INDEX) -> Labels:
    """Read a labels file (see :func:`from_json` for the accepted layouts)."""
    with open(path, encoding="utf-8") as handle:
        return from_json(json.load(handle))
