"""Backend choice: auto prefers a converted backend that passed parity, refuses one that did not."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from common import imaging
from common.models import ModelSpec
from services import resnet50
from serving import preprocessing
from serving.backends import (
    BackendUnavailable,
    FirstWorking,
    OpenVINORuntime,
    compile_config,
    fingerprint,
    make_runtime,
    streams_for,
)
from serving.convert import compare
from serving.runtime import KerasRuntime, Outputs, RuntimeInfo
from serving.weights import WeightsPlan
from tests.e2e import shapes
from tests.helpers import photo

PLAN = WeightsPlan("random", seed=5)
PHOTOS = ("chelsea.jpg", "coffee.jpg")


def test_parity_verdict() -> None:
    reference = np.array([[0.5, 0.3, 0.1, 0.05, 0.03, 0.02]], np.float32)
    assert compare(reference, reference + 5e-5)["passed"]
    assert not compare(reference, reference + 2e-4)["passed"]  # bound
    swapped = reference.copy()
    swapped[0, [3, 4]] = swapped[0, [4, 3]]
    verdict = compare(reference, swapped)
    assert not verdict["passed"] and not verdict["top5_match"]


def test_cache_key_follows_the_weights(tmp_path: Path) -> None:
    weights = tmp_path / "w.h5"
    weights.write_bytes(b"a")
    first = fingerprint(WeightsPlan("file", weights))
    weights.write_bytes(b"b")
    assert fingerprint(WeightsPlan("file", weights)) != first
    assert fingerprint(WeightsPlan("random", seed=1)) != fingerprint(WeightsPlan("random", seed=2))


def write_record(runtime: OpenVINORuntime, passed: bool) -> None:
    path = runtime.cache_path()
    path.mkdir(parents=True)
    (path / "record.json").write_text(
        json.dumps(
            {
                "backend": "openvino-test",
                "weights_hash": "x",
                "classes": 1000,
                "parity": {"passed": passed, "max_abs_diff": 0.3, "top5_match": False},
            }
        )
    )


def test_a_backend_that_failed_parity_is_refused(tmp_path: Path) -> None:
    runtime = OpenVINORuntime(resnet50.SPEC, PLAN, cache_dir=tmp_path)
    write_record(runtime, passed=False)
    with pytest.raises(BackendUnavailable, match="failed parity"):
        runtime.load()


class Stub:
    def __init__(self, name: str, fail: bool = False) -> None:
        self.name, self.fail = name, fail

    def load(self) -> RuntimeInfo:
        if self.fail:
            raise BackendUnavailable(f"{self.name} refused")
        return RuntimeInfo(self.name, "random", "seed=5", "h", 1000, 0.0)

    pixels_in = False

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return np.full((len(batch), 1), ord(self.name[0]), np.float32)

    def predict_features(self, batch: np.ndarray) -> Outputs:
        return Outputs(self.predict(batch))


def test_auto_serves_with_the_first_backend_that_loads() -> None:
    runtime = FirstWorking([Stub("openvino", fail=True), Stub("keras")])
    assert runtime.load().backend == "keras"
    assert runtime.predict(np.zeros((2, 1))).tolist() == [[ord("k")], [ord("k")]]
    with pytest.raises(BackendUnavailable, match="keras refused"):
        FirstWorking([Stub("openvino", fail=True), Stub("keras", fail=True)]).load()


def test_make_runtime_honours_the_setting(tmp_path: Path) -> None:
    assert isinstance(make_runtime(resnet50.SPEC, PLAN, "keras", cache_dir=tmp_path), KerasRuntime)
    assert isinstance(make_runtime(resnet50.SPEC, PLAN, "openvino", cache_dir=tmp_path), OpenVINORuntime)
    auto = make_runtime(resnet50.SPEC, PLAN, "auto", cache_dir=tmp_path)
    assert isinstance(auto, FirstWorking) and isinstance(auto.candidates[0], OpenVINORuntime)
    with pytest.raises(ValueError, match="BACKEND"):
        make_runtime(resnet50.SPEC, PLAN, "onnx", cache_dir=tmp_path)


@pytest.mark.slow
def test_converted_backend_serves_without_importing_tensorflow(tmp_path: Path) -> None:
    """The conversion runs in a child; the serving process holds OpenVINO only (~0.5 GB less)."""
    code = (
        "import sys, time\n"
        "from serving.app import ServiceSettings, create_app\nfrom services import resnet50\n"
        "s = ServiceSettings(weights='random', weights_seed=5, backend='openvino',\n"
        f"                    model_cache={str(tmp_path)!r})\n"
        "app = create_app(resnet50.SPEC, s, background_load=False)\n"
        "data = open('tests/fixtures/chelsea.jpg', 'rb').read()\n"
        "body = app.test_client().post('/v1/predict', data=data, content_type='image/jpeg').get_json()\n"
        "tf = sorted(m for m in sys.modules if m.startswith('tensorflow'))[:1]\n"
        "print(body['backend'], body['weights_hash'], tf)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out[0].startswith("openvino-") and out[-1] == "[]"
    import keras

    from serving.runtime import weights_digest

    keras.utils.set_random_seed(5)
    assert out[1] == weights_digest(keras.applications.ResNet50(weights=None).get_weights())


def test_auto_prefers_keras_where_a_gpu_is_visible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import serving.backends as backends

    monkeypatch.setattr(backends, "gpu_present", lambda: True)
    auto = make_runtime(resnet50.SPEC, PLAN, "auto", cache_dir=tmp_path)
    assert isinstance(auto, FirstWorking) and isinstance(auto.candidates[0], KerasRuntime)


def test_a_gpu_hidden_by_cuda_visible_devices_does_not_count(monkeypatch: pytest.MonkeyPatch) -> None:
    from serving.backends import gpu_present

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert not gpu_present()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["caffe", "tf"])
def test_preprocessing_in_the_graph_answers_as_numpy_does(
    tmp_path: Path, trained_shapes: shapes.TrainedModel, mode: str
) -> None:
    """OpenVINO with the preprocessing folded into its graph, fed the uint8 pixels, gives what it
    gives fed NumPy's preprocessed floats - probabilities and features - for each mode."""
    spec = ModelSpec("shapes", shapes.INPUT_SIZE, mode, labels_path=trained_shapes.labels_path)
    plan = WeightsPlan("file", trained_shapes.model_path)
    limits = imaging.ImageLimits()
    pixels = np.stack([imaging.load_pixels(photo(name), spec.input_size, limits) for name in PHOTOS])
    fused = OpenVINORuntime(spec, plan, cache_dir=tmp_path, fused_preprocessing=True)
    plain = OpenVINORuntime(spec, plan, cache_dir=tmp_path)
    fused.load(), plain.load()
    assert fused.pixels_in and not plain.pixels_in
    ours, reference = fused.predict_features(pixels), plain.predict_features(preprocessing.get(mode)(pixels))
    np.testing.assert_allclose(ours.probabilities, reference.probabilities, rtol=1e-5, atol=1e-6)
    assert ours.features is not None and reference.features is not None
    np.testing.assert_allclose(ours.features, reference.features, rtol=1e-5, atol=1e-5)
    assert (ours.probabilities.argmax(1) == reference.probabilities.argmax(1)).all()


