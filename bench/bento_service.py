"""BentoML serving the fleet's ResNet50 IR (bench/peer_model.py: OpenVINO, Pillow, top 5) as a
comparison point: BentoML's adaptive batching up to 8, the photos as multipart ``images``. Runs in
its own virtualenv (bench/.venv-bento), started by bench/baselines.py with
``PEER_IR=<model.xml> bentoml serve bench.bento_service:ResNet50``."""

from __future__ import annotations

import bentoml
import numpy as np
from PIL.Image import Image

from bench import peer_model


@bentoml.service(workers=1)
class ResNet50:
    def __init__(self) -> None:
        self.model = peer_model.ResNet50()

    # NOTE: max_latency_ms is BentoML's refusal bound, not a wait: batches form from what is queued
    # while the previous one runs. 10 s never refuses the sweep's 64 clients (a queue of 64 photos
    # takes 1-3 s here); a lower bound would trade answers for refusals, which the fleet never does.
    @bentoml.api(batchable=True, max_batch_size=8, max_latency_ms=10_000)
    def predict(self, images: list[Image]) -> list[list[dict]]:
        return self.model(np.stack([peer_model.pixels(i) for i in images]))
