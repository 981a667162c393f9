"""The one model-service factory: every service is ``create_app(spec)`` with its own spec.

The model is loaded in a background thread of the Gunicorn worker (never the master), warmed, and
timed at its batch sizes; only then does ``/health/ready`` answer 200. A prediction is admitted by
deadline before its body is read (``serving/admission.py``), decoded in its request thread, and
answered by the one batcher that feeds the one model copy of the process. A request sent with
``X-Priority: batch`` (asynchronous jobs) runs alone and only when no interactive request waits.

Custom models trained on this service's model (``serving.custom``) are served here too: a
head on the base's features rides the base's batches; a fine-tuned one is a model of its own with
its own batcher, loaded (converted, warmed) in the poll thread while everything else serves.
"""

from __future__ import annotations

import hmac
import logging
import time
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from flask import Flask, Response, request

from common import imaging, metrics, repository, web
from common import labels as labels_mod
from common.errors import BadRequest, DeadlineExceeded, NotFound, ServiceError, UnknownModel
from common.models import ModelSpec
from common.wire import PRIORITY_HEADER, Priority, encode_vector
from serving.backends import make_runtime
from serving.batching import Batcher, BatcherClosed
from serving.custom import Custom, FineTuned, Head, HeadSet
from serving.runtime import Outputs, Runtime, RuntimeInfo
from serving.settings import ServiceSettings
from serving.versions import LoadedModel, Reloader
from serving.weights import WeightsPlan

__all__ = ["ServiceSettings", "create_app"]
log = logging.getLogger(__name__)
MAX_TOP_K = 1000


def _request_images() -> tuple[list[bytes], bool]:
    """Images from multipart ``file``/``files`` or a raw body; the flag says "batch answer"."""
    if request.mimetype == "multipart/form-data":
        parts = request.files.getlist("files")
        batch = bool(parts)
        parts = parts or request.files.getlist("file")
        if not parts:
            raise BadRequest("multipart request has no 'file' or 'files' part")
        return [part.read() for part in parts], batch
    return [request.get_data(cache=False)], False


def _request_priority() -> Priority:
    """``X-Priority``: ``interactive`` when absent, ``batch`` for asynchronous jobs; else a 400."""
    raw = request.headers.get(PRIORITY_HEADER) or Priority.INTERACTIVE
    try:
        return Priority(raw)
    except ValueError:
        allowed = ", ".join(Priority)
        raise BadRequest(f"{PRIORITY_HEADER} must be one of {allowed}, got {raw[:40]!r}") from None


class StaleCustomModel(ServiceError):
    status, code = 409, "custom_model_stale"


@dataclass(frozen=True)
class _Route:
    """Which model answers a request: the service's own, a head on its features (``target`` is
    the service's model), or a fine-tuned model (``target`` is its own)."""

    custom: Custom | None
    target: LoadedModel
    info: RuntimeInfo
    labels: labels_mod.Labels

    @property
    def head(self) -> Head | None:
        return self.custom if isinstance(self.custom, Head) else None


def _route(heads: HeadSet, name: str, spec: ModelSpec, model: LoadedModel) -> _Route:
    custom = _custom_for(heads, name, spec, model.require_ready())
    target = custom.served if isinstance(custom, FineTuned) else model
    return _Route(custom, target, target.require_ready(), custom.labels if custom else model.labels)


def _custom_for(heads: HeadSet, name: str, spec: ModelSpec, info: RuntimeInfo) -> Custom | None:
    """The custom model a request names (``?model=``; None: the service's own model), if servable."""
    if not name or name == spec.name:
        return None
    custom = heads.get(name)
    if custom is None:
        raise UnknownModel(f"{spec.name} serves no custom model {name[:64]!r}")
    _check_fresh(custom, info)
    return custom