@pytest.mark.slow
def test_two_streams_answer_two_threads_at_once_as_one_stream_answers_each(
    tmp_path: Path, trained_shapes: shapes.TrainedModel
) -> None:
    """INFERENCE_STREAMS=2: the runtime says so, and threads calling at once - each on an infer
    request of its own - get exactly what the latency hint's single stream gives their images."""
    spec = ModelSpec("shapes", shapes.INPUT_SIZE, "caffe", labels_path=trained_shapes.labels_path)
    plan = WeightsPlan("file", trained_shapes.model_path)
    limits = imaging.ImageLimits()
    batches = [
        np.stack([imaging.load_pixels(photo(name), spec.input_size, limits)] * size)
        for name, size in zip(PHOTOS, (3, 1), strict=True)
    ]
    one = OpenVINORuntime(spec, plan, cache_dir=tmp_path, fused_preprocessing=True, streams=1)
    two = OpenVINORuntime(spec, plan, cache_dir=tmp_path, fused_preprocessing=True, streams=2)
    assert (one.load().streams, two.load().streams) == (1, 2)
    expected = [one.predict(batch) for batch in batches]
    together = threading.Barrier(2, timeout=30)

    def calls(which: int) -> list[np.ndarray]:
        together.wait()
        return [two.predict(batches[which]) for _ in range(20)]

    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(calls, (0, 1)))
    for which, answered in enumerate(answers):
        for probabilities in answered:
            np.testing.assert_allclose(probabilities, expected[which], rtol=1e-5, atol=1e-6)


