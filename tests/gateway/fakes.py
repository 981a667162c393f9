"""A stand-in for the gateway's ModelClient: deterministic answers, injectable failures."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from common.errors import ServiceError
from common.labels import Labels, load
from common.wire import encode_vector
from fleet.client import new_session
from fleet.registry import Registry
from gateway.settings import GatewaySettings


def fake_vector(model: str, data: bytes) -> np.ndarray:
    """A probability vector that depends on the model and the image bytes."""
    seed = int.from_bytes(hashlib.sha256(model.encode() + data).digest()[:8], "little")
    return np.random.default_rng(seed).dirichlet(np.full(1000, 0.05)).astype(np.float32)


class FakeModelClient:
    def __init__(self, settings: GatewaySettings) -> None:
        self.registry = Registry(settings.replicas, new_session(2))
        self.index: Labels = load()
        self.failures: dict[str, ServiceError] = {}
        self.calls: list[tuple[str, int, bool]] = []
        self.deadlines: list[float] = []
        self.priorities: list[str] = []

    def predict(
        self,
        model: str,
        images: list[bytes],
        *,
        top_k: int,
        probabilities: bool = False,
        request_id: str = "",
        deadline: float = float("inf"),
        priority: str = "interactive",
    ) -> dict[str, Any]:
        self.calls.append((model, len(images), probabilities))
        self.priorities.append(priority)
        self.deadlines.append(deadline)
        if model in self.failures:
            raise self.failures[model]
        results = []
        for i, data in enumerate(images):
            vector = fake_vector(model, data)
            result: dict[str, Any] = {"index": i, "predictions": self.index.top_k(vector, top_k)}
            if probabilities:
                result["probabilities"] = encode_vector(vector)
            results.append(result)
        return {
            "model": model,
            "weights": "random",
            "weights_hash": f"hash-{model}",
            "backend": "fake",
            "labels_hash": self.index.digest,
            "results": results,
            "timing_ms": {"decode": 1.0, "preprocess": 0.5, "inference": 10.0, "total": 12.0},
        }

    def labels(self, model: str, labels_hash: str) -> Labels:
        assert labels_hash == self.index.digest
        return self.index
