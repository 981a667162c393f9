"""The one model-service factory: every service is ``create_app(spec)`` with its own spec.

The model is loaded in a background thread of the Gunicorn worker (never the master), warmed with
one inference, and only then does ``/health/ready`` answer 200.
"""

from __future__ import annotations

import base64
import dataclasses
import hmac
import logging
import threading
import time
from collections.abc import Mapping
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flask import Flask, Response, request

from common import imaging, metrics, preprocessing, repository, web
from common import labels as labels_mod
from common.backends import default_cache_dir, make_runtime
from common.batching import Batcher
from common.errors import BadRequest, ModelNotReady, NotFound, ServiceError
from common.models import ModelSpec
from common.runtime import Runtime, RuntimeInfo
from common.settings import load, setting
from common.weights import WeightsPlan, resolve

log = logging.getLogger(__name__)
MAX_TOP_K = 1000


@dataclass(frozen=True)
class ServiceSettings:
    """Model-service settings: ``<FIELD>`` for every service, ``<MODEL>_<FIELD>`` for one."""

    weights: str = setting("auto", "imagenet | random | auto | path to a .keras or weights file")
    weights_seed: int = setting(0, "seed used when the weights are random")
    weights_download: bool = setting(True, "with WEIGHTS=imagenet, let Keras download a missing file")
    keras_home: str = setting("", "Keras cache root (weights in $KERAS_HOME/models); default ~/.keras")
    max_body_bytes: int = setting(16 * 1024 * 1024, "largest request body the service reads (413 above)")
    max_image_bytes: int = setting(10 * 1024 * 1024, "largest encoded image (413 above)")
    max_image_pixels: int = setting(40_000_000, "largest declared width x height, checked before decoding")
    max_batch_images: int = setting(32, "most images in one request, checked before decoding")
    center_crop: float = setting(0.875, "fraction of the shorter side kept by the centre crop")
    default_top_k: int = setting(5, "predictions returned when top_k is not given")
    backend: str = setting("auto", "auto | keras | openvino (auto: the fastest that loads and passes parity)")
    model_cache: str = setting("", "folder for converted backends (default ~/.cache/imagerec/converted)")
    max_batch_size: int = setting(8, "most images the batcher puts in one model call")
    max_batch_wait_ms: float = setting(5.0, "longest a batch waits to fill, and only under concurrent load")
    max_queue: int = setting(64, "requests waiting for the model before new ones get 503 + Retry-After")
    max_queue_delay_ms: float = setting(
        100.0,
        "refuse (503 + Retry-After) when the work admitted ahead would take longer than this "
        "or than the request's own inference, whichever is longer",
    )
    inference_timeout_s: float = setting(30.0, "longest a request waits for its batch (504 after)")
    model_repository: str = setting(
        "", "folder of versions <root>/<model>/<n>/<file>; the highest is served (overrides WEIGHTS)"
    )
    repository_poll_s: float = setting(
        0.0, "seconds between checks for a newer version (0: admin endpoint only)"
    )
    admin_token: str = setting("", "bearer token for POST /v1/admin/reload (empty: the endpoint is off)")
    intra_op_threads: int = setting(0, "threads per model call, TensorFlow or OpenVINO (0: library decides)")
    inter_op_threads: int = setting(0, "TensorFlow inter-op threads (0: TensorFlow decides)")

    @classmethod
    def from_env(cls, model: str, environ: Mapping[str, str] | None = None) -> ServiceSettings:
        return load(cls, ("", f"{model.upper()}_"), environ)

    def weights_plan(self, spec: ModelSpec, version: int | None = None) -> WeightsPlan:
        """Resolve ``WEIGHTS`` for ``spec`` (may download; fails early with instructions), or the
        repository's ``version`` (default: the highest) when ``MODEL_REPOSITORY`` is set."""
        if self.model_repository:
            chosen = version if version is not None else repository.latest(self.model_repository, spec.name)
            return resolve(spec, str(repository.weights_file(self.model_repository, spec.name, chosen)))
        return resolve(
            spec,
            self.weights,
            seed=self.weights_seed,
            keras_home=self.keras_home,
            allow_download=self.weights_download,
        )

    @property
    def cache_dir(self) -> Path:
        return Path(self.model_cache) if self.model_cache else default_cache_dir()


