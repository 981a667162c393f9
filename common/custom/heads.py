"""Custom models as heads on a base model's features, kept in a model repository of their own.

A custom model is a softmax layer trained on the features a base model's backbone computes (the
input of its own ImageNet classifier: 2048 numbers for ResNet50 and InceptionV3, 4096 for VGG16).
The base model's service serves it: the backbone runs once per batch for every model that shares
it, and a head adds one small matrix product - so ten custom models cost kilobytes, not another
copy of the backbone.

Repository: ``<CUSTOM_MODELS_DIR>/<name>/<version>/`` with ``head.npz`` (``kernel`` features x
classes, ``bias``) and ``model.json`` (base, the base weights' hash, classes, evaluation, how it was
trained). A version is published whole: written in a staging folder, then renamed into place, so
a reader never sees half of one. The highest version is served; deleting the ``<name>`` folder
removes the model. A head is served only on the base weights it was trained on (the hash): on
other weights its answers would mean nothing, and it says so instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common import labels as labels_mod
from common import repository

log = logging.getLogger(__name__)
NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
RESERVED = frozenset({"vgg16", "resnet50", "inceptionv3", "ensemble", "custom"})
HEAD_FILE, META_FILE = "head.npz", "model.json"


def check_name(name: str, bases: tuple[str, ...] = ()) -> str | None:
    """Why ``name`` cannot name a custom model (None: it can)."""
    if not NAME.match(name or ""):
        return "name must be 1-64 of a-z, 0-9, '_' and '-', starting with a letter or digit"
    if name in RESERVED or name in bases:
        return f"{name!r} is a model of the fleet or a reserved word; choose another name"
    return None


@dataclass(frozen=True)
class Head:
    """One published version of a custom model, loaded."""

    name: str
    version: int
    meta: dict[str, Any]
    kernel: np.ndarray
    bias: np.ndarray
    labels: labels_mod.Labels
    weights_hash: str

    def apply(self, features: np.ndarray) -> np.ndarray:
        """Probabilities for a batch of base features (softmax, computed stably)."""
        logits = features.astype(np.float32, copy=False) @ self.kernel + self.bias
        logits -= logits.max(axis=1, keepdims=True)
        np.exp(logits, out=logits)
        return logits / logits.sum(axis=1, keepdims=True)

    def describe(self) -> dict[str, Any]:
        """What ``/v1/model`` lists (and the gateway's ``/v1/models`` repeats) for this model."""
        meta = self.meta
        return {
            "name": self.name,
            "version": str(self.version),
            "base": meta["base"],
            "base_weights": meta.get("base_weights"),
            "base_weights_hash": meta["base_weights_hash"],
            "weights_hash": self.weights_hash,
            "classes": len(self.labels),
            "class_names": list(self.labels.names),
            "labels_hash": self.labels.digest,
            "evaluation": meta.get("evaluation"),
            "training": meta.get("training"),
            "created_at": meta.get("created_at"),
        }


def load(folder: Path, name: str, version: int) -> Head:
    meta = json.loads((folder / META_FILE).read_text())
    with np.load(folder / HEAD_FILE) as arrays:
        kernel = np.ascontiguousarray(arrays["kernel"], np.float32)
        bias = np.ascontiguousarray(arrays["bias"], np.float32)
    labels = labels_mod.from_json(meta["classes"])
    if kernel.shape != (meta["features"], len(labels)) or bias.shape != (len(labels),):
        raise ValueError(f"{folder}: kernel {kernel.shape} / bias {bias.shape} do not fit the metadata")
    digest = hashlib.blake2b(digest_size=8)
    digest.update(meta["base_weights_hash"].encode())
    digest.update(kernel.tobytes())
    digest.update(bias.tobytes())
    return Head(name, version, meta, kernel, bias, labels, digest.hexdigest())


def publish(root: Path, name: str, kernel: np.ndarray, bias: np.ndarray, meta: dict[str, Any]) -> int:
    """Write a new version of ``name`` (the next number) whole, and return its number."""
    model_dir = root / name
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".publishing-", dir=root))
    try:
        np.savez(staging / HEAD_FILE, kernel=kernel.astype(np.float32), bias=bias.astype(np.float32))
        (staging / META_FILE).write_text(json.dumps(meta, indent=2))
        model_dir.mkdir(exist_ok=True)  # only once the version is written: no empty model folder
        for _ in range(100):  # another publisher may take the next number first: take the one after
            version = (repository.versions(root, name) or [0])[-1] + 1
            try:
                os.rename(staging, model_dir / str(version))
                return version
            except OSError:
                if not (model_dir / str(version)).exists():
                    raise
        raise RuntimeError(f"could not find a free version number for {name}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def remove(root: Path, name: str) -> bool:
    """Delete a custom model, every version, at once (a rename) - False when there is none."""
    folder = root / name
    if not folder.is_dir():
        return False
    doomed = root / f".deleted-{name}-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(folder, doomed)
    except FileNotFoundError:  # another removal got there first
        return False
    shutil.rmtree(doomed, ignore_errors=True)
    return True


def sweep_staging(root: Path, older_than_s: float = 3600) -> None:
    """Remove what a publisher killed mid-write left behind (never a published version)."""
    if not root.is_dir():
        return
    for entry in root.iterdir():
        if entry.name.startswith((".publishing-", ".deleted-")):
            try:
                if entry.stat().st_mtime < time.time() - older_than_s:
                    shutil.rmtree(entry, ignore_errors=True)
            except OSError:
                continue


class HeadSet:
    """The custom models a base model's service serves: the newest version of each model in the
    repository whose base is this service's model, refreshed on a poll."""

    def __init__(self, root: str, base: str) -> None:
        self.root = Path(root) if root else None
        self.base = base
        self._heads: dict[str, Head] = {}
        self._broken: dict[str, str] = {}  # name -> why its newest version does not load
        self._lock = threading.Lock()

    def get(self, name: str) -> Head | None:
        return self._heads.get(name)

    def all(self) -> list[Head]:
        return sorted(self._heads.values(), key=lambda head: head.name)

    def refresh(self) -> bool:
        """Load new versions, drop removed models; True when anything changed."""
        if self.root is None or not self.root.is_dir():
            changed = bool(self._heads)
            self._heads = {}
            return changed
        with self._lock:
            found: dict[str, Head] = {}
            for folder in sorted(self.root.iterdir()):
                if folder.name.startswith(".") or not folder.is_dir():
                    continue
                versions = repository.versions(self.root, folder.name)
                if not versions:
                    continue
                current = self._heads.get(folder.name)
                if current is not None and current.version == versions[-1]:
                    found[folder.name] = current
                    continue
                head = self._load_newest(folder.name, versions[-1], current)
                if head is not None:
                    found[folder.name] = head
            changed = found.keys() != self._heads.keys() or any(
                found[n].version != self._heads[n].version for n in found
            )
            self._heads = found  # one assignment: readers see the old set or the new
        return changed

    def _load_newest(self, name: str, version: int, current: Head | None) -> Head | None:
        assert self.root is not None
        folder = self.root / name / str(version)
        try:
            meta = json.loads((folder / META_FILE).read_text())
            if meta.get("base") != self.base:
                return None  # another base model's service serves it
            head = load(folder, name, version)
        except Exception as exc:  # noqa: BLE001 - a broken version: keep what was served, say why
            reason = f"version {version} does not load: {type(exc).__name__}: {exc}"
            if self._broken.get(name) != reason:
                log.warning("custom model %s: %s", name, reason)
                self._broken[name] = reason
            return current
        self._broken.pop(name, None)
        log.info("custom model %s version %d on %s: %d classes", name, version, self.base, len(head.labels))
        return head

    def broken(self) -> dict[str, str]:
        """Models whose newest version does not load, with why (an older one may still serve)."""
        return dict(self._broken)

    def poll(self, every_s: float) -> None:
        """Refresh now and every ``every_s`` seconds, in a background thread."""

        def refresh() -> None:
            try:
                self.refresh()
            except Exception:  # a file-system error (a removal racing the listing) must not stop it
                log.exception("refreshing custom models failed")

        refresh()

        def loop() -> None:
            while True:
                time.sleep(every_s)
                refresh()

        threading.Thread(target=loop, name=f"custom-models-{self.base}", daemon=True).start()
