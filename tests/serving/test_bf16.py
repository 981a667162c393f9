"""bf16 serving: where the CPU computes it natively, a model passes its gate and keeps its accuracy;
``auto`` serves it only where it also measured faster; a CPU without it, a refusing gate or a
measurement that fails serve fp32 and say why. Real OpenVINO on the small shapes model trained in
this run; a stand-in for OpenVINO's Core only where the CPU's capabilities must be other than this
machine's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from services import resnet50
from serving import bf16
from serving.backends import OpenVINORuntime, Quantization, compile_config, streams_for
from serving.quantize import Gate
from serving.runtime import RuntimeInfo
from serving.settings import ServiceSettings
from serving.weights import WeightsPlan
from tests.e2e import shapes
from tests.serving.reduced import accuracy, spec_of, write_images

GATE = Gate(min_top1=0.99, min_top5=0.9)


def record(top1: float, *, faster: bool) -> dict:
    return {
        "gate": {"top1_agreement": top1, "top5_overlap": 1.0},
        "validation_images": 48,
        "ms_per_batch": {"fp32": {"1": 20.0, "8": 150.0}, "bf16": {"1": 11.0 if faster else 25.0, "8": 80.0}},
        "faster": faster,
    }


class Core:
    """OpenVINO's Core as far as the bf16 choice asks it: a CPU named and its capabilities."""

    def __init__(self, *capabilities: str) -> None:
        self.capabilities = list(capabilities)

    def get_property(self, device: str, name: str) -> object:
        assert device == "CPU"
        return {"OPTIMIZATION_CAPABILITIES": self.capabilities, "FULL_DEVICE_NAME": "Test CPU"}[name]


def test_choose_serves_bf16_past_the_gate_and_auto_only_where_it_is_faster() -> None:
    assert bf16.choose(record(1.0, faster=True), GATE, must_be_faster=True) == ("bf16", "")
    assert bf16.choose(record(1.0, faster=False), GATE, must_be_faster=False) == ("bf16", "")
    precision, note = bf16.choose(record(1.0, faster=False), GATE, must_be_faster=True)
    assert precision == "fp32" and "no faster than fp32" in note and "'bf16': {'1': 25.0" in note
    precision, note = bf16.choose(record(0.96, faster=True), GATE, must_be_faster=False)
    assert precision == "fp32"
    assert "bf16 refused by the quality gate: top-1 agreement 0.96 (needs 0.99)" in note and "48" in note


def test_each_precision_computes_in_its_own_arithmetic() -> None:
    assert compile_config(streams_for("bf16"), 0, "bf16") == {
        "INFERENCE_PRECISION_HINT": "bf16",
        "PERFORMANCE_HINT": "LATENCY",
    }
    for precision in ("fp32", "int8", "int8-weights"):
        assert compile_config(1, 0, precision)["INFERENCE_PRECISION_HINT"] == "f32"
    bits = {p: RuntimeInfo("b", "random", "", "", 3, 0, precision=p).precision_bits for p in ("fp32", "bf16")}
    assert bits == {"fp32": 32, "bf16": 16}


def test_settings_default_to_auto_and_bf16_needs_openvino() -> None:
    settings = ServiceSettings.from_env("resnet50", {})
    assert settings.precision == "auto"
    assert settings.quantization.bf16_gate == Gate(0.99, 0.9)
    assert (
        ServiceSettings.from_env("resnet50", {"BF16_MIN_TOP1": "0.95"}).quantization.bf16_gate.min_top1
        == 0.95
    )
    with pytest.raises(ValueError, match="PRECISION=bf16 needs the OpenVINO backend"):
        ServiceSettings.from_env("resnet50", {"PRECISION": "bf16", "BACKEND": "keras"})
    with pytest.raises(ValueError, match="PRECISION must be one of auto, fp32, bf16, int8"):
        ServiceSettings.from_env("resnet50", {"PRECISION": "fp16"})


def runtime(model: shapes.TrainedModel, cache: Path, precision: str, validation: Path) -> OpenVINORuntime:
    plan = WeightsPlan("file", model.model_path)
    sets = Quantization(validation=validation)
    return OpenVINORuntime(spec_of(model), plan, cache_dir=cache, precision=precision, quantization=sets)


def test_without_native_bf16_auto_serves_fp32_saying_why(tmp_path: Path) -> None:
    served = OpenVINORuntime(
        resnet50.SPEC, WeightsPlan("random", seed=0), cache_dir=tmp_path, precision="auto"
    )
    precision, note = served._bf16_verdict(Core("FP32", "INT8"))
    assert precision == "fp32"
    assert note == "auto: this CPU computes no bf16 natively (it has FP32, INT8); serving fp32"
    assert not list(tmp_path.iterdir())  # nothing measured


@pytest.mark.slow
def test_a_model_trained_here_keeps_its_accuracy_in_bf16_where_the_cpu_has_it(
    trained_shapes: shapes.TrainedModel, tmp_path: Path
) -> None:
    import openvino as ov

    validation = write_images(tmp_path / "validation", shapes.dataset(48, seed=31)[0])
    cache = tmp_path / "cache"
    fp32 = runtime(trained_shapes, cache, "fp32", validation)
    asked = runtime(trained_shapes, cache, "bf16", validation)
    auto = runtime(trained_shapes, cache, "auto", validation)
    assert fp32.load().precision == "fp32"
    info, auto_info = asked.load(), auto.load()
    core = ov.Core()
    if not bf16.native(core):
        for loaded, name in ((info, "bf16"), (auto_info, "auto")):
            assert (
                loaded.precision == "fp32"
                and f"{name}: this CPU computes no bf16 natively" in loaded.precision_note
            )
        assert not asked.bf16_path(core).exists()
        return
    measured = json.loads((asked.bf16_path(core) / "record.json").read_text())
    assert measured["validation_images"] == 48 and measured["fused_preprocessing"] is False
    assert set(measured["ms_per_batch"]["bf16"]) == {"1", "8"}
    assert (info.precision, info.precision_note) == ("bf16", ""), (info, measured)
    assert auto_info.precision == ("bf16" if measured["faster"] else "fp32"), (auto_info, measured)
    fresh, labels = shapes.dataset(400, seed=32)
    before, after = accuracy(fp32, fresh, labels), accuracy(asked, fresh, labels)
    assert before >= 0.9 and after >= before - 0.01, (before, after)
    np.testing.assert_allclose(
        asked.predict(shapes.to_inputs(fresh[:8])), fp32.predict(shapes.to_inputs(fresh[:8])), atol=0.05
    )


@pytest.mark.slow
def test_thresholds_apply_to_the_cached_measurement(
    trained_shapes: shapes.TrainedModel, tmp_path: Path
) -> None:
    """A record cached for this CPU is read, not measured again; a stricter gate refuses it."""
    validation = write_images(tmp_path / "validation", shapes.dataset(16, seed=33)[0])
    served = runtime(trained_shapes, tmp_path / "cache", "bf16", validation)
    core = Core("BF16", "FP32")
    path = served.bf16_path(core)
    path.mkdir(parents=True)
    (path / "record.json").write_text(json.dumps(record(0.97, faster=True)))
    assert served._bf16_verdict(core) == (
        "fp32",
        "bf16 refused by the quality gate: top-1 agreement 0.97 (needs 0.99), top-5 overlap 1.00 "
        "(needs 0.90) on 48 validation images; serving fp32",
    )
    lenient = Quantization(validation=validation, bf16_gate=Gate(0.95, 0.9))
    served.quantization = lenient
    assert served.bf16_path(core) == path and served._bf16_verdict(core) == ("bf16", "")
