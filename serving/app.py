"""The one model-service factory: every service is ``create_app(spec)`` with its own spec.

The model is loaded on the service's loader thread in the Gunicorn worker (never the master),
warmed, and timed at its batch sizes; only then does ``/health/ready`` answer 200. What the service
serves - its model's versions and the custom models trained on it - and how a version replaces
another is ``serving.manager``'s; a prediction is ``serving.predict``'s.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from flask import Flask, Response, request

from common import draining, repository, web
from common import labels as labels_mod
from common.errors import ModelNotReady, NotFound, ServiceError, UnknownModel
from common.models import ModelSpec
from serving.backends import make_runtime
from serving.batching import Batcher
from serving.custom import FineTuned, StaleCustomModel
from serving.explain import Explain
from serving.loaded import LoadedModel
from serving.manager import ModelManager
from serving.predict import Predict
from serving.runtime import Outputs, Runtime
from serving.settings import ServiceSettings
from serving.weights import WeightsPlan

__all__ = ["ServiceSettings", "create_app"]
log = logging.getLogger(__name__)


def create_app(
    spec: ModelSpec,
    settings: ServiceSettings | None = None,
    runtime: Runtime | None = None,
    *,
    background_load: bool = True,
) -> Flask:
    """Build a model service. Tests pass a fake ``runtime`` and ``background_load=False``."""
    settings = settings or ServiceSettings.from_env(spec.name)
    models = _manager(spec, settings, runtime)
    predict = Predict(spec, settings, models)
    explain = Explain(predict)

    app = Flask(spec.name)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.extensions["models"] = models
    web.install(app, drain_max_bytes=2 * settings.max_body_bytes)
    web.install_metrics(app, "service", lambda: spec.name)

    def live() -> Response:
        if models.base.state == "failed":
            raise ServiceError(f"model failed to load: {models.base.error}", code="load_failed", status=503)
        return web.json_ok({"status": "alive"})

    def ready() -> Response:
        models.base.require_ready()
        return web.json_ok({"status": "ready"})

    @app.before_request
    def _drain() -> None:
        """Stopping: predictions and readiness say not ready, so gateways go elsewhere."""
        if request.endpoint in ("predict", "explain", "ready", "v2_ready") and draining.draining():
            raise ModelNotReady(f"{spec.name} is stopping (draining); ask another replica")

    def reload() -> Response:
        """Load the newest version beside the served one and swap (Authorization: Bearer <ADMIN_TOKEN>)."""
        if not settings.admin_token:
            raise NotFound("admin endpoints are off (set ADMIN_TOKEN)")
        supplied = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(supplied.encode(), settings.admin_token.encode()):
            raise ServiceError("a valid bearer token is required", code="unauthorized", status=401)
        return web.json_ok(models.reload())

    def labels() -> Response:
        """The labels of the service's model, or of a custom model it serves (``?model=``)."""
        name = request.args.get("model", "")
        custom = models.get(name) if name and name != spec.name else None
        if name and name != spec.name and custom is None:
            raise UnknownModel(f"{spec.name} serves no custom model {name[:64]!r}")
        served = custom.labels if custom else models.base.labels
        return web.json_ok({"labels_hash": served.digest, "labels": served.to_json()})

    for rule, endpoint, view, methods in (
        ("/health/live", "live", live, ["GET"]),
        ("/v2/health/live", "v2_live", live, ["GET"]),
        ("/health/ready", "ready", ready, ["GET"]),
        ("/v2/health/ready", "v2_ready", ready, ["GET"]),
        ("/v1/model", "metadata", lambda: web.json_ok(metadata(models, settings)), ["GET"]),
        ("/v1/admin/reload", "admin_reload", reload, ["POST"]),
        ("/v1/labels", "labels", labels, ["GET"]),
        ("/v1/predict", "predict", lambda: web.json_ok(predict()), ["POST"]),
        ("/v1/explain", "explain", lambda: web.json_ok(explain()), ["POST"]),
    ):
        app.add_url_rule(rule, endpoint, view, methods=methods)

    models.start(background=background_load)
    if settings.repository_poll_s > 0 and (settings.model_repository or settings.custom_models_dir):
        models.poll(settings.repository_poll_s)
    return app


