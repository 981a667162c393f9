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

The on-disk layout is ``common.repository``'s; which versions are served, and how one replaces
another, is ``serving.manager``'s. A head is served only on the base weights it was trained on (the
hash): on other weights its answers would mean nothing, and it says so instead.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common import labels as labels_mod
from common.errors import ServiceError
from common.repository import FINE_TUNED, HEAD_FILE, META_FILE
from serving.loaded import LoadedModel
from serving.runtime import RuntimeInfo


class StaleCustomModel(ServiceError):
    status, code = 409, "custom_model_stale"


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

    def check_fresh(self, base: RuntimeInfo) -> None:
        """Served only on the base weights it was trained on: on others its answers mean nothing."""
        if self.meta["base_weights_hash"] != base.weights_hash or self.meta["features"] != base.features:
            raise StaleCustomModel(
                f"{self.name} was trained on {self.meta['base']} weights {self.meta['base_weights_hash']}, "
                f"but {self.meta['base']} now serves {base.weights_hash}: train it again"
            )

    def close(self) -> None:
        """Nothing to let go: a head is arrays."""


@dataclass(frozen=True)
class FineTuned:
    """One published version of a fine-tuned custom model, loaded: ``served`` is its own model
    (runtime, batcher, state)."""

    name: str
    version: int
    meta: dict[str, Any]
    labels: labels_mod.Labels
    served: LoadedModel

    @property
    def weights_hash(self) -> str:
        return self.served.require_ready().weights_hash

    def describe(self) -> dict[str, Any]:
        info = self.served.require_ready()
        return {
            **_describe(self.name, self.version, self.meta, self.labels, self.weights_hash),
            "kind": FINE_TUNED,
            "fine_tune_layers": self.meta["training"]["fine_tune_layers"],
            "backend": info.backend,
            "precision": info.precision,
        }

    def check_fresh(self, base: RuntimeInfo) -> None:
        """Never stale: it owns its weights."""

    def close(self) -> None:
        """Stop its batcher once what it has queued is answered, so its runtime can go."""
        self.served.close()


Custom = Head | FineTuned


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
