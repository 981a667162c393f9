"""The two ways a custom model is learned, behind one sequence (``workers.training.runner``):

- ``HeadLearner``: a softmax layer on the frozen base's features, which the base's service
  computes (at background priority, through the fleet client);
- ``TunedLearner``: the base's last ``fine_tune_layers`` layers and a head, trained together here
  with Keras (``workers.training.finetune``) on a copy of the base the trainer builds itself, from
  the weights the base's service names, and checks against the served weights' hash.

Each says how a batch of photos becomes the inputs it learns from (``batch``), how it fits
(``fit``), and what it publishes (``learned``); the runner does the rest the same way for both.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from common import imaging, repository
from common.errors import ServiceError, TooManyFineTuned
from common.models import ModelSpec
from common.training.settings import TrainingSettings
from common.wire import Priority
from fleet.client import ModelClient
from serving import preprocessing
from serving.runtime import build_keras_model
from serving.weights import WeightsPlan
from workers.training import fit

log = logging.getLogger("imagerec.training")
RETRYABLE = (500, 502, 503, 504)

Inputs = list[np.ndarray]
"""What a model learns from, one array per input of what is trained, one row per image: the
base's features for a head; the frozen layers' activations for fine-tuning."""
Held = tuple[Inputs, np.ndarray] | None
"""The held-out photos' inputs and labels, when the split holds any out."""
OnEpoch = Callable[[int, dict[str, float]], bool]
Epochs = Callable[..., OnEpoch]
"""``epochs(stage=..., offset=...)``: an ``on_epoch`` that records each epoch (False: cancelled)."""


class Cancelled(Exception):
    """The training job was cancelled (or expired) while it ran."""


class TrainingFailed(Exception):
    """The job cannot succeed; the message says why (for the record)."""


@dataclass
class Learned:
    """What training produced, for ``model.json`` and ``repository.publish``."""

    kind: str  # "head" | "fine-tuned"
    evaluation: dict[str, Any]
    base_weights: str | None
    base_hash: str
    features: int
    counts: dict[str, Any]
    write: Callable[[Path], None]


@dataclass
class Run:
    """What a learner is given of the training run: the job, the fleet, and the run's hooks."""

    job: dict[str, Any]
    client: ModelClient
    settings: TrainingSettings
    epochs: Epochs
    update: Callable[[dict[str, Any]], None]  # progress into the job's record
    cancelled: Callable[[], bool]
    retry_s: float  # how long a base that is down or busy is waited for
    sleep: Callable[[float], None]


class Fitted(Protocol):
    def probabilities(self, inputs: Inputs) -> np.ndarray: ...


class Learner(Protocol):
    def batch(self, images: list[bytes]) -> tuple[Inputs, list[int], dict[int, str]]:
        """The inputs of the readable ``images``, their positions, and why the others failed."""
        ...

    def fit(self, x: Inputs, y: np.ndarray, held: Held, classes: int) -> Fitted: ...

    def learned(self, fitted: Fitted, evaluation: dict[str, Any], counts: dict[str, Any]) -> Learned: ...


@dataclass
class _Head:
    fitted: fit.Fitted

    def probabilities(self, inputs: Inputs) -> np.ndarray:
        return self.fitted.probabilities(inputs[0])


