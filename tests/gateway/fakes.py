"""A stand-in for the gateway's ModelClient: deterministic answers, injectable failures."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import redis
from flask import Flask

from common.errors import ServiceError
from common.jobs.settings import JobSettings
from common.labels import Labels, load
from common.training.settings import TrainingSettings
from common.wire import encode_vector
from fleet.answers import MemberReply
from fleet.client import new_session
from fleet.registry import Registry
from gateway.app import create_app
from gateway.settings import GatewaySettings
from tests.helpers import auth_settings, gateway_settings, photo


class StubFetcher:
    """Fetches nothing: every URL answers with the coffee photo; ``urls`` records what was asked."""

    def __init__(self) -> None:
        self.urls: list[str] = []

    def fetch_all(self, urls: list[str], deadline: float | None = None) -> list[bytes]:
        self.urls.extend(urls)
        return [photo("coffee.jpg")] * len(urls)


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
        self.explained: list[dict[str, str]] = []

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
    ) -> MemberReply:
        self.calls.append((model, len(images), probabilities))
        self.priorities.append(priority)
        self.deadlines.append(deadline)
        if model in self.failures:
            raise self.failures[model]
        results = []
        for i, data in enumerate(images):
            vector = fake_vector(model, data)
            result: dict[str, Any] = {
                "index": i,
                "predictions": [p.to_json() for p in self.index.top_k(vector, top_k)],
            }
            if probabilities:
                result["probabilities"] = encode_vector(vector)
            results.append(result)
        return MemberReply.from_json(
            {
                "model": model,
                "weights": "random",
                "weights_hash": f"hash-{model}",
                "backend": "fake",
                "labels_hash": self.index.digest,
                "results": results,
                "timing_ms": {"decode": 1.0, "preprocess": 0.5, "inference": 10.0, "total": 12.0},
            }
        )

    def explain(
        self, model: str, image: bytes, params: dict[str, str], *, request_id: str = "", deadline: float
    ) -> dict[str, Any]:
        """A member's explanation: the top-left cell matters most, the rest by the image's bytes."""
        self.calls.append((f"explain:{model}", 1, False))
        self.explained.append(dict(params))
        if model in self.failures:
            raise self.failures[model]
        grid = int(params.get("grid", 7))
        drops = fake_vector(model, image)[: grid * grid].reshape(grid, grid) * 0.01
        drops[0, 0] = 0.5
        return {
            "model": model,
            "weights": "random",
            "weights_hash": f"hash-{model}",
            "backend": "fake",
            "precision": "fp32",
            "class": {"label": "tabby", "class_id": "n02123045", "index": 281, "score": 0.6},
            "grid": grid,
            "drops": drops.round(6).tolist(),
            "passes": grid * grid + 1,
            "timing_ms": {"total": 3.0},
        }

    def labels(self, model: str, labels_hash: str) -> Labels:
        assert labels_hash == self.index.digest
        return self.index


def redis_gateway(
    redis_url: str,
    jobs: JobSettings,
    training: TrainingSettings | None = None,
    fake: FakeModelClient | None = None,
    **auth: Any,
) -> Flask:
    """The gateway on a fake fleet with its stores in a real, emptied Redis at ``redis_url``: jobs,
    training, keys and owners, no rate limit; ``auth`` goes to its key settings."""
    redis.Redis.from_url(redis_url).flushall()
    settings = gateway_settings(rate_limit="")
    return create_app(
        settings,
        client=fake or FakeModelClient(settings),  # type: ignore[arg-type]
        poll_health=False,
        job_settings=jobs,
        training_settings=training,
        auth_settings=auth_settings(redis_url, **auth),
    )
