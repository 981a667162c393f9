"""Runtime backends and the choice between them (``BACKEND`` / ``<MODEL>_BACKEND``).

* ``keras``    - the Keras model behind a compiled call (imports TensorFlow in the service).
* ``openvino`` - the same weights converted to OpenVINO IR (fp32) in a child process, cached on
  disk under a key made of the weights' fingerprint and the library versions, and refused unless
  it passed parity with Keras. The serving process then never imports TensorFlow.
* ``auto``     - the fastest installed backend that loads and passes parity: openvino, else keras;
  on a machine with an NVIDIA GPU, keras first (TensorFlow puts the model on the GPU).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import ServiceError
from common.models import ModelSpec
from serving import bf16, preprocessing
from serving.convert import to_json
from serving.quantize import LAYOUT, Gate, choose
from serving.runtime import KerasRuntime, Outputs, Runtime, RuntimeInfo
from serving.weights import WeightsPlan

log = logging.getLogger(__name__)
BACKENDS = ("auto", "keras", "openvino")
PRECISIONS = ("auto", "fp32", "bf16", "int8")
"""``auto``: bf16 where the CPU computes it natively, it passes its gate and it measures faster here
(``serving.bf16``), else fp32."""


@dataclass(frozen=True)
class Quantization:
    """Where int8 calibrates and where int8 and bf16 are judged (None: the shipped photos' views),
    their gates, and whether int8 weights alone may serve when full int8 fails its gate
    (``serving.quantize``, ``serving.bf16``)."""

    calibration: Path | None = None
    validation: Path | None = None
    gate: Gate = Gate()
    weights_fallback: bool = True
    bf16_gate: Gate = Gate(min_top1=0.99, min_top5=0.9)

    def key(self) -> str:
        """Names the image sets in the cache key: the shipped set, or the folders' listings."""
        parts = []
        for folder in (self.calibration, self.validation):
            if folder is None:
                parts.append("shipped1")
                continue
            listing = hashlib.blake2b(digest_size=5)
            for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                stat = path.stat()
                listing.update(f"{path.relative_to(folder)}:{stat.st_size}:{stat.st_mtime_ns};".encode())
            parts.append(listing.hexdigest())
        return "-".join(parts)


class BackendUnavailable(ServiceError):
    status, code = 503, "backend_unavailable"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "imagerec" / "converted"


def _version(*packages: str) -> str:
    for package in packages:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "none"


def fingerprint(plan: WeightsPlan) -> str:
    """Identifies the weights without importing TensorFlow: the seed, or a hash of the file."""
    if plan.kind == "random" or plan.path is None:
        return f"random{plan.seed}"
    digest = hashlib.blake2b(digest_size=8)
    with open(plan.path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return f"{plan.kind}-{digest.hexdigest()}"


class OpenVINORuntime:
    """OpenVINO IR on the CPU, fp32 arithmetic (parity with Keras depends on it); with
    ``precision="int8"``, the fp32 IR quantized (``serving.quantize``): the first int8 form the gate
    admits, else fp32; with ``"bf16"``, bf16 arithmetic where the CPU has it natively and it passes
    its gate, and with ``"auto"`` only where it is also faster (``serving.bf16``), else fp32.

    ``streams``: batches computed at once, each on an OpenVINO stream of its own (its share of the
    cores; Triton's instance count). 1 is the latency hint, one batch on every core; 0 chooses by
    the precision served (``streams_for``); the number compiled is ``RuntimeInfo.streams``. Each
    calling thread has an infer request of its own, so that many threads may call at once.
    """

    def __init__(
        self,
        spec: ModelSpec,
        plan: WeightsPlan,
        *,
        cache_dir: Path,
        threads: int = 0,
        streams: int = 0,
        convert_timeout_s: float = 1800,
        precision: str = "fp32",
        quantization: Quantization = Quantization(),
        fused_preprocessing: bool = False,
        latency_form: bool = False,
    ) -> None:
        self.spec, self.plan, self.cache_dir = spec, plan, cache_dir
        self.latency_form = latency_form
        self.threads = threads
        self.streams = streams
        self.fused_preprocessing = fused_preprocessing
        self.pixels_in = False  # once loaded with fused preprocessing: predict() takes uint8 pixels
        self.convert_timeout_s = convert_timeout_s
        self.precision = precision
        self.quantization = quantization
        self._compiled: Any = None
        self._alone: Any = None  # the latency form, beside several streams (``latency_form``)
        self._requests = threading.local()  # each calling thread's infer request, per form
        self._in_flight = 0
        self._counting = threading.Lock()

    def cache_path(self) -> Path:
        versions = (
            f"keras{_version('keras')}-tf{_version('tensorflow-cpu', 'tensorflow')}-ov{_version('openvino')}"
        )
        return self.cache_dir / f"{self.spec.name}-{fingerprint(self.plan)}-{versions}"

    def int8_path(self) -> Path:
        return self.cache_path().with_name(
            f"{self.cache_path().name}-int8v{LAYOUT}-nncf{_version('nncf')}-{self.quantization.key()}"
        )

    def bf16_path(self, core: Any) -> Path:
        form = "fused" if self.fused_preprocessing else "plain"
        return self.cache_path().with_name(
            f"{self.cache_path().name}-bf16v{bf16.LAYOUT}-{bf16.cpu_key(core)}-{form}-{self.quantization.key()}"
        )

    def ensure_bf16_measured(self, core: Any) -> dict[str, Any]:
        """The bf16 record of this CPU (gate figures and timings), measuring first (child process)
        when none is cached."""
        options = ["--fused"] if self.fused_preprocessing else []
        if self.quantization.validation is not None:
            options += ["--validation", str(self.quantization.validation)]
        return self._child_record("serving.bf16", self.bf16_path(core), "bf16 measurement", options)

    def _bf16_verdict(self, core: Any) -> tuple[str, str]:
        """(precision to serve, why not the one asked for if not) for ``bf16`` and ``auto``."""
        if not bf16.native(core):
            listed = ", ".join(bf16.capabilities(core))
            return (
                "fp32",
                f"{self.precision}: this CPU computes no bf16 natively (it has {listed}); serving fp32",
            )
        try:
            record = self.ensure_bf16_measured(core)
        except Exception as exc:  # noqa: BLE001 - any failure to measure: serve fp32, say why
            note = f"bf16 unavailable, serving fp32: {exc}"
            log.warning("%s: %s", self.spec.name, note)
            return "fp32", note[:500]
        precision, note = bf16.choose(
            record, self.quantization.bf16_gate, must_be_faster=self.precision == "auto"
        )
        if note:
            log.warning("%s: %s", self.spec.name, note)
        return precision, note

    def ensure_quantized(self) -> dict[str, Any]:
        """The int8 record (gate figures included), quantizing first (child process) when none is
        cached. Quantizing a new version happens here too, before the swap, like its conversion."""
        options = []
        for flag, folder in (
            ("--calibration", self.quantization.calibration),
            ("--validation", self.quantization.validation),
        ):
            if folder is not None:
                options += [flag, str(folder)]
        return self._child_record("serving.quantize", self.int8_path(), "int8 quantization", options)

    def _child_record(self, module: str, path: Path, what: str, options: list[str]) -> dict[str, Any]:
        """``path/record.json``, made first by ``python -m <module>`` from the fp32 IR (a child
        process: NNCF, and a second compiled form, stay out of this one) when none is cached."""
        if not (path / "record.json").is_file():
            log.info("%s: %s into %s (once, then cached)", self.spec.name, what, path)
            fp32 = str(self.cache_path() / "model.xml")
            command = [sys.executable, "-m", module, "--spec", to_json(self.spec), "--fp32", fp32]
            self._run_child([*command, "--out", str(path), *options], path, what)
        record: dict[str, Any] = json.loads((path / "record.json").read_text())
        return record

    def _int8_verdict(self) -> tuple[Path, str, str]:
        """(IR to serve, its precision, why not full int8 if not): today's gate on the record."""
        fp32 = self.cache_path() / "model.xml"
        try:
            record = self.ensure_quantized()
        except Exception as exc:  # noqa: BLE001 - any failure to quantize: serve fp32, say why
            note = f"int8 unavailable, serving fp32: {exc}"
            log.warning("%s: %s", self.spec.name, note)
            return fp32, "fp32", note[:500]
        precision, note = choose(record, self.quantization.gate, self.quantization.weights_fallback)
        if note:
            log.warning("%s: %s", self.spec.name, note)
        model = fp32 if precision == "fp32" else self.int8_path() / precision / "model.xml"
        return model, precision, note

    def ensure_converted(self) -> dict[str, Any]:
        """The conversion record, converting first (in a child process) when none is cached."""
        path = self.cache_path()
        if not (path / "record.json").is_file():
            log.info("%s: converting to OpenVINO into %s (once per weights)", self.spec.name, path)
            command = [
                sys.executable,
                "-m",
                "serving.convert",
                "--spec",
                to_json(self.spec),
                "--plan",
                to_json(self.plan),
                "--out",
                str(path),
            ]
            self._run_child(command, path, "OpenVINO conversion")
        record: dict[str, Any] = json.loads((path / "record.json").read_text())
        return record

    def _run_child(self, command: list[str], path: Path, what: str) -> None:
        """Run a conversion step in a child process (TensorFlow and NNCF stay out of this one);
        it must leave ``path/record.json`` behind."""
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=self.convert_timeout_s,
            cwd=Path(__file__).resolve().parents[1],
        )
        if not (path / "record.json").is_file():
            raise BackendUnavailable(
                f"{what} of {self.spec.name} failed (exit {done.returncode}): {done.stderr[-2000:]}"
            )

    def load(self) -> RuntimeInfo:
        started = time.perf_counter()
        record = self.ensure_converted()
        parity = record["parity"]
        if not parity["passed"]:
            raise BackendUnavailable(
                f"OpenVINO {self.spec.name} failed parity with Keras (max |dp| {parity['max_abs_diff']:.2e}, "
                f"top-5 match {parity['top5_match']}); refusing to serve it"
            )
        import openvino as ov

        core = ov.Core()
        model, precision, note = self.cache_path() / "model.xml", "fp32", ""
        if self.precision == "int8":
            model, precision, note = self._int8_verdict()
        elif self.precision in ("bf16", "auto"):
            precision, note = self._bf16_verdict(core)
        config = compile_config(self.streams or streams_for(precision), self.threads, precision)
        graph = core.read_model(model)
        features = _expose_features(graph)
        if self.fused_preprocessing:
            graph = fold_preprocessing(graph, self.spec.preprocessing)
        self._compiled = core.compile_model(graph, "CPU", config)
        self.pixels_in = self.fused_preprocessing
        streams = int(self._compiled.get_property("NUM_STREAMS"))
        if self.latency_form and streams > 1:
            self._alone = core.compile_model(graph, "CPU", compile_config(1, self.threads, precision))
        del graph
        size = self.spec.input_size
        self.predict(np.zeros((1, size, size, 3), np.uint8 if self.pixels_in else np.float32))
        source = str(self.plan.path) if self.plan.path else f"seed={self.plan.seed}"
        return RuntimeInfo(
            backend=record["backend"],
            weights=self.plan.kind,
            weights_source=source,
            weights_hash=record["weights_hash"],
            num_classes=record["classes"],
            load_seconds=time.perf_counter() - started,
            precision=precision,
            precision_note=note,
            features=features,
            streams=max(1, streams),
            latency_form=self._alone is not None,
        )

    def _infer(self, batch: np.ndarray) -> Any:
        """One call on this thread's own infer request: OpenVINO runs the requests of several
        threads at once, each on a free stream (one request must not be used by two threads).
        With a latency form, a call that starts while no other runs takes it (every core for
        one batch: one client's request), else the streams (many clients')."""
        if self._alone is None:
            return self._request(False).infer(batch)
        with self._counting:
            alone = self._in_flight == 0
            self._in_flight += 1
        try:
            return self._request(alone).infer(batch)
        finally:
            with self._counting:
                self._in_flight -= 1

    def _request(self, alone: bool) -> Any:
        """This thread's infer request on the latency form (``alone``) or on the streams."""
        requests = getattr(self._requests, "by_form", None)
        if requests is None:
            requests = self._requests.by_form = {}
        request = requests.get(alone)
        if request is None:
            request = requests[alone] = (self._alone if alone else self._compiled).create_infer_request()
        return request

    def predict(self, batch: np.ndarray) -> np.ndarray:
        # NOTE: the result views the infer request's buffer, which the next call overwrites.
        return np.array(self._infer(batch)[0], copy=True)

    def predict_features(self, batch: np.ndarray) -> Outputs:
        out = self._infer(batch)
        features = np.array(out[1], copy=True) if len(out) > 1 else None
        return Outputs(np.array(out[0], copy=True), features)


def streams_for(precision: str) -> int:
    """``INFERENCE_STREAMS=0``: full int8 gets the throughput hint's streams (0 here; 2 on 2 cores),
    fp32 arithmetic one. Measured on 2 cores (docs/performance.md): int8 ResNet50's short calls
    lose to the threads of one stream waiting on each other, and two streams gave 7 % more goodput
    for 10 % less of its service's CPU an image; fp32's long calls keep both cores busy in one
    stream, and two were level (+1 %) for 80-200 MB more memory a model."""
    return 0 if precision == "int8" else 1


def compile_config(streams: int, threads: int, precision: str = "fp32") -> dict[str, Any]:
    """OpenVINO's CPU settings for ``streams`` batches at once (1: the latency hint; 0: the
    throughput hint's choice) on ``threads`` threads in all (0: every core), computing in the
    served ``precision``'s arithmetic."""
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": bf16.precision_hint(precision)}
    if streams == 1:
        config["PERFORMANCE_HINT"] = "LATENCY"
    else:
        config["PERFORMANCE_HINT"] = "THROUGHPUT"
        if streams:
            config["NUM_STREAMS"] = streams
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    return config


def fold_preprocessing(graph: Any, mode: str) -> Any:
    """The model's Keras preprocessing as the graph's first operations: uint8 NHWC pixels in, made
    float32, then (caffe) channels reversed and the ImageNet mean subtracted, or (tf) divided by
    127.5 and 1 subtracted - the float32 operations of ``serving.preprocessing``, so the answers are
    the same (tests/serving/test_backends.py), computed in the runtime's threads, not in NumPy
    (ResNet50 int8, a batch of 8: 18.7 ms against 22.4 with NumPy's caffe before the call)."""
    from openvino import Layout, Type
    from openvino.preprocess import PrePostProcessor

    if mode not in preprocessing.MODES:
        raise ValueError(f"no fused form of preprocessing mode {mode!r}")
    processor = PrePostProcessor(graph)
    image = processor.input(0)
    image.tensor().set_element_type(Type.u8).set_layout(Layout("NHWC"))
    image.model().set_layout(Layout("NHWC"))
    steps = image.preprocess().convert_element_type(Type.f32)
    if mode == "caffe":
        steps.reverse_channels().mean([float(v) for v in preprocessing.CAFFE_MEAN_BGR])
    else:  # tf
        steps.scale(127.5).mean(1.0)
    return processor.build()


def _expose_features(graph: Any) -> int:
    """Make the input of the model's last matrix product (its classifier: the pooled features, or
    VGG16's fc2) a second output; returns its width (0 when the graph has no such input).
    Quantization nodes in front of it are skipped: heads get the fp32 activations."""
    products = [op for op in graph.get_ordered_ops() if op.get_type_name() == "MatMul"]
    if not products:
        return 0
    source = products[-1].input_value(0)
    while source.get_node().get_type_name() in ("FakeQuantize", "Convert"):
        source = source.get_node().input_value(0)
    shape = source.get_partial_shape()
    if shape.rank.is_dynamic or shape.rank.get_length() != 2 or shape[1].is_dynamic:
        return 0
    graph.add_outputs([source])
    return int(shape[1].get_length())


class FirstWorking:
    """``auto``: load the candidates in order and serve with the first that loads."""

    def __init__(self, candidates: list[Runtime]) -> None:
        self.candidates = candidates
        self.active: Runtime | None = None

    def load(self) -> RuntimeInfo:
        error: Exception | None = None
        for candidate in self.candidates:
            try:
                info = candidate.load()
            except Exception as exc:
                log.warning("backend %s unavailable (%s); trying the next one", type(candidate).__name__, exc)
                error = exc
                continue
            self.active = candidate
            return info
        raise error or BackendUnavailable("no backend could be loaded")

    @property
    def pixels_in(self) -> bool:
        return self.active is not None and self.active.pixels_in

    def predict(self, batch: np.ndarray) -> np.ndarray:
        assert self.active is not None, "predict() before load()"
        return self.active.predict(batch)

    def predict_features(self, batch: np.ndarray) -> Outputs:
        assert self.active is not None, "predict_features() before load()"
        return self.active.predict_features(batch)


def make_runtime(
    spec: ModelSpec,
    plan: WeightsPlan,
    backend: str,
    *,
    cache_dir: Path,
    intra_op_threads: int = 0,
    inter_op_threads: int = 0,
    streams: int = 0,
    precision: str = "fp32",
    quantization: Quantization = Quantization(),
    fused_preprocessing: bool = True,
    latency_form: bool = True,
) -> Runtime:
    """The runtime the ``BACKEND``, ``PRECISION``, ``INFERENCE_STREAMS``, ``LATENCY_FORM`` and
    ``FUSED_PREPROCESSING`` settings ask for."""
    if backend not in BACKENDS:
        raise ValueError(f"BACKEND must be one of {', '.join(BACKENDS)}, got {backend!r}")
    keras = KerasRuntime(spec, plan, intra_op_threads=intra_op_threads, inter_op_threads=inter_op_threads)
    openvino = OpenVINORuntime(
        spec,
        plan,
        cache_dir=cache_dir,
        threads=intra_op_threads,
        streams=streams,
        precision=precision,
        quantization=quantization,
        fused_preprocessing=fused_preprocessing,
        latency_form=latency_form,
    )
    if backend == "keras":
        return keras
    if backend == "openvino":
        return openvino
    if gpu_present():  # TensorFlow runs the Keras model on the GPU; OpenVINO here is CPU-only
        return FirstWorking([keras, openvino])
    installed = importlib.util.find_spec("openvino") is not None
    return FirstWorking([openvino, keras] if installed else [keras])


def gpu_present() -> bool:
    """An NVIDIA GPU this process may use, judged without importing TensorFlow."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return os.path.exists("/dev/nvidiactl") and visible not in ("", "-1")
