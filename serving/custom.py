"""Custom models as heads on a base model's features, kept in a model repository of their own.

A custom model is a softmax layer trained on the features a base model's backbone computes (the
input of its own ImageNet classifier: 2048 numbers for ResNet50 and InceptionV3, 4096 for VGG16).
The base model's service serves it: the backbone runs once per batch for every model that shares
it, and a head adds one small matrix product - so ten custom models cost kilobytes, not another
copy of the backbone.

A custom model trained with ``fine_tune_layers`` > 0 (``workers.training.finetune``) changed the
backbone's last layers too, so it is a whole classifier of its own (``model.keras``): the base's
service loads it beside the base, as a runtime with its own batcher (``FineTuned``), which costs a
copy of the backbone - at most ``CUSTOM_MAX_FINE_TUNED`` of them per service (one more for a while
when a new version replaces one). It owns its weights, so it never goes stale.

Repository: ``<CUSTOM_MODELS_DIR>/<name>/<version>/`` with ``head.npz`` (``kernel`` features x
classes, ``bias``) or ``model.keras``, and ``model.json`` (base, the base weights' hash, classes,
evaluation, how it was trained; ``kind`` is ``fine-tuned`` for a whole classifier). A version is
published whole: written in a staging folder, then renamed into place, so a reader never sees half
of one. The highest version is served; deleting the ``<name>`` folder removes the model. A version
that does not load is listed as broken and not tried again (the one before it keeps serving). A
head is served only on the base weights it was trained on (the hash): on other weights its answers
would mean nothing, and it says so instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common import labels as labels_mod
from common import repository
from common.repository import FINE_TUNED, HEAD_FILE, META_FILE, Identity

log = logging.getLogger(__name__)


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
        return _describe(self.name, self.version, self.meta, self.labels, self.weights_hash)

    def close(self) -> None:
        """Nothing to let go: a head is arrays."""


@dataclass(frozen=True)
class FineTuned:
    """One published version of a fine-tuned custom model, loaded: ``served`` is its own model
    (``serving.versions.LoadedModel``: runtime, batcher, state)."""

    name: str
    version: int
    meta: dict[str, Any]
    labels: labels_mod.Labels
    served: Any

    @property
    def weights_hash(self) -> str:
        return str(self.served.info.weights_hash)

    def describe(self) -> dict[str, Any]:
        info = self.served.info
        return {
            **_describe(self.name, self.version, self.meta, self.labels, self.weights_hash),
            "kind": FINE_TUNED,
            "fine_tune_layers": self.meta["training"]["fine_tune_layers"],
            "backend": info.backend,
            "precision": info.precision,
        }

    def close(self) -> None:
        """Stop its batcher once what it has queued is answered, so its runtime can go."""
        self.served.batcher.close()


Custom = Head | FineTuned


class OverLimit(ValueError):
    """The service already serves ``CUSTOM_MAX_FINE_TUNED`` fine-tuned models."""


LoadFineTuned = Callable[[Path, str, int, dict[str, Any], labels_mod.Labels], FineTuned]


def _describe(
    name: str, version: int, meta: dict[str, Any], labels: labels_mod.Labels, weights_hash: str
) -> dict[str, Any]:
    return {
        "name": name,
        "version": str(version),
        "kind": "head",
        "base": meta["base"],
        "base_weights": meta.get("base_weights"),
        "base_weights_hash": meta["base_weights_hash"],
        "weights_hash": weights_hash,
        "classes": len(labels),
        "class_names": list(labels.names),
        "labels_hash": labels.digest,
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


class HeadSet:
    """The custom models a base model's service serves: the newest version of each model in the
    repository whose base is this service's model, refreshed on a poll.

    Heads load in ``refresh`` (arrays: milliseconds). Fine-tuned models are loaded by
    ``load_fine_tuned`` on a loader thread of their own, one at a time (a conversion takes
    minutes): the poll and the service never wait for one, an older version serves until the new
    one is ready, and ``loading()`` lists them meanwhile. Without ``load_fine_tuned`` they are listed
    as broken. A replaced or removed model is closed ``close_after_s`` later, once requests that
    already hold it are answered. A version that does not load is not tried again (a new version,
    or the same name trained again, is)."""

    def __init__(
        self,
        root: str,
        base: str,
        load_fine_tuned: LoadFineTuned | None = None,
        *,
        max_fine_tuned: int = 2,
        close_after_s: float = 30.0,
    ) -> None:
        self.root = Path(root) if root else None
        self.base = base
        self.load_fine_tuned = load_fine_tuned
        self.max_fine_tuned = max_fine_tuned
        self.close_after_s = close_after_s
        self._heads: dict[str, Custom] = {}
        self._served: dict[str, Identity] = {}  # name -> the version of it served
        self._broken: dict[str, str] = {}  # name -> why its newest version does not load
        self._failed: dict[str, Identity] = {}  # name -> the version that did not load
        self._loading: dict[str, Identity] = {}  # fine-tuned versions on the loader's queue
        self._lock = threading.Lock()
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"fine-tuned-{base}")

    def get(self, name: str) -> Custom | None:
        return self._heads.get(name)

    def all(self) -> list[Custom]:
        return sorted(self._heads.values(), key=lambda head: head.name)

    def loading(self) -> dict[str, int]:
        """Fine-tuned versions being loaded (name -> version)."""
        return {name: identity[0] for name, identity in self._loading.items()}

    def broken(self) -> dict[str, str]:
        """Models whose newest version does not load, with why (an older one may still serve)."""
        return dict(self._broken)

    def _listing(self) -> dict[str, tuple[Identity, Path]]:
        return repository.newest(self.root) if self.root is not None else {}

    def refresh(self) -> bool:
        """Load new heads, queue new fine-tuned versions, drop removed models; True when the set
        served changed."""
        with self._lock:
            listing = self._listing()
            found: dict[str, Custom] = {}
            for name, (identity, folder) in listing.items():
                current = self._heads.get(name)
                if current is not None and self._served.get(name) == identity:
                    found[name] = current
                    continue
                if identity not in (self._failed.get(name), self._loading.get(name)):
                    head = self._load(name, identity, folder)
                    if head is not None:
                        found[name] = head
                        self._served[name] = identity
                        continue
                if current is not None:  # the new version is loading (or failed): the old one serves
                    found[name] = current
            for name in [*self._failed, *self._broken]:
                if name not in listing:  # gone: trained again under that name, it is tried afresh
                    self._failed.pop(name, None)
                    self._broken.pop(name, None)
            previous, self._heads = self._heads, found  # one assignment: readers see old or new
            self._served = {name: self._served[name] for name in found}
        self._close_later([old for name, old in previous.items() if found.get(name) is not old])
        return found.keys() != previous.keys() or any(found[n] is not previous[n] for n in found)

    def _load(self, name: str, identity: Identity, folder: Path) -> Head | None:
        """A head, loaded; None for another base's model, a broken version, or a fine-tuned one
        (queued for the loader)."""
        try:
            meta = json.loads((folder / META_FILE).read_text())
            if meta.get("base") != self.base:
                return None  # another base model's service serves it
            if meta.get("kind") == FINE_TUNED:
                if self.load_fine_tuned is None:
                    raise ValueError("this service does not serve fine-tuned models")
                self._loading[name] = identity
                self._loader.submit(self._load_fine_tuned, name, identity, folder, meta)
                return None
            head = load(folder, name, identity[0])
        except Exception as exc:  # noqa: BLE001 - a broken version: keep what was served, say why
            self._failed_to_load(name, identity, exc)
            return None
        self._broken.pop(name, None)
        log.info(
            "custom model %s version %d on %s: %d classes", name, identity[0], self.base, len(head.labels)
        )
        return head

    def _failed_to_load(self, name: str, identity: Identity, exc: Exception) -> None:
        reason = f"version {identity[0]} does not load: {type(exc).__name__}: {exc}"
        if self._broken.get(name) != reason:
            log.warning("custom model %s: %s", name, reason)
            self._broken[name] = reason
        if not isinstance(exc, OverLimit):  # over the limit: tried again once another one is gone
            self._failed[name] = identity

    def _load_fine_tuned(self, name: str, identity: Identity, folder: Path, meta: dict[str, Any]) -> None:
        """On the loader thread: load one fine-tuned version, then serve it if it is still the
        newest version of its model."""
        assert self.load_fine_tuned is not None
        try:
            others = {n for n, h in self._heads.items() if isinstance(h, FineTuned) and n != name}
            if len(others) >= self.max_fine_tuned:
                raise OverLimit(
                    f"{self.base} already serves {len(others)} fine-tuned models, the most "
                    f"CUSTOM_MAX_FINE_TUNED allows (each holds a copy of the backbone)"
                )
            custom = self.load_fine_tuned(
                folder, name, identity[0], meta, labels_mod.from_json(meta["classes"])
            )
        except Exception as exc:  # noqa: BLE001 - listed as broken; the older version serves on
            with self._lock:
                if self._loading.get(name) == identity:
                    del self._loading[name]
                self._failed_to_load(name, identity, exc)
            return
        with self._lock:
            if self._loading.get(name) == identity:
                del self._loading[name]
            newest = self._listing().get(name)
            if newest is None or newest[0] != identity:  # removed or replaced while it loaded
                self._close_later([custom])
                return
            old = self._heads.get(name)
            self._heads = {**self._heads, name: custom}
            self._served[name] = identity
            self._broken.pop(name, None)
        log.info("custom model %s version %d (fine-tuned) on %s: ready", name, identity[0], self.base)
        self._close_later([old] if old is not None else [])

    def _close_later(self, gone: list[Custom]) -> None:
        """Close models no longer served, once requests that already hold one are answered."""
        if gone:
            timer = threading.Timer(self.close_after_s, lambda: [old.close() for old in gone])
            timer.daemon = True
            timer.start()

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