class LoadedModel:
    """A runtime plus its loading state, labels, preprocessing and version.

    ``switch`` serves a new version: loaded and warmed beside the old one, then swapped into the
    batcher in one step, so the batch running finishes on the old runtime and every later one
    uses the new; each answer names the version that computed it.
    """

    def __init__(
        self,
        spec: ModelSpec,
        runtime: Runtime,
        labels: labels_mod.Labels,
        batcher: Batcher,
        version: str = "",
    ) -> None:
        self.spec = spec
        self.runtime = runtime
        self.labels = labels
        self.batcher = batcher
        self.version = version
        self.preprocess = preprocessing.get(spec.preprocessing)
        self.state = "loading"
        self.error = ""
        self.info: RuntimeInfo | None = None
        self._switching = threading.Lock()

    def _load(self, runtime: Runtime) -> RuntimeInfo:
        info = runtime.load()
        if info.num_classes != len(self.labels):
            raise ValueError(f"model has {info.num_classes} outputs but {len(self.labels)} labels")
        return info

    def switch(self, runtime: Runtime, version: str) -> RuntimeInfo | None:
        """Load and warm ``runtime`` (the old one keeps serving meanwhile), then serve it. None when
        ``version`` is already served (a poll and an admin call can race: one loads it)."""
        with self._switching:
            if version == self.version:
                return None
            info = self._load(runtime)
            previous = self.version
            self.runtime, self.info, self.version = runtime, info, version
            self.batcher.swap(runtime.predict, (info, version))
        log.info(
            "%s now serves version %s (was %s), weights hash %s",
            self.spec.name,
            version,
            previous,
            info.weights_hash,
        )
        return info

    def load(self) -> None:
        try:
            info = self._load(self.runtime)
        except Exception as exc:
            log.exception("loading %s failed", self.spec.name)
            self.state, self.error = "failed", f"{type(exc).__name__}: {exc}"
            return
        self.batcher.swap(self.runtime.predict, (info, self.version))
        self.info, self.state = info, "ready"
        metrics.MODEL_LOAD_SECONDS.labels(self.spec.name, info.backend).set(info.load_seconds)
        metrics.MODEL_READY.labels(self.spec.name).set(1)
        log.info(
            "%s ready: weights=%s (%s) hash=%s backend=%s in %.1fs",
            self.spec.name,
            info.weights,
            info.weights_source,
            info.weights_hash,
            info.backend,
            info.load_seconds,
        )

    def start(self, background: bool = True) -> None:
        if background:
            threading.Thread(target=self.load, name=f"load-{self.spec.name}", daemon=True).start()
        else:
            self.load()

    def require_ready(self) -> RuntimeInfo:
        if self.info is None:
            raise ModelNotReady(
                f"{self.spec.name} is {self.state}" + (f": {self.error}" if self.error else "")
            )
        return self.info

    def metadata(self) -> dict[str, object]:
        info = self.info
        return {
            "name": self.spec.name,
            "state": self.state,
            "ready": info is not None,
            "input_size": self.spec.input_size,
            "preprocessing": self.spec.preprocessing,
            "weights": info.weights if info else None,
            "weights_source": info.weights_source if info else None,
            "weights_hash": info.weights_hash if info else None,
            "backend": info.backend if info else None,
            "version": self.version or None,
            "classes": len(self.labels),
            "labels_hash": self.labels.digest,
            **({"error": self.error} if self.error else {}),
        }


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


def encode_probabilities(probabilities: np.ndarray) -> dict[str, str]:
    """Full probability vector, compactly: little-endian float32, base64."""
    return {"dtype": "float32", "data": base64.b64encode(probabilities.astype("<f4").tobytes()).decode()}