def metadata(models: ModelManager, settings: ServiceSettings) -> dict[str, Any]:
    """``GET /v1/model``: the model serving, its custom models, versions, limits and batching."""
    base = models.base
    listed = []
    for found in models.all():
        entry: dict[str, object] = {**found.describe(), "state": "ready"}
        if base.info is not None:
            try:
                found.check_fresh(base.info)
            except StaleCustomModel as exc:
                entry.update(state="stale", reason=exc.message)
        listed.append(entry)
    return {
        **base.metadata(),
        "features": base.info.features if base.info else None,
        "custom_models": listed,
        "custom_models_broken": [{"name": n, "reason": r} for n, r in sorted(models.broken().items())],
        "custom_models_loading": [
            {"name": n, "version": str(v)} for n, v in sorted(models.loading().items())
        ],
        **({"ready": False, "state": "draining"} if draining.draining() else {}),
        "max_fine_tuned": settings.custom_max_fine_tuned,
        "versions": [str(v) for v in models.versions()],
        "center_crop": settings.center_crop,
        "max_image_bytes": settings.max_image_bytes,
        "max_image_pixels": settings.max_image_pixels,
        "max_body_bytes": settings.max_body_bytes,
        "max_request_images": settings.max_request_images,
        "default_deadline_ms": settings.default_deadline_ms,
        "batching": base.batcher.describe(),
    }


def _manager(spec: ModelSpec, settings: ServiceSettings, given: Runtime | None) -> ModelManager:
    """The service's models: its base (``given`` for the first version, when a test hands one in)
    and the custom models trained on it, each with a runtime as the settings ask and a batcher of
    its own."""
    runtimes = [given] if given is not None else []
    labels = labels_mod.load(spec.labels_path)

    def runtime_for(served: ModelSpec, plan: WeightsPlan) -> Runtime:
        return make_runtime(
            served,
            plan,
            settings.backend,
            cache_dir=settings.cache_dir,
            intra_op_threads=settings.intra_op_threads,
            inter_op_threads=settings.inter_op_threads,
            streams=settings.inference_streams,
            precision=settings.precision,
            quantization=settings.quantization,
            fused_preprocessing=settings.fused_preprocessing,
            latency_form=settings.latency_form,
        )

    def batcher_for(name: str) -> Callable[[Callable[[np.ndarray], Outputs]], Batcher]:
        return lambda predict: Batcher(
            predict,
            max_batch=settings.max_batch_size,
            window_ms=settings.batch_window_ms,
            policy=settings.admission,
            name=name,
            background_max_wait_ms=settings.background_max_wait_ms,
            background_idle_ms=settings.background_idle_ms,
        )

    def build_base(version: int | None) -> LoadedModel:
        runtime = runtimes.pop() if runtimes else runtime_for(spec, settings.weights_plan(spec, version))
        named = "" if version is None else str(version)
        return LoadedModel(spec, runtime, labels, batcher_for(spec.name), named)

    def load_fine_tuned(
        folder: Path, name: str, number: int, meta: dict[str, Any], labels: labels_mod.Labels
    ) -> FineTuned:
        """This service's input size and preprocessing, its ``model.keras``, the service's backend
        and precision."""
        own = replace(spec, name=name, builder=None, imagenet_file=None, imagenet_url=None, imagenet_md5=None)
        tuned = runtime_for(own, WeightsPlan("file", folder / repository.MODEL_FILE))
        loaded = LoadedModel(own, tuned, labels, batcher_for(name), str(number))
        if not loaded.load():
            loaded.close()
            raise RuntimeError(loaded.error)
        return FineTuned(name, number, meta, labels, loaded)

    return ModelManager(
        spec.name,
        build_base,
        versions_dir=settings.model_repository,
        custom_dir=settings.custom_models_dir,
        load_fine_tuned=load_fine_tuned,
        max_fine_tuned=settings.custom_max_fine_tuned,
    )
