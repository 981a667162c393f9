"""A model service's ``POST /v1/predict``: which model answers, admission, decoding, the batcher,
and the answer.

Query: ``model`` (a custom model trained on this one; default: this one), ``top_k``,
``probabilities`` and ``features`` (the vectors custom models are trained on). Headers:
``X-Deadline-Ms`` (the budget) and ``X-Priority`` (``interactive``, the default, or ``background``:
waits until no interactive request does, and runs as a batch of its own). A prediction is admitted
by deadline before its body is read (``serving.admission``), decoded in its request thread and
answered by the batcher of the model that serves it: a head rides its base's batches, a fine-tuned
model has its own.
"""

from __future__ import annotations

import time
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

import numpy as np
from flask import request

from common import imaging, metrics, web
from common import labels as labels_mod
from common.errors import BadRequest, DeadlineExceeded, ServiceError, UnknownModel
from common.models import ModelSpec
from common.outcomes import error_json
from common.wire import IMAGE_LENGTHS_HEADER, PRIORITY_HEADER, Priority, encode_vector, split_images
from serving.batching import BatcherClosed
from serving.custom import Custom, FineTuned, Head
from serving.loaded import LoadedModel
from serving.manager import ModelManager
from serving.runtime import Outputs, RuntimeInfo
from serving.settings import ServiceSettings

MAX_TOP_K = 1000


@dataclass(frozen=True)
class Route:
    """Which model answers a request: the service's own, a head on its features (``target`` is the
    service's model), or a fine-tuned model (``target`` is its own)."""

    custom: Custom | None
    target: LoadedModel
    info: RuntimeInfo
    labels: labels_mod.Labels

    @property
    def head(self) -> Head | None:
        return self.custom if isinstance(self.custom, Head) else None

    def probabilities(self, outputs: Outputs) -> np.ndarray:
        """What the route's model says of ``outputs``: a head's classes on the features, else the
        model's own probabilities."""
        if self.head is None:
            return outputs.probabilities
        assert outputs.features is not None
        return self.head.apply(outputs.features)


@dataclass
class Computed:
    """What the model gave for a request's decoded images, and how long they queued."""

    outputs: Outputs
    probabilities: np.ndarray
    queue_ms: float


def route(models: ModelManager, spec: ModelSpec, name: str) -> Route:
    """The model a request names (``?model=``; empty or the service's own name: the base)."""
    base = models.base
    info = base.require_ready()
    if not name or name == spec.name:
        return Route(None, base, info, base.labels)
    found = models.get(name)
    if found is None:
        raise UnknownModel(f"{spec.name} serves no custom model {name[:64]!r}")
    found.check_fresh(info)
    target = found.served if isinstance(found, FineTuned) else base
    return Route(found, target, target.require_ready(), found.labels)


def request_images() -> tuple[list[bytes], bool]:
    """Images from multipart ``file``/``files``, a framed body (``X-Image-Lengths``, the gateway's)
    or a raw body; the flag says "batch answer"."""
    lengths = request.headers.get(IMAGE_LENGTHS_HEADER)
    if lengths is not None:
        try:
            return split_images(request.get_data(cache=False), lengths), True
        except ValueError as exc:
            raise BadRequest(str(exc), code="bad_image_lengths") from None
    if request.mimetype == "multipart/form-data":
        parts = request.files.getlist("files")
        batch = bool(parts)
        parts = parts or request.files.getlist("file")
        if not parts:
            raise BadRequest("multipart request has no 'file' or 'files' part")
        return [part.read() for part in parts], batch
    return [request.get_data(cache=False)], False


def request_priority() -> Priority:
    """``X-Priority``: ``interactive`` when absent, ``background`` for asynchronous jobs and
    training (``batch``, its old name, too); else a 400."""
    raw = request.headers.get(PRIORITY_HEADER) or Priority.INTERACTIVE
    try:
        return Priority(raw)
    except ValueError:
        allowed = ", ".join(Priority)
        raise BadRequest(f"{PRIORITY_HEADER} must be one of {allowed}, got {raw[:40]!r}") from None