def _check_fresh(head: Custom, info: RuntimeInfo) -> None:
    """A head is served only on the base weights it was trained on; a fine-tuned model has its own."""
    if isinstance(head, FineTuned):
        return
    if head.meta["base_weights_hash"] != info.weights_hash or head.meta["features"] != info.features:
        raise StaleCustomModel(
            f"{head.name} was trained on {head.meta['base']} weights {head.meta['base_weights_hash']}, "
            f"but {head.meta['base']} now serves {info.weights_hash}: train it again"
        )


def _decode_all(
    images: list[bytes], batch: bool, spec: ModelSpec, limits: imaging.ImageLimits, crop: float
) -> tuple[list[np.ndarray], list[int], list[dict[str, object]]]:
    """Pixels of every readable image, their positions, and a result row per image (errors filled
    in for a batch; a single bad image raises)."""
    results: list[dict[str, object]] = [{"index": i} for i in range(len(images))]
    pixels, decoded = [], []
    for i, data in enumerate(images):
        try:
            pixels.append(imaging.load_pixels(data, spec.input_size, limits, crop))
            decoded.append(i)
        except ServiceError as exc:
            if not batch:
                raise
            results[i]["error"] = {**exc.to_dict(), "status": exc.status}
    return pixels, decoded, results


def create_app(
    spec: ModelSpec,
    settings: ServiceSettings | None = None,
    runtime: Runtime | None = None,
    *,
    background_load: bool = True,
) -> Flask:
    """Build a model service. Tests pass a fake ``runtime`` and ``background_load=False``."""
    settings = settings or ServiceSettings.from_env(spec.name)

    def runtime_for(served: ModelSpec, plan: WeightsPlan) -> Runtime:
        """A runtime as the settings ask (backend, threads, precision)."""
        return make_runtime(
            served,
            plan,
            settings.backend,
            cache_dir=settings.cache_dir,
            intra_op_threads=settings.intra_op_threads,
            inter_op_threads=settings.inter_op_threads,
            precision=settings.precision,
            quantization=settings.quantization,
        )

    def build(version: int | None = None) -> Runtime:
        return runtime_for(spec, settings.weights_plan(spec, version))

    version = ""
    if settings.model_repository:
        version = str(repository.latest(settings.model_repository, spec.name))
    if runtime is None:
        runtime = build(int(version) if version else None)
    limits = imaging.ImageLimits(settings.max_image_bytes, settings.max_image_pixels)

    def batcher_for(runtime: Runtime, name: str) -> Batcher:
        return Batcher(
            runtime.predict,
            max_batch=settings.max_batch_size,
            window_ms=settings.batch_window_ms,
            policy=settings.admission,
            name=name,
            batch_max_wait_ms=settings.batch_priority_max_wait_ms,
        )

    # One model copy per process: every Gunicorn thread feeds this one batcher.
    batcher = batcher_for(runtime, spec.name)
    model = LoadedModel(spec, runtime, labels_mod.load(spec.labels_path), batcher, version)
    reloader = Reloader(model, settings.model_repository, build)

    def load_fine_tuned(
        folder: Path, name: str, number: int, meta: dict[str, Any], labels: labels_mod.Labels
    ) -> FineTuned:
        """A fine-tuned custom model as a model of its own: this service's input size and
        preprocessing, its ``model.keras``, the service's backend and precision, its own batcher."""
        own = replace(spec, name=name, builder=None, imagenet_file=None, imagenet_url=None, imagenet_md5=None)
        tuned_runtime = runtime_for(own, WeightsPlan("file", folder / repository.MODEL_FILE))
        loaded = LoadedModel(own, tuned_runtime, labels, batcher_for(tuned_runtime, name), str(number))
        loaded.load()
        if loaded.info is None:
            loaded.batcher.close()
            raise RuntimeError(loaded.error)
        return FineTuned(name, number, meta, labels, loaded)

    heads = HeadSet(
        settings.custom_models_dir,
        spec.name,
        load_fine_tuned,
        max_fine_tuned=settings.custom_max_fine_tuned,
        close_after_s=settings.default_deadline_s + 5,
    )

    app = Flask(spec.name)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.extensions["model"] = model
    app.extensions["batcher"] = batcher
    app.extensions["heads"] = heads
    web.install(app, drain_max_bytes=2 * settings.max_body_bytes)
    web.install_metrics(app, "service", lambda: spec.name)

    @app.get("/health/live")
    @app.get("/v2/health/live", endpoint="v2_live")
    def live() -> Response:
        if model.state == "failed":
            raise ServiceError(f"model failed to load: {model.error}", code="load_failed", status=503)
        return web.json_ok({"status": "alive"})

    @app.get("/health/ready")
    @app.get("/v2/health/ready", endpoint="v2_ready")
    def ready() -> Response:
        model.require_ready()
        return web.json_ok({"status": "ready"})

    def describe_heads() -> list[dict[str, Any]]:
        listed = []
        for head in heads.all():
            entry: dict[str, object] = {**head.describe(), "state": "ready"}
            if model.info is not None:
                try:
                    _check_fresh(head, model.info)
                except StaleCustomModel as exc:
                    entry.update(state="stale", reason=exc.message)
            listed.append(entry)
        return listed

    @app.get("/v1/model")
    def metadata() -> Response:
        available = (
            [str(v) for v in repository.versions(settings.model_repository, spec.name)]
            if settings.model_repository
            else []
        )
        return web.json_ok(
            {
                **model.metadata(),
                "features": model.info.features if model.info else None,
                "custom_models": describe_heads(),
                "custom_models_broken": [{"name": n, "reason": r} for n, r in sorted(heads.broken().items())],
                "custom_models_loading": [
                    {"name": n, "version": str(v)} for n, v in sorted(heads.loading().items())
                ],
                "max_fine_tuned": settings.custom_max_fine_tuned,
                "versions": available,
                "center_crop": settings.center_crop,
                "max_body_bytes": settings.max_body_bytes,
                "max_batch_images": settings.max_batch_images,
                "default_deadline_ms": settings.default_deadline_ms,
                "batching": batcher.describe(),
            }
        )

    @app.post("/v1/admin/reload")
    def admin_reload() -> Response:
        """Load the newest version beside the served one and swap (Authorization: Bearer <ADMIN_TOKEN>)."""
        if not settings.admin_token:
            raise NotFound("admin endpoints are off (set ADMIN_TOKEN)")
        supplied = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(supplied.encode(), settings.admin_token.encode()):
            raise ServiceError("a valid bearer token is required", code="unauthorized", status=401)
        return web.json_ok(reloader.reload())

    @app.get("/v1/labels")
    def labels() -> Response:
        """The labels of the service's model, or of a custom model it serves (``?model=``)."""
        name = request.args.get("model", "")
        custom = heads.get(name) if name and name != spec.name else None
        if name and name != spec.name and custom is None:
            raise UnknownModel(f"{spec.name} serves no custom model {name[:64]!r}")
        served = custom.labels if custom else model.labels
        return web.json_ok({"labels_hash": served.digest, "labels": served.to_json()})

    @app.post("/v1/predict")
    def predict() -> Response:
        """Top-k predictions for one image (raw body or ``file``) or several (``files``).

        Query: ``model`` (a custom model trained on this one; default: this one), ``top_k``,
        ``probabilities`` and ``features`` (the vectors custom models are trained on).
        Headers: ``X-Deadline-Ms`` (the budget), ``X-Priority`` (``interactive``, the default, or
        ``batch``: waits until no interactive request does, and runs as a batch of its own).
        """
        started = time.perf_counter()
        deadline = web.deadline(settings.default_deadline_s)
        priority = _request_priority()
        name = request.args.get("model", "")
        # A fine-tuned model runs on its own runtime and batcher; a head on the base's.
        route = _route(heads, name, spec, model)
        # More than the model has classes is clamped (the gateway's default 5 meets 4-class models).
        top_k = web.query_int("top_k", settings.default_top_k, 1, MAX_TOP_K)
        with_probabilities = web.query_flag("probabilities")
        with_features = web.query_flag("features")
        if with_features and (not route.info.features or route.target is not model):
            raise BadRequest(f"{name or spec.name} gives no features (base models do)", code="no_features")
        # Refuse before reading the body when even one image could not be served in time: the
        # cheapest refusal there is (the unread body is drained by web.DrainBody).
        route.target.batcher.check(1, deadline)
        images, batch = _request_images()
        if len(images) > settings.max_batch_images:
            raise BadRequest(
                f"{len(images)} images in one request; the limit is {settings.max_batch_images}",
                code="too_many_images",
            )
        if len(images) > 1:
            route.target.batcher.check(len(images), deadline)
        pixels, decoded, results = _decode_all(images, batch, spec, limits, settings.center_crop)
        del images  # a queued request holds its pixels only, not the encoded photo
        decoded_at = time.perf_counter()
        outputs = Outputs(np.empty((0, len(route.labels)), np.float32), np.empty((0, route.info.features)))
        queue_ms = 0.0
        if pixels:
            stacked = np.stack(pixels)
            del pixels
            try:
                job = route.target.batcher.submit(stacked, deadline=deadline, priority=priority)
            except BatcherClosed:  # the model was replaced since it was looked up: its successor answers
                route = _route(heads, name, spec, model)
                job = route.target.batcher.submit(stacked, deadline=deadline, priority=priority)
            del stacked
            try:
                outputs = job.future.result(timeout=max(0.0, deadline - time.monotonic()))
            except FutureTimeout:
                raise DeadlineExceeded("the model did not answer before the request's deadline") from None
            queue_ms = job.queue_ms
            served_by = (
                job.served_by if isinstance(job.served_by, tuple) else (route.info, route.target.version)
            )
            metrics.QUEUE_SECONDS.labels(spec.name).observe(queue_ms / 1000)
        else:
            served_by = (route.info, route.target.version)
        info, version = served_by
        custom, head, served_labels = route.custom, route.head, route.labels
        probabilities = outputs.probabilities
        if head is not None:
            _check_fresh(head, info)  # the base may have changed version while this one waited
            assert outputs.features is not None
            probabilities = head.apply(outputs.features)
        finished = time.perf_counter()
        for n, (i, row) in enumerate(zip(decoded, probabilities, strict=True)):
            results[i]["predictions"] = served_labels.top_k(row, top_k)
            if with_probabilities:
                results[i]["probabilities"] = encode_vector(row)
            if with_features and outputs.features is not None:
                results[i]["features"] = encode_vector(outputs.features[n])

        body: dict[str, object] = {
            "request_id": web.request_id(),
            "model": custom.name if custom else spec.name,
            # A custom model's answer names the base weights it was trained on (random or imagenet).
            "weights": (custom.meta.get("base_weights") or info.weights) if custom else info.weights,
            "weights_hash": custom.weights_hash if custom else info.weights_hash,
            "backend": info.backend,
            "precision": info.precision,
        }
        if head is not None:
            body |= {"version": str(head.version), "base": spec.name, "base_weights_hash": info.weights_hash}
            body |= {"base_version": version} if version else {}
        elif custom is not None:
            body |= {
                "version": str(custom.version),
                "base": spec.name,
                "base_weights_hash": custom.meta["base_weights_hash"],
                "fine_tune_layers": custom.meta["training"]["fine_tune_layers"],
            }
        elif version:
            body["version"] = version
        body["labels_hash"] = served_labels.digest
        if batch:
            body["results"] = results
        else:
            body.update({k: v for k, v in results[0].items() if k != "index"})
        body["timing_ms"] = {
            "decode": round((decoded_at - started) * 1000, 2),
            "queue": round(queue_ms, 2),
            "inference": round((finished - decoded_at) * 1000 - queue_ms, 2),
            "total": round((time.perf_counter() - started) * 1000, 2),
        }
        return web.json_ok(body)

    model.start(background=background_load)
    if settings.model_repository and settings.repository_poll_s > 0:
        reloader.poll(settings.repository_poll_s)
    if settings.custom_models_dir:
        heads.poll(settings.custom_poll_s)
    return app
