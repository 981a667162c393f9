"""A training dataset: an unpacked archive of one folder per class, checked before any job starts.

Layout: ``<class>/<image>`` (deeper folders belong to their top folder's class); one folder above
the classes is allowed, as zipping a folder makes it (``photos/cats/1.jpg``). Each file's header is
read (format, declared size: ``common.imaging.probe``); unreadable files are skipped and listed.
The dataset is refused - every problem named at once - unless it has at least two classes, each
with at least ``min_images_per_class`` readable images, within the class and image limits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import imaging
from common.errors import BadRequest, ServiceError

MANIFEST = "dataset.json"
MAX_CLASS_NAME = 100


@dataclass(frozen=True)
class Entry:
    """One file of an uploaded archive, unpacked (``gateway.archive``)."""

    name: str
    """The normalised path inside the archive, '/'-separated, e.g. ``cats/1.jpg``."""
    path: Path
    """Where its bytes were written."""


class InvalidDataset(BadRequest):
    """A dataset that cannot be trained on; ``problems`` names each reason."""

    code = "invalid_dataset"

    def __init__(self, problems: list[str]) -> None:
        shown = "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
        super().__init__(f"dataset refused: {shown}")
        self.problems = problems

    def to_dict(self, request_id: str | None = None) -> dict[str, Any]:
        return {**super().to_dict(request_id), "problems": self.problems}


@dataclass
class Dataset:
    """Classes (sorted) and the readable images of each, as paths relative to the job folder."""

    classes: list[str]
    items: list[dict[str, str]]  # {"name", "file", "class"}
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"name", "reason"}

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(self.classes, 0)
        for item in self.items:
            counts[item["class"]] += 1
        return counts

    def write(self, folder: Path) -> None:
        (folder / MANIFEST).write_text(
            json.dumps({"classes": self.classes, "items": self.items, "skipped": self.skipped})
        )

    @classmethod
    def read(cls, folder: Path) -> Dataset:
        raw = json.loads((folder / MANIFEST).read_text())
        return cls(raw["classes"], raw["items"], raw["skipped"])


def _class_paths(entries: list[Entry]) -> list[tuple[Entry, list[str]]]:
    """Each entry's path parts, without a folder every entry shares above the class folders."""
    parts = [(entry, entry.name.split("/")) for entry in entries]
    tops = {p[0] for _, p in parts}
    if len(tops) == 1 and any(len(p) >= 3 for _, p in parts):
        parts = [(entry, p[1:]) for entry, p in parts]
    return parts


def check(
    entries: list[Entry],
    root: Path,
    limits: imaging.ImageLimits,
    *,
    min_images_per_class: int,
    max_classes: int,
    max_images: int,
) -> Dataset:
    """The dataset ``entries`` (unpacked under ``root``) make, or ``InvalidDataset``."""
    items: list[dict[str, str]] = []
    skipped: list[dict[str, str]] = []
    problems: list[str] = []
    if len(entries) > max_images:
        problems.append(
            f"{len(entries)} files; a dataset may have at most {max_images} (TRAINING_MAX_IMAGES)"
        )
    for entry, parts in _class_paths(entries):
        if len(parts) < 2:
            skipped.append({"name": entry.name, "reason": "not inside a class folder"})
            continue
        label = parts[0].strip()
        if not label or len(label) > MAX_CLASS_NAME or not label.isprintable():
            skipped.append(
                {"name": entry.name, "reason": "the class folder's name is empty, too long or unprintable"}
            )
            continue
        try:
            imaging.probe(entry.path.read_bytes(), limits)
        except ServiceError as exc:
            skipped.append({"name": entry.name, "reason": exc.message})
            continue
        items.append({"name": entry.name, "file": str(entry.path.relative_to(root)), "class": label})
    classes = sorted({item["class"] for item in items})
    dataset = Dataset(classes, items, skipped)
    if len(classes) < 2:
        found = ", ".join(repr(c) for c in classes) or "none"
        problems.append(f"a dataset needs at least 2 class folders with readable images; found {found}")
    if len(classes) > max_classes:
        problems.append(f"{len(classes)} classes; at most {max_classes} (TRAINING_MAX_CLASSES)")
    for label, count in dataset.counts().items():
        if count < min_images_per_class:
            problems.append(
                f"class {label!r} has {count} readable image{'s' * (count != 1)}; each class needs at "
                f"least {min_images_per_class} (TRAINING_MIN_IMAGES_PER_CLASS)"
            )
    if skipped and problems:
        problems.append(
            f"{len(skipped)} file(s) skipped, e.g. {skipped[0]['name']!r}: {skipped[0]['reason']}"
        )
    if problems:
        raise InvalidDataset(problems)
    return dataset
