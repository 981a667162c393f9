"""Model runtimes: one protocol, so services never care which backend runs.

TensorFlow is imported inside methods only: importing this module stays cheap.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from common.errors import WeightsUnavailable
from common.models import ModelSpec
from serving.weights import WeightsPlan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RuntimeInfo:
    """What a loaded runtime reports in ``/v1/model`` and every response."""

    backend: str
    weights: str
    weights_source: str
    weights_hash: str
    num_classes: int
    load_seconds: float
    precision: str = "fp32"
    precision_note: str = ""  # why the precision served is not the one asked for, if it is not
    features: int = 0  # numbers per image predict_features gives (custom heads); 0: none
    streams: int = 1  # batches it computes at once, each from its own thread (OpenVINO streams)
    latency_form: bool = False  # beside its streams, one form on every core for a batch alone

    @property
    def precision_bits(self) -> int:
        """Bits of the numbers the model computes with: 8 (int8, int8-weights), 16 (bf16), 32."""
        return 8 if self.precision.startswith("int8") else 16 if self.precision == "bf16" else 32


@dataclass(frozen=True)
class Outputs:
    """A batch's answers: probabilities, and the features they came from (the input of the
    model's own classifier) when the runtime gives them - what custom heads are applied to."""

    probabilities: np.ndarray
    features: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.probabilities)

    def __getitem__(self, rows: slice) -> Outputs:
        features = None if self.features is None else self.features[rows]
        return Outputs(self.probabilities[rows], features)


class Runtime(Protocol):
    """``load()`` once, then ``predict()`` preprocessed float32 batches into probabilities, or
    ``predict_features()`` into ``Outputs``: the probabilities and, when ``RuntimeInfo.features``
    is not 0, the features custom heads learn from (one model call for both). A runtime whose
    ``pixels_in`` is true once loaded takes the uint8 pixels themselves and preprocesses them
    inside. One whose ``RuntimeInfo.streams`` is N may be called from N threads at once."""

    @property
    def pixels_in(self) -> bool: ...

    def load(self) -> RuntimeInfo: ...

    def predict(self, batch: np.ndarray) -> np.ndarray: ...

    def predict_features(self, batch: np.ndarray) -> Outputs: ...


def weights_digest(arrays: list[np.ndarray]) -> str:
    """Short hash of the actual numbers, so two replicas can be compared at a glance."""
    digest = hashlib.blake2b(digest_size=8)
    for array in arrays:
        digest.update(np.ascontiguousarray(array).view(np.uint8).data)
    return digest.hexdigest()


def build_keras_model(spec: ModelSpec, plan: WeightsPlan) -> Any:
    """Build the Keras model the plan describes (the reference path the parity tests use too)."""
    import keras

    if plan.kind == "file" and plan.path is not None and plan.path.suffix == ".keras":
        # safe_mode refuses Lambda layers' code (CVE-2025-1550 is fixed from Keras 3.9, pinned)
        return keras.models.load_model(plan.path, compile=False, safe_mode=True)
    if spec.builder is None:
        raise WeightsUnavailable(f"{spec.name} needs a .keras model file")
    builder = getattr(keras.applications, spec.builder)
    if plan.kind == "random":
        keras.utils.set_random_seed(plan.seed)
        return builder(weights=None)
    if plan.kind == "imagenet":
        try:
            return builder(weights=str(plan.path))
        except Exception as exc:  # e.g. a truncated or foreign file in the cache
            raise WeightsUnavailable(f"cannot load {plan.path} into {spec.name}: {exc}") from exc
    model = builder(weights=None)
    model.load_weights(plan.path)
    return model


class KerasRuntime:
    """Keras model behind a compiled direct call (never ``model.predict``, which is slow per call)."""

    pixels_in = False  # it takes preprocessed float32 batches

    def __init__(
        self, spec: ModelSpec, plan: WeightsPlan, *, intra_op_threads: int = 0, inter_op_threads: int = 0
    ) -> None:
        self.spec = spec
        self.plan = plan
        self.intra_op_threads = intra_op_threads
        self.inter_op_threads = inter_op_threads
        self._call: Any = None

    def load(self) -> RuntimeInfo:
        started = time.perf_counter()
        import tensorflow as tf

        if self.intra_op_threads:
            tf.config.threading.set_intra_op_parallelism_threads(self.intra_op_threads)
        if self.inter_op_threads:
            tf.config.threading.set_inter_op_parallelism_threads(self.inter_op_threads)
        import keras

        model = build_keras_model(self.spec, self.plan)
        size = self.spec.input_size
        signature = [tf.TensorSpec([None, size, size, 3], tf.float32)]
        features = 0
        both = model
        if self.spec.builder is not None:  # keras.applications: features feed the "predictions" layer
            classifier_input = model.layers[-1].input
            features = int(classifier_input.shape[-1])
            both = keras.Model(model.inputs, [model.output, classifier_input])
        self._call = tf.function(lambda x: both(x, training=False), input_signature=signature)
        self._features = bool(features)
        self.predict(np.zeros((1, size, size, 3), np.float32))  # trace + warm up before "ready"
        source = str(self.plan.path) if self.plan.path else f"seed={self.plan.seed}"
        return RuntimeInfo(
            backend=f"keras-{tf.__version__}" + ("-gpu" if tf.config.list_logical_devices("GPU") else ""),
            weights=self.plan.kind,
            weights_source=source,
            weights_hash=weights_digest(model.get_weights()),
            num_classes=int(model.output_shape[-1]),
            load_seconds=time.perf_counter() - started,
            features=features,
        )

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self.predict_features(batch).probabilities

    def predict_features(self, batch: np.ndarray) -> Outputs:
        out = self._call(batch)
        if not self._features:
            return Outputs(np.asarray(out))
        return Outputs(np.asarray(out[0]), np.asarray(out[1]))
