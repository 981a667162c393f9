"""A model service's settings: ``<FIELD>`` for every service, ``<MODEL>_<FIELD>`` for one."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from common import repository
from common.models import ModelSpec
from common.settings import load, refuse_renamed, setting
from serving.admission import AdmissionPolicy
from serving.backends import PRECISIONS, Quantization, default_cache_dir
from serving.quantize import Gate
from serving.weights import WeightsPlan, resolve

# Settings whose meaning changed: refused at start-up, naming what replaced them, so a deployment
# that still sets one learns at once instead of silently running on the new defaults.
RENAMED = {
    "MAX_QUEUE_DELAY_MS": "DEFAULT_DEADLINE_MS and MAX_QUEUE_IMAGES (admission is by deadline now)",
    "MAX_QUEUE": "MAX_QUEUE_IMAGES (the queue is counted in images)",
    "MAX_BATCH_WAIT_MS": "BATCH_WINDOW_MS",
    "INFERENCE_TIMEOUT_S": "DEFAULT_DEADLINE_MS",
    "BATCH_PRIORITY_MAX_WAIT_MS": "BACKGROUND_MAX_WAIT_MS (X-Priority: batch is now background)",
    "MAX_BATCH_IMAGES": "MAX_REQUEST_IMAGES ('batch' names the batcher's model calls)",
    "CUSTOM_POLL_S": "REPOSITORY_POLL_S (one poller looks at MODEL_REPOSITORY and CUSTOM_MODELS_DIR)",
}


@dataclass(frozen=True)
class ServiceSettings:
    """Model-service settings: ``<FIELD>`` for every service, ``<MODEL>_<FIELD>`` for one."""

    weights: str = setting("auto", "imagenet | random | auto | path to a .keras or weights file")
    weights_seed: int = setting(0, "seed used when the weights are random")
    explain_grid: int = setting(
        7, "cells per side of an explanation's occlusion grid when the request names none"
    )
    explain_max_passes: int = setting(
        101, "most forward passes one explanation may cost (grid² + 1: a 10 x 10 grid at most by default)"
    )
    weights_download: bool = setting(
        True, "with WEIGHTS=imagenet or auto, let Keras download a missing ImageNet file (hash-checked)"
    )
    weights_base_url: str = setting(
        "", "where that download comes from: a mirror holding Keras' paths (empty: Keras' own address)"
    )
    weights_download_timeout_s: float = setting(
        3.0,
        "the download's connect time-out (name lookup included) and read time-out; offline, WEIGHTS=auto "
        "falls back to random weights after about this long",
    )
    keras_home: str = setting("", "Keras cache root (weights in $KERAS_HOME/models); default ~/.keras")
    max_body_bytes: int = setting(16 * 1024 * 1024, "largest request body the service reads (413 above)")
    max_image_bytes: int = setting(10 * 1024 * 1024, "largest encoded image (413 above)")
    max_image_pixels: int = setting(40_000_000, "largest declared width x height, checked before decoding")
    max_request_images: int = setting(32, "most images in one request, checked before decoding")
    center_crop: float = setting(0.875, "fraction of the shorter side kept by the centre crop")
    default_top_k: int = setting(5, "predictions returned when top_k is not given")
    backend: str = setting("auto", "auto | keras | openvino (auto: the fastest that loads and passes parity)")
    model_cache: str = setting("", "folder for converted backends (default ~/.cache/imagerec/converted)")
    precision: str = setting(
        "auto",
        "auto | fp32 | bf16 | int8. fp32: f32 arithmetic (Keras parity); bf16: OpenVINO's bf16 where "
        "the CPU computes it natively (AVX-512 BF16 or AMX) and it passes its gate, else fp32; auto: "
        "bf16 only where it is also measured faster here, else fp32; int8: NNCF post-training "
        "quantization, served if it passes its gate",
    )
    calibration_dir: str = setting("", "images to calibrate int8 on (default: views of the shipped photos)")
    validation_dir: str = setting("", "images the int8 gate compares on (default: other views of them)")
    int8_min_top1: float = setting(0.9, "int8 gate: least share of validation images with fp32's top-1")
    int8_min_top5: float = setting(0.8, "int8 gate: least mean share of fp32's top-5 in int8's top-5")
    bf16_min_top1: float = setting(0.99, "bf16 gate: least share of validation images with fp32's top-1")
    bf16_min_top5: float = setting(0.9, "bf16 gate: least mean share of fp32's top-5 in bf16's top-5")
    int8_weights_fallback: bool = setting(
        True,
        "when full int8 fails the gate, serve int8 weights with fp32 activations if they pass it "
        "(the memory saving without the speed); false: fp32",
    )
    max_batch_size: int = setting(8, "most images the batcher puts in one model call")
    batch_window_ms: float = setting(
        5.0,
        "longest the first request of a batch waits for more, and only under concurrent load "
        "(Triton's max_queue_delay)",
    )
    background_max_wait_ms: float = setting(
        1000.0,
        "a job or training request (X-Priority: background) waiting this long goes before interactive "
        "ones, so a saturated model still serves them one call per period",
    )
    background_idle_ms: float = setting(
        20.0,
        "a background call (jobs, training, explanations) starts only once no interactive batch has "
        "finished for this long: a client sending its next photo straight away never waits behind one",
    )
    max_queue_images: int = setting(
        64, "images waiting for the model (besides the batch running); beyond it, 503 + Retry-After"
    )
    default_deadline_ms: float = setting(
        30_000.0,
        "deadline of a request that brings none (X-Deadline-Ms, timeout_ms): admitted only if it "
        "can be answered within it, 504 if it still is not",
    )
    model_repository: str = setting(
        "", "folder of versions <root>/<model>/<n>/<file>; the highest is served (overrides WEIGHTS)"
    )
    repository_poll_s: float = setting(
        2.0,
        "seconds between looks at MODEL_REPOSITORY and CUSTOM_MODELS_DIR for new, replaced or removed "
        "versions (0: at start-up, and the base's versions on the admin endpoint, only)",
    )
    custom_models_dir: str = setting(
        "",
        "repository of custom models trained here (<dir>/<name>/<n>/); a base model's service serves "
        "those trained on it (empty: none)",
    )
    custom_max_fine_tuned: int = setting(
        2,
        "most fine-tuned custom models (fine_tune_layers > 0) one service loads: each is a copy of "
        "the backbone in memory (heads on the frozen backbone are not counted)",
    )
    admin_token: str = setting("", "bearer token for POST /v1/admin/reload (empty: the endpoint is off)")
    intra_op_threads: int = setting(
        0, "threads the model computes on, TensorFlow or OpenVINO (its streams together; 0: library decides)"
    )
    inter_op_threads: int = setting(0, "TensorFlow inter-op threads (0: TensorFlow decides)")
    inference_streams: int = setting(
        0,
        "batches the model computes at once, each on its own OpenVINO stream with its share of the "
        "cores (Triton's instance count). 0: by precision - full int8 gets OpenVINO's throughput "
        "choice for the machine (2 on 2 cores), fp32 one; 1: one batch at a time on every core (the "
        "latency hint). The Keras backend computes one",
    )
    latency_form: bool = setting(
        True,
        "with several streams, also compile the model as one stream on every core (OpenVINO's "
        "latency hint) for a batch that starts while no other runs: one client's request gets "
        "every core, many clients' the streams (costs a second copy of the compiled model)",
    )
    fused_preprocessing: bool = setting(
        True,
        "OpenVINO runs the model's preprocessing (uint8 pixels in) as its graph's first operations; "
        "false: NumPy does it before the call (the same arithmetic, ~0.5 ms an image more on ResNet50)",
    )

    @classmethod
    def from_env(cls, model: str, environ: Mapping[str, str] | None = None) -> ServiceSettings:
        env = os.environ if environ is None else environ
        prefixes = ("", f"{model.upper()}_")
        refuse_renamed(env, RENAMED, prefixes)
        return load(cls, prefixes, env)

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
            base_url=self.weights_base_url,
            timeout_s=self.weights_download_timeout_s,
        )

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"PRECISION must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.inference_streams < 0:
            streams = self.inference_streams
            raise ValueError(f"INFERENCE_STREAMS must be 0 (by precision) or more, got {streams}")
        if self.precision in ("int8", "bf16") and self.backend == "keras":
            raise ValueError(
                f"PRECISION={self.precision} needs the OpenVINO backend (BACKEND=auto or openvino)"
            )

    @property
    def quantization(self) -> Quantization:
        return Quantization(
            Path(self.calibration_dir) if self.calibration_dir else None,
            Path(self.validation_dir) if self.validation_dir else None,
            Gate(self.int8_min_top1, self.int8_min_top5),
            self.int8_weights_fallback,
            Gate(self.bf16_min_top1, self.bf16_min_top5),
        )

    @property
    def cache_dir(self) -> Path:
        return Path(self.model_cache) if self.model_cache else default_cache_dir()

    @property
    def admission(self) -> AdmissionPolicy:
        return AdmissionPolicy(max_queue_images=self.max_queue_images)

    @property
    def default_deadline_s(self) -> float:
        return self.default_deadline_ms / 1000