class Counted:
    """A compiled model whose infer requests count the calls made on them."""

    def __init__(self, compiled: object) -> None:
        self.compiled, self.calls = compiled, 0

    def create_infer_request(self) -> object:
        request = self.compiled.create_infer_request()  # type: ignore[attr-defined]
        counted = self

        class Request:
            def infer(self, batch: np.ndarray) -> object:
                counted.calls += 1
                return request.infer(batch)

        return Request()


@pytest.mark.slow
def test_a_batch_alone_gets_the_latency_form_and_batches_at_once_the_streams(
    tmp_path: Path, trained_shapes: shapes.TrainedModel
) -> None:
    """LATENCY_FORM beside two streams: a call that starts while no other runs is computed on
    every core (the latency form), calls that overlap on the streams; both answer the same."""
    spec = ModelSpec("shapes", shapes.INPUT_SIZE, "caffe", labels_path=trained_shapes.labels_path)
    plan = WeightsPlan("file", trained_shapes.model_path)
    batch = np.stack([imaging.load_pixels(photo("chelsea.jpg"), spec.input_size, imaging.ImageLimits())] * 2)
    runtime = OpenVINORuntime(
        spec, plan, cache_dir=tmp_path, fused_preprocessing=True, streams=2, latency_form=True
    )
    info = runtime.load()
    assert (info.streams, info.latency_form) == (2, True)
    alone, streams = Counted(runtime._alone), Counted(runtime._compiled)
    runtime._alone, runtime._compiled = alone, streams
    runtime._requests = threading.local()  # forget the infer requests load() made on this thread
    expected = runtime.predict(batch)
    assert (alone.calls, streams.calls) == (1, 0)
    together = threading.Barrier(2, timeout=30)

    def calls(_: int) -> list[np.ndarray]:
        together.wait()
        return [runtime.predict(batch) for _ in range(30)]

    with ThreadPoolExecutor(2) as pool:
        answers = [a for answered in pool.map(calls, (0, 1)) for a in answered]
    assert streams.calls > 0 and alone.calls + streams.calls == 61  # overlapping calls took the streams
    for probabilities in answers:
        np.testing.assert_allclose(probabilities, expected, rtol=1e-5, atol=1e-6)
    off = OpenVINORuntime(spec, plan, cache_dir=tmp_path, fused_preprocessing=True, streams=2)
    assert off.load().latency_form is False  # off unless asked (make_runtime asks, by the setting)


def test_streams_by_default_follow_the_precision_served() -> None:
    """INFERENCE_STREAMS=0: full int8 gets the throughput hint's streams, fp32 arithmetic (int8
    weights included) the latency hint's one; a number set is compiled as it is."""
    assert compile_config(streams_for("int8"), 0) == {
        "INFERENCE_PRECISION_HINT": "f32",
        "PERFORMANCE_HINT": "THROUGHPUT",
    }
    for precision in ("fp32", "int8-weights"):
        assert compile_config(streams_for(precision), 0)["PERFORMANCE_HINT"] == "LATENCY"
    assert compile_config(3, 2) == {
        "INFERENCE_PRECISION_HINT": "f32",
        "PERFORMANCE_HINT": "THROUGHPUT",
        "NUM_STREAMS": 3,
        "INFERENCE_NUM_THREADS": 2,
    }