class HeadLearner:
    """A softmax layer on the base's features, computed by the base's service."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.client = run.client
        self.base = run.job["base"]
        self.hashes: set[str] = set()  # the base weights every features call was computed with

    def batch(self, images: list[bytes]) -> tuple[Inputs, list[int], dict[int, str]]:
        vectors, errors = self._call(images)
        if len(self.hashes - {""}) > 1:  # found at the batch it happens, before any fitting
            raise TrainingFailed(f"{self.base} changed weights while features were computed: train again")
        found = [(k, vector) for k, vector in enumerate(vectors) if vector is not None]
        readable = [k for k, _ in found]
        rows = [np.stack([vector for _, vector in found])] if found else []
        return rows, readable, {k: error for k, error in enumerate(errors) if error}

    def fit(self, x: Inputs, y: np.ndarray, held: Held, classes: int) -> Fitted:
        validation = (held[0][0], held[1]) if held else None
        epochs = int(self.run.job["options"]["epochs"])
        return _Head(fit.fit(x[0], y, classes, epochs, validation, self.run.epochs()))

    def learned(self, fitted: Fitted, evaluation: dict[str, Any], counts: dict[str, Any]) -> Learned:
        """The head, once the base is known to serve the weights its features came from."""
        assert isinstance(fitted, _Head)
        base_hash = next(iter(self.hashes - {""}), "")
        registry = self.client.registry
        registry.refresh()
        base_meta = registry.metadata(self.base)
        if base_meta.get("weights_hash") not in (None, base_hash):
            raise TrainingFailed(
                f"{self.base} now serves other weights ({base_meta['weights_hash']}) than the features "
                f"were computed with ({base_hash}): the model would be stale at once; train again"
            )
        return Learned(
            kind="head",
            evaluation=evaluation,
            base_weights=base_meta.get("weights"),
            base_hash=base_hash,
            features=int(fitted.fitted.kernel.shape[0]),
            counts=counts,
            write=repository.write_head(fitted.fitted.kernel, fitted.fitted.bias),
        )

    def _call(self, images: list[bytes]) -> tuple[list[np.ndarray | None], list[str]]:
        """One features call, retried while the model is down or busy: (vectors, errors)."""
        retry_s = self.run.retry_s
        backoff, give_up = 0.5, time.monotonic() + retry_s
        while True:
            try:
                deadline = time.monotonic() + 60
                reply = self.client.predict(
                    self.base, images, top_k=1, features=True, priority=Priority.BACKGROUND, deadline=deadline
                )
                break
            except ServiceError as exc:
                if exc.status not in RETRYABLE:
                    if len(images) == 1:  # the one image was refused: it alone fails
                        return [None], [exc.message]
                    raise TrainingFailed(f"{self.base} refused the features request: {exc.message}") from None
                wait = float(exc.retry_after or backoff) * random.uniform(1.0, 1.5)
                backoff = min(backoff * 2, 5.0)
                if time.monotonic() + wait > give_up:
                    raise TrainingFailed(
                        f"{self.base} stayed unavailable for {retry_s:g}s: {exc.message}"
                    ) from None
                self.run.sleep(wait)
        self.hashes.add(reply.served.weights_hash or "")
        vectors: list[np.ndarray | None] = []
        errors: list[str] = []
        for result in reply.results:
            if result.features is not None:
                vectors.append(result.features.copy())
                errors.append("")
            else:
                vectors.append(None)
                errors.append(result.error.message if result.error else "not readable")
        return vectors, errors


class TunedLearner:
    """The base's last layers and a head, on the trainer's own copy of the base."""

    def __init__(self, run: Run) -> None:
        """Builds the copy (the job's record already says ``features``): ``TrainingFailed`` when
        its weights are not the served ones, or the base's service would not load the result."""
        from serving.runtime import weights_digest
        from workers.training import finetune

        self.run = run
        self.client, self.settings, job = run.client, run.settings, run.job
        self.base = job["base"]
        self.base_meta = self._ready_base()
        check_room(self.client, job)
        spec = base_spec(self.base, self.base_meta)
        plan = self._served_plan()
        model = build_keras_model(spec, plan)
        self.base_hash = weights_digest(model.get_weights())
        if self.base_hash != self.base_meta.get("weights_hash"):
            raise TrainingFailed(
                f"the trainer's copy of {self.base} ({plan.kind} weights) has weights {self.base_hash}, "
                f"but {self.base} serves {self.base_meta.get('weights_hash')}: fine-tuning needs the "
                f"weights the service loads (the same file, or the same seed)"
            )
        self.part = finetune.cut(model, int(job["options"]["fine_tune_layers"]))
        self.pixels_of, self.preprocess = self._decoder(spec)

    def check_budget(self, images: int) -> None:
        """Refuse, before any work, a dataset whose activations would not fit the cache budget."""
        # Held twice at the peak: the activations, and the training and held-out sets made from
        # them (then the activations go, and Keras copies the training set once).
        needed_mb = 2 * images * self.part.bytes_per_image() / 2**20
        if needed_mb > self.settings.fine_tune_cache_mb:
            raise TrainingFailed(
                f"the frozen layers' activations for {images} images would take {needed_mb:.0f} MB "
                f"(counted twice: they and the training set made of them), over "
                f"TRAINING_FINE_TUNE_CACHE_MB ({self.settings.fine_tune_cache_mb}): fine-tune fewer "
                f"layers (a deeper cut is smaller), or train on fewer images"
            )

    def batch(self, images: list[bytes]) -> tuple[Inputs, list[int], dict[int, str]]:
        from workers.training import finetune

        readable, pixels, failed = [], [], {}
        for k, data in enumerate(images):
            try:
                pixels.append(self.pixels_of(data))
                readable.append(k)
            except ServiceError as exc:
                failed[k] = exc.message
        if not readable:
            return [], [], failed
        outputs = finetune.activations(self.part.frozen, self.preprocess(np.stack(pixels)))
        return list(outputs), readable, failed

    def fit(self, x: Inputs, y: np.ndarray, held: Held, classes: int) -> Fitted:
        """A head on the last layers' outputs first, then those layers and the head together."""
        from workers.training import finetune

        run = self.run
        epochs, tuning = int(run.job["options"]["epochs"]), self.settings.fine_tune_epochs
        run.update({"epochs_total": epochs + tuning, "stage": "head"})
        features = finetune.features(self.part.trained, x)
        self.features = int(features.shape[1])
        validation = (finetune.features(self.part.trained, held[0]), held[1]) if held else None
        head = fit.fit(features, y, classes, epochs, validation, run.epochs(stage="head"))
        if run.cancelled():
            raise Cancelled(run.job["id"])
        run.update({"stage": "fine_tune"})
        rate = self.settings.fine_tune_learning_rate
        on_epoch = run.epochs(stage="fine_tune", offset=epochs)
        tuned: Fitted = finetune.fine_tune(self.part, head, x, y, tuning, rate, held, on_epoch)
        return tuned

    def learned(self, fitted: Fitted, evaluation: dict[str, Any], counts: dict[str, Any]) -> Learned:
        from workers.training import finetune

        classifier = finetune.classifier(self.part, fitted)  # type: ignore[arg-type]
        return Learned(
            kind=repository.FINE_TUNED,
            evaluation=evaluation,
            base_weights=self.base_meta.get("weights"),
            base_hash=self.base_hash,
            features=self.features,
            counts={
                **counts,
                "fine_tune_epochs": self.settings.fine_tune_epochs,
                "fine_tune_learning_rate": self.settings.fine_tune_learning_rate,
                "trained_layers": [self.part.layer_names[0], self.part.layer_names[-1]],
            },
            write=lambda target: classifier.save(target / repository.MODEL_FILE),
        )

    def _ready_base(self) -> dict[str, Any]:
        """What a ready replica of the base says of itself, waiting up to ``JOBS_RETRY_S`` for one."""
        registry, give_up = self.client.registry, time.monotonic() + self.run.retry_s
        while True:
            registry.refresh()
            if found := registry.metadata(self.base):
                return found
            if time.monotonic() >= give_up:
                raise TrainingFailed(f"{self.base} had no ready replica for {self.run.retry_s:g}s")
            self.run.sleep(1.0)

    def _served_plan(self) -> WeightsPlan:
        """The weights the base's service loaded, as it names them: a seed, or a file the trainer
        must be able to read at the same path (the Keras cache, the model repository)."""
        kind, source = str(self.base_meta.get("weights")), str(self.base_meta.get("weights_source") or "")
        if kind == "random":
            return WeightsPlan("random", seed=int(source.removeprefix("seed=") or 0))
        path = Path(source)
        if not path.is_file():
            log.warning("base weights unreadable", extra={"base": self.base, "path": source})
            raise TrainingFailed(
                f"{self.base} loads its weights from a file the trainer cannot read (its log names it): "
                "give the trainer the same file at the same path (as the model services mount it)"
            )
        return WeightsPlan(kind, path)

    def _decoder(
        self, spec: ModelSpec
    ) -> tuple[Callable[[bytes], np.ndarray], Callable[[np.ndarray], np.ndarray]]:
        """Photos to pixels as the base's service makes them (its size, crop and image limits, as
        its metadata says), and its preprocessing."""
        meta = self.base_meta
        limits = imaging.ImageLimits(int(meta["max_image_bytes"]), int(meta["max_image_pixels"]))
        size, crop = spec.input_size, float(meta["center_crop"])
        preprocess = preprocessing.get(spec.preprocessing)
        return (lambda data: imaging.load_pixels(data, size, limits, crop)), preprocess


def base_spec(base: str, meta: dict[str, Any]) -> ModelSpec:
    """The base's spec as its service describes itself (``/v1/model``): what the trainer needs to
    build the same Keras model, without importing the service."""
    try:
        return ModelSpec(
            name=base,
            input_size=int(meta["input_size"]),
            preprocessing=str(meta["preprocessing"]),
            builder=None if meta.get("builder") is None else str(meta["builder"]),
        )
    except (KeyError, TypeError, ValueError):
        raise TrainingFailed(
            f"{base}'s service does not describe its model; is it a current version?"
        ) from None


def check_room(client: ModelClient, job: dict[str, Any]) -> None:
    """Fail a fine-tuning the base's service would not load (``CUSTOM_MAX_FINE_TUNED``)."""
    try:
        client.registry.check_room_for_fine_tuned(job["base"], job["model"])
    except TooManyFineTuned as exc:
        raise TrainingFailed(exc.message) from None
