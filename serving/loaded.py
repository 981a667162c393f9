"""One model a service serves: a runtime with its batcher, state, labels, preprocessing and version.

The service's own model and each fine-tuned custom model is one of these, one per version: a new
version is a new ``LoadedModel``, loaded, warmed and timed beside the old one, which
``serving.manager`` swaps in and then closes (its batcher answers what it queued, then stops).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from common import labels as labels_mod
from common import metrics
from common.errors import ModelNotReady
from common.models import ModelSpec
from serving import preprocessing
from serving.batching import Batcher
from serving.runtime import Outputs, Runtime, RuntimeInfo

log = logging.getLogger(__name__)
# Timed calls of each batch size at warm-up, after its compiling one; the fastest is kept.
WARM_TIMINGS = 2


class LoadedModel:
    """A runtime plus its loading state, labels, preprocessing and version."""

    def __init__(
        self,
        spec: ModelSpec,
        runtime: Runtime,
        labels: labels_mod.Labels,
        batcher_for: Callable[[Callable[[np.ndarray], Outputs]], Batcher],
        version: str = "",
    ) -> None:
        """``batcher_for(predict)``: this model's own batcher, feeding ``predict``."""
        self.spec = spec
        self.runtime = runtime
        self.labels = labels
        self.version = version
        self.preprocess = preprocessing.get(spec.preprocessing)
        self.batcher = batcher_for(self._pipeline(runtime))
        self.state = "loading"
        self.error = ""
        self.info: RuntimeInfo | None = None

    def _load(self, runtime: Runtime) -> RuntimeInfo:
        info = runtime.load()
        if info.num_classes != len(self.labels):
            raise ValueError(f"model has {info.num_classes} outputs but {len(self.labels)} labels")
        return info

    def _pipeline(self, runtime: Runtime) -> Callable[[np.ndarray], Outputs]:
        """What the batcher calls: queued uint8 pixels in, ``Outputs`` out (with the features custom
        heads need, when the runtime gives them). Requests wait as uint8 pixels (a quarter of
        float32) and are preprocessed a whole batch at a time - here, or inside a runtime that takes
        the pixels themselves (``pixels_in``: OpenVINO with the preprocessing in its graph)."""
        preprocess = self.preprocess

        def predict(pixels: np.ndarray) -> Outputs:
            return runtime.predict_features(pixels if runtime.pixels_in else preprocess(pixels))

        return predict

    def _seed_batch_times(self, runtime: Runtime, streams: int, alone_form: bool = False) -> None:
        """Warm and time every batch size the batcher can form, 1 to ``max_batch``, before the model
        serves: a runtime's first call at a new shape compiles for it (1.5-3x a warm call), which
        no request should pay, and admission has a figure for every size from the first request.
        Every size is compiled first, then timed in ``WARM_TIMINGS`` passes over all sizes and
        its fastest kept: the fleet's services warm up on the same cores at once, and contention
        only slows a call.
        The figure is a seed: the size's first served call replaces it (``BatchTimes``). With
        several streams, each size runs on ``streams`` threads at once, so every stream sees it, and
        is timed as under load: while the other streams compute too. A runtime with a latency form
        beside its streams (``alone_form``, ``LATENCY_FORM``) first runs each size once alone, on
        that form (the calls of one client)."""
        size = self.spec.input_size
        predict = self._pipeline(runtime)
        together = threading.Barrier(streams, timeout=60)

        def timed(pixels: np.ndarray) -> float:
            together.wait()  # every call on a thread, and so a stream, of its own
            started = time.monotonic()
            predict(pixels)
            return time.monotonic() - started

        sizes = range(1, self.batcher.max_batch + 1)
        pixels = {n: [np.zeros((n, size, size, 3), np.uint8) for _ in range(streams)] for n in sizes}
        fastest = dict.fromkeys(sizes, float("inf"))
        with ThreadPoolExecutor(streams, thread_name_prefix=f"warm-{self.spec.name}") as pool:
            for batch in sizes:
                if alone_form:
                    predict(pixels[batch][0])  # alone: compiles the latency form for this shape
                list(pool.map(timed, pixels[batch]))  # compiles for this shape
            # timed in passes over every size, not size after size: a burst of start-up work
            # beside (the fleet's other processes importing) slows one pass, not every timing
            # of one size (ResNet50 bf16, batch 1: 30.2 ms at start, 12.3 served, when timed
            # twice in a row)
            for _ in range(WARM_TIMINGS):
                for batch in sizes:
                    took = sum(pool.map(timed, pixels[batch])) / streams
                    fastest[batch] = min(fastest[batch], took)
        for batch in sizes:
            self.batcher.times.seed(batch, fastest[batch])

    def load(self) -> bool:
        """Load, check, warm and time the model; False (``state`` failed, ``error`` why) when it
        does not load."""
        try:
            info = self._load(self.runtime)
            self._seed_batch_times(self.runtime, info.streams, info.latency_form)
            self.batcher.run_at_once(info.streams)
        except Exception as exc:
            log.exception("loading %s failed", self.spec.name)
            self.state, self.error = "failed", f"{type(exc).__name__}: {exc}"
            return False
        self.info, self.state = info, "ready"
        metrics.MODEL_LOAD_SECONDS.labels(self.spec.name, info.backend).set(info.load_seconds)
        metrics.MODEL_READY.labels(self.spec.name).set(1)
        metrics.MODEL_PRECISION_BITS.labels(self.spec.name).set(info.precision_bits)
        log.info(
            "%s ready: weights=%s (%s) hash=%s backend=%s precision=%s streams=%d in %.1fs; ms per batch %s",
            self.spec.name,
            info.weights,
            info.weights_source,
            info.weights_hash,
            info.backend,
            info.precision,
            info.streams,
            info.load_seconds,
            self.batcher.times.snapshot(),
        )
        return True

    def close(self) -> None:
        """No longer served: answer what is queued, then let the runtime go."""
        self.batcher.close()

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
            "builder": self.spec.builder,  # what a trainer builds its copy with (None: a .keras file)
            "weights": info.weights if info else None,
            "weights_source": info.weights_source if info else None,
            "weights_hash": info.weights_hash if info else None,
            "backend": info.backend if info else None,
            "precision": info.precision if info else None,
            "streams": info.streams if info else None,
            **({"precision_note": info.precision_note} if info and info.precision_note else {}),
            "version": self.version or None,
            "classes": len(self.labels),
            "labels_hash": self.labels.digest,
            **({"error": self.error} if self.error else {}),
        }