def create_app(
    spec: ModelSpec,
    settings: ServiceSettings | None = None,
    runtime: Runtime | None = None,
    *,
    background_load: bool = True,
) -> Flask:
    """Build a model service. Tests pass a fake ``runtime`` and ``background_load=False``."""
    settings = settings or ServiceSettings.from_env(spec.name)

    def build(version: int | None = None) -> Runtime:
        return make_runtime(
            spec,
            settings.weights_plan(spec, version),
            settings.backend,
            cache_dir=settings.cache_dir,
            intra_op_threads=settings.intra_op_threads,
            inter_op_threads=settings.inter_op_threads,
        )

    version = ""
    if settings.model_repository:
        version = str(repository.latest(settings.model_repository, spec.name))
    if runtime is None:
        runtime = build(int(version) if version else None)
    limits = imaging.ImageLimits(settings.max_image_bytes, settings.max_image_pixels)
    # One model copy per process: every Gunicorn thread feeds this one batcher.
    batcher = Batcher(
        runtime.predict,
        max_batch=settings.max_batch_size,
        max_wait_ms=settings.max_batch_wait_ms,
        max_queue=settings.max_queue,
        max_delay_ms=settings.max_queue_delay_ms,
        name=spec.name,
    )
    model = LoadedModel(spec, runtime, labels_mod.load(spec.labels_path), batcher, version)

    def reload() -> dict[str, object]:
        """Serve the repository's highest version if it is newer than the one served."""
        if not settings.model_repository:
            raise BadRequest("this service has no MODEL_REPOSITORY: nothing to reload", code="no_repository")
        newest = repository.latest(settings.model_repository, spec.name)
        previous = model.version
        if model.info is None or str(newest) == previous:
            return {"version": previous, "previous": previous, "changed": False}
        try:
            info = model.switch(build(newest), str(newest))
            if info is None:  # another reload (the poller) got there first
                return {"version": model.version, "previous": previous, "changed": False}
        except Exception as exc:  # the served version keeps serving
            log.exception("%s version %d did not load", spec.name, newest)
            raise ServiceError(
                f"version {newest} did not load ({type(exc).__name__}: {exc}); still serving {previous}",
                code="reload_failed",
            ) from None
        return {
            "version": str(newest),
            "previous": previous,
            "changed": True,
            "weights_hash": info.weights_hash,
        }

    app = Flask(spec.name)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.extensions["model"] = model
    app.extensions["batcher"] = batcher
    web.install(app)
    metrics.install(app, "service", lambda: spec.name)

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

    @app.get("/v1/model")
    def metadata() -> Response:
        batching = {
            "max_batch_size": batcher.max_batch,
            "max_wait_ms": batcher.max_wait_s * 1000,
            "max_queue_delay_ms": batcher.max_delay_ms,
            **dataclasses.asdict(batcher.stats),
        }
        available = (
            [str(v) for v in repository.versions(settings.model_repository, spec.name)]
            if settings.model_repository
            else []
        )
        return web.json_ok(
            {
                **model.metadata(),
                "versions": available,
                "center_crop": settings.center_crop,
                "batching": batching,
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
        return web.json_ok(reload())

    @app.get("/v1/labels")
    def labels() -> Response:
        return web.json_ok({"labels_hash": model.labels.digest, "labels": model.labels.to_json()})

    @app.post("/v1/predict")
    def predict() -> Response:
        started, started_mono = time.perf_counter(), time.monotonic()
        info = model.require_ready()
        # More than the model has classes is clamped (the gateway's default 5 meets 4-class models).
        top_k = web.query_int("top_k", settings.default_top_k, 1, MAX_TOP_K)
        with_probabilities = web.query_flag("probabilities")
        served_by: tuple[RuntimeInfo, str] = (info, model.version)
        images, batch = _request_images()
        if len(images) > settings.max_batch_images:
            raise BadRequest(
                f"{len(images)} images in one request; the limit is {settings.max_batch_images}",
                code="too_many_images",
            )

        # Shed before decoding: a refusal costs microseconds, not a decode.
        with batcher.admit(len(images)):
            results: list[dict[str, object]] = [{"index": i} for i in range(len(images))]
            pixels, decoded = [], []
            for i, data in enumerate(images):
                try:
                    pixels.append(imaging.load_pixels(data, spec.input_size, limits, settings.center_crop))
                    decoded.append(i)
                except ServiceError as exc:
                    if not batch:
                        raise
                    results[i]["error"] = {**exc.to_dict(), "status": exc.status}
            decoded_at = time.perf_counter()
            probabilities = np.empty((0, len(model.labels)), np.float32)
            queue_ms = 0.0
            if pixels:
                budget_s = min(settings.inference_timeout_s, web.deadline_s() or settings.inference_timeout_s)
                job = batcher.submit(model.preprocess(np.stack(pixels)), deadline=started_mono + budget_s)
                try:
                    probabilities = job.future.result(
                        timeout=max(0.0, started_mono + budget_s - time.monotonic())
                    )
                except FutureTimeout:
                    raise ServiceError(
                        f"inference did not finish within {settings.inference_timeout_s:g}s",
                        code="inference_timeout",
                        status=504,
                    ) from None
                queue_ms = job.queue_ms
                if isinstance(job.served_by, tuple):
                    served_by = job.served_by
                metrics.QUEUE_SECONDS.labels(spec.name).observe(queue_ms / 1000)
        finished = time.perf_counter()
        for i, row in zip(decoded, probabilities, strict=True):
            results[i]["predictions"] = model.labels.top_k(row, top_k)
            if with_probabilities:
                results[i]["probabilities"] = encode_probabilities(row)

        info, version = served_by
        body: dict[str, object] = {
            "request_id": web.request_id(),
            "model": spec.name,
            "weights": info.weights,
            "weights_hash": info.weights_hash,
            "backend": info.backend,
            **({"version": version} if version else {}),
            "labels_hash": model.labels.digest,
        }
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

        def poll() -> None:
            while True:
                time.sleep(settings.repository_poll_s)
                try:
                    reload()
                except Exception:  # a broken new version: keep serving the old one, say why
                    log.exception("%s: the newest repository version did not load", spec.name)

        threading.Thread(target=poll, name=f"repository-{spec.name}", daemon=True).start()
    return app