class Predict:
    def __init__(self, spec: ModelSpec, settings: ServiceSettings, models: ModelManager) -> None:
        self.spec = spec
        self.settings = settings
        self.models = models
        self.limits = imaging.ImageLimits(settings.max_image_bytes, settings.max_image_pixels)

    def __call__(self) -> dict[str, Any]:
        started = time.perf_counter()
        deadline = web.deadline(self.settings.default_deadline_s)
        priority = request_priority()
        name = request.args.get("model", "")
        found = route(self.models, self.spec, name)
        # More than the model has classes is clamped (the gateway's default 5 meets 4-class models).
        top_k = web.query_int("top_k", self.settings.default_top_k, 1, MAX_TOP_K)
        with_probabilities = web.query_flag("probabilities")
        with_features = web.query_flag("features")
        # Features come from the base's backbone: the base and its heads give them, a fine-tuned
        # model (a classifier of its own) does not.
        if with_features and (not found.info.features or isinstance(found.custom, FineTuned)):
            served = name or self.spec.name
            raise BadRequest(f"{served} gives no features (base models do)", code="no_features")
        pixels, decoded, results, batch = self._read(found, deadline)
        decoded_at = time.perf_counter()
        found, computed = self._compute(found, name, pixels, deadline, priority)
        finished = time.perf_counter()
        for n, (i, row) in enumerate(zip(decoded, computed.probabilities, strict=True)):
            results[i]["predictions"] = [label.to_json() for label in found.labels.top_k(row, top_k)]
            if with_probabilities:
                results[i]["probabilities"] = encode_vector(row)
            if with_features and computed.outputs.features is not None:
                results[i]["features"] = encode_vector(computed.outputs.features[n])
        body = self.served_by(found)
        if batch:
            body["results"] = results
        else:
            body.update({k: v for k, v in results[0].items() if k != "index"})
        body["timing_ms"] = {
            "decode": round((decoded_at - started) * 1000, 2),
            "queue": round(computed.queue_ms, 2),
            "inference": round((finished - decoded_at) * 1000 - computed.queue_ms, 2),
            "total": round((time.perf_counter() - started) * 1000, 2),
        }
        return body

    def _read(
        self, found: Route, deadline: float
    ) -> tuple[list[np.ndarray], list[int], list[dict[str, object]], bool]:
        """Admit, read and decode: pixels of every readable image, their positions, a result row per
        image (errors filled in for a batch; a single bad image raises), and "batch answer"."""
        # Refuse before reading the body when even one image could not be served in time: the
        # cheapest refusal there is (the unread body is drained by web.DrainBody).
        found.target.batcher.check(1, deadline)
        images, batch = request_images()
        if len(images) > self.settings.max_request_images:
            raise BadRequest(
                f"{len(images)} images in one request; the limit is {self.settings.max_request_images}",
                code="too_many_images",
            )
        if len(images) > 1:
            found.target.batcher.check(len(images), deadline)
        results: list[dict[str, object]] = [{"index": i} for i in range(len(images))]
        pixels, decoded = [], []
        crop = self.settings.center_crop
        for i, data in enumerate(images):  # returned, a request holds its pixels, not its photos
            try:
                pixels.append(imaging.load_pixels(data, self.spec.input_size, self.limits, crop))
                decoded.append(i)
            except ServiceError as exc:
                if not batch:
                    raise
                results[i]["error"] = error_json(exc)
        return pixels, decoded, results, batch

    def _compute(
        self, found: Route, name: str, pixels: list[np.ndarray], deadline: float, priority: Priority
    ) -> tuple[Route, Computed]:
        """The model's outputs for ``pixels`` (none: nothing to compute), and the route that gave
        them: a request that found a model just replaced is sent to its successor."""
        if not pixels:
            empty = Outputs(np.empty((0, len(found.labels)), np.float32), np.empty((0, found.info.features)))
            return found, Computed(empty, empty.probabilities, 0.0)
        stacked = np.stack(pixels)
        pixels.clear()
        try:
            waiting = found.target.batcher.submit(stacked, deadline=deadline, priority=priority)
        except BatcherClosed:  # replaced since it was looked up: its successor answers
            found = route(self.models, self.spec, name)
            waiting = found.target.batcher.submit(stacked, deadline=deadline, priority=priority)
        del stacked
        try:
            outputs = waiting.future.result(timeout=max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            raise DeadlineExceeded("the model did not answer before the request's deadline") from None
        metrics.QUEUE_SECONDS.labels(self.spec.name).observe(waiting.queue_ms / 1000)
        return found, Computed(outputs, found.probabilities(outputs), waiting.queue_ms)

    def served_by(self, found: Route) -> dict[str, Any]:
        """What answered: the model, its weights, backend, precision and version."""
        info, custom, head = found.info, found.custom, found.head
        body: dict[str, Any] = {
            "request_id": web.request_id(),
            "model": custom.name if custom else self.spec.name,
            # A custom model's answer names the base weights it was trained on (random or imagenet).
            "weights": (custom.meta.get("base_weights") or info.weights) if custom else info.weights,
            "weights_hash": custom.weights_hash if custom else info.weights_hash,
            "backend": info.backend,
            "precision": info.precision,
        }
        version = found.target.version
        if head is not None:
            body |= {"version": str(head.version), "base": self.spec.name}
            body |= {"base_weights_hash": info.weights_hash}
            body |= {"base_version": version} if version else {}
        elif custom is not None:
            body |= {
                "version": str(custom.version),
                "base": self.spec.name,
                "base_weights_hash": custom.meta["base_weights_hash"],
                "fine_tune_layers": custom.meta["training"]["fine_tune_layers"],
            }
        elif version:
            body["version"] = version
        body["labels_hash"] = found.labels.digest
        return body
