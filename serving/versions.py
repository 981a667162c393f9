"""The model a service serves, and how a newer version replaces it without a pause.

``LoadedModel`` holds a runtime with its state, labels, preprocessing and version. A new version
is loaded and warmed beside the old one, then swapped into the batcher in one step: the batch
running finishes on the old runtime, every later batch uses the new one, and each answer names the
version that computed it. ``Reloader`` finds the repository's newest version, on a poll or on the
admin endpoint's call; a version that fails to load leaves the old one serving.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import numpy as np

from common import labels as labels_mod
from common import metrics, repository
from common.errors import BadRequest, ModelNotReady, ServiceError
from common.models import ModelSpec
from serving import preprocessing
from serving.batching import Batcher
from serving.runtime import Outputs, Runtime, RuntimeInfo

log = logging.getLogger(__name__)


class LoadedModel:
    """A runtime plus its loading state, labels, preprocessing and version."""

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

    def _pipeline(self, runtime: Runtime) -> Callable[[np.ndarray], Outputs]:
        """What the batcher calls: queued uint8 pixels in, ``Outputs`` out (with the features custom
        heads need, when the runtime gives them). Requests wait as uint8 pixels (a quarter of
        float32) and are preprocessed a whole batch at a time."""
        preprocess = self.preprocess
        with_features = getattr(runtime, "predict_features", None)

        def predict(pixels: np.ndarray) -> Outputs:
            if with_features is not None:
                outputs: Outputs = with_features(preprocess(pixels))
                return outputs
            return Outputs(runtime.predict(preprocess(pixels)))

        return predict

    def _seed_batch_times(self, runtime: Runtime) -> None:
        """Time one call at batch 1 and at the largest batch, so admission has figures before the
        first request (each timed on its second call: the first may compile for the new shape)."""
        size = self.spec.input_size
        for batch in sorted({1, self.batcher.max_batch}):
            pixels = np.zeros((batch, size, size, 3), np.uint8)
            predict = self._pipeline(runtime)
            predict(pixels)
            started = time.monotonic()
            predict(pixels)
            self.batcher.times.observe(batch, time.monotonic() - started)

    def switch(self, runtime: Runtime, version: str) -> RuntimeInfo | None:
        """Load and warm ``runtime`` (the old one keeps serving meanwhile), then serve it. None when
        ``version`` is already served (a poll and an admin call can race: one loads it)."""
        with self._switching:
            if version == self.version:
                return None
            info = self._load(runtime)
            previous = self.version
            self.runtime, self.info, self.version = runtime, info, version
            self.batcher.swap(self._pipeline(runtime), (info, version))
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
            self._seed_batch_times(self.runtime)
        except Exception as exc:
            log.exception("loading %s failed", self.spec.name)
            self.state, self.error = "failed", f"{type(exc).__name__}: {exc}"
            return
        self.batcher.swap(self._pipeline(self.runtime), (info, self.version))
        self.info, self.state = info, "ready"
        metrics.MODEL_LOAD_SECONDS.labels(self.spec.name, info.backend).set(info.load_seconds)
        metrics.MODEL_READY.labels(self.spec.name).set(1)
        metrics.MODEL_PRECISION_BITS.labels(self.spec.name).set(
            8 if info.precision.startswith("int8") else 32
        )
        log.info(
            "%s ready: weights=%s (%s) hash=%s backend=%s precision=%s in %.1fs; ms per batch %s",
            self.spec.name,
            info.weights,
            info.weights_source,
            info.weights_hash,
            info.backend,
            info.precision,
            info.load_seconds,
            self.batcher.times.snapshot(),
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
            "precision": info.precision if info else None,
            **({"precision_note": info.precision_note} if info and info.precision_note else {}),
            "version": self.version or None,
            "classes": len(self.labels),
            "labels_hash": self.labels.digest,
            **({"error": self.error} if self.error else {}),
        }


class Reloader:
    """Serves the repository's newest version: on ``reload()`` (admin endpoint) or every ``poll_s``."""

    def __init__(self, model: LoadedModel, root: str, build: Callable[[int], Runtime]) -> None:
        self.model = model
        self.root = root
        self.build = build

    def reload(self) -> dict[str, object]:
        """Serve the repository's highest version if it is newer than the one served."""
        model, name = self.model, self.model.spec.name
        if not self.root:
            raise BadRequest("this service has no MODEL_REPOSITORY: nothing to reload", code="no_repository")
        newest = repository.latest(self.root, name)
        previous = model.version
        if model.info is None or str(newest) == previous:
            return {"version": previous, "previous": previous, "changed": False}
        try:
            info = model.switch(self.build(newest), str(newest))
            if info is None:  # another reload (the poller) got there first
                return {"version": model.version, "previous": previous, "changed": False}
        except Exception as exc:  # the served version keeps serving
            log.exception("%s version %d did not load", name, newest)
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

    def poll(self, every_s: float) -> None:
        """Check for a newer version every ``every_s`` seconds, in a background thread."""

        def loop() -> None:
            while True:
                time.sleep(every_s)
                try:
                    self.reload()
                except Exception:  # a broken new version: keep serving the old one, say why
                    log.exception("%s: the newest repository version did not load", self.model.spec.name)

        threading.Thread(target=loop, name=f"repository-{self.model.spec.name}", daemon=True).start()
