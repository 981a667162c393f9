"""int8 serving: a model trained in this run keeps its accuracy in int8 on fresh images, the gate
refuses a model it should (calibrated on black images), and a refused model serves int8 weights or
fp32, saying why. Real NNCF and OpenVINO on the small shapes model (seconds, not minutes)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serving import preprocessing
from serving.backends import OpenVINORuntime, Quantization
from serving.quantize import Gate, agreement, choose, views
from serving.weights import WeightsPlan
from tests.e2e import shapes
from tests.serving.reduced import accuracy, spec_of, write_images

pytestmark = pytest.mark.slow


def runtime(
    model: shapes.TrainedModel, cache: Path, precision: str, quantization: Quantization
) -> OpenVINORuntime:
    plan = WeightsPlan("file", model.model_path)
    return OpenVINORuntime(
        spec_of(model), plan, cache_dir=cache, precision=precision, quantization=quantization
    )


def test_agreement_counts_top1_and_top5() -> None:
    reference = np.array([[0.5, 0.2, 0.1, 0.08, 0.07, 0.05], [0.1, 0.6, 0.1, 0.1, 0.05, 0.05]])
    same = agreement(reference, reference)
    assert same == {"top1_agreement": 1.0, "top5_overlap": 1.0}
    flipped = reference[:, ::-1].copy()
    assert agreement(reference, flipped)["top1_agreement"] == 0.0
    few = reference[:, :3]  # fewer than 5 classes: all of them are the top-5
    assert agreement(few, few[:, ::-1].copy()) == {"top1_agreement": 0.5, "top5_overlap": 1.0}


def test_choose_serves_the_first_candidate_the_gate_admits() -> None:
    def record(full: float, weights: float) -> dict:
        return {
            "validation_images": 48,
            "candidates": [
                {"precision": "int8", "gate": {"top1_agreement": full, "top5_overlap": 0.9}},
                {"precision": "int8-weights", "gate": {"top1_agreement": weights, "top5_overlap": 0.9}},
            ],
        }

    assert choose(record(0.95, 0.99), Gate()) == ("int8", "")
    precision, note = choose(record(0.88, 0.94), Gate())
    assert precision == "int8-weights" and note.startswith(
        "int8 refused by the quality gate: top-1 agreement 0.88"
    )
    assert choose(record(0.88, 0.94), Gate(), fallback=False)[0] == "fp32"
    precision, note = choose(record(0.5, 0.6), Gate())
    assert precision == "fp32" and "int8-weights refused" in note and note.endswith("serving fp32")


def test_the_default_image_sets_are_varied_views_and_never_the_same() -> None:
    photos = [Path("serving/data/parity/chelsea.jpg").read_bytes()]
    calibration, validation = views(photos, 8, 1, 64), views(photos, 8, 2, 64)
    assert calibration.shape == (8, 64, 64, 3) and calibration.dtype == np.uint8
    assert len({view.tobytes() for view in calibration}) == 8  # every view differs
    assert not {v.tobytes() for v in calibration} & {v.tobytes() for v in validation}


def test_a_model_trained_here_keeps_its_accuracy_in_int8(
    trained_shapes: shapes.TrainedModel, tmp_path: Path
) -> None:
    calibration = write_images(tmp_path / "calibration", shapes.dataset(64, seed=21)[0])
    validation = write_images(tmp_path / "validation", shapes.dataset(64, seed=22)[0])
    sets = Quantization(calibration, validation, Gate())
    fp32 = runtime(trained_shapes, tmp_path / "cache", "fp32", sets)
    int8 = runtime(trained_shapes, tmp_path / "cache", "int8", sets)
    assert fp32.load().precision == "fp32"
    info = int8.load()
    assert (info.precision, info.precision_note) == ("int8", "")
    fresh, labels = shapes.dataset(400, seed=23)  # neither calibration nor validation images
    before, after = accuracy(fp32, fresh, labels), accuracy(int8, fresh, labels)
    assert before >= 0.9 and after >= before - 0.01, (before, after)
    assert int8.int8_path().name.endswith(sets.key()) and "int8" in int8.int8_path().name


@pytest.mark.parametrize("fallback", [True, False])
def test_the_gate_refuses_a_badly_calibrated_model(
    trained_shapes: shapes.TrainedModel, tmp_path: Path, fallback: bool
) -> None:
    """The control: calibrated on black images, every activation range is near zero, so real
    images saturate the int8 model. The gate must see it; int8 weights (no calibration) serve
    instead, or fp32 when that fallback is off - and either keeps the model's accuracy."""
    black = io.BytesIO()
    Image.new("RGB", (96, 96)).save(black, "PNG")
    calibration = write_images(tmp_path / "black", [black.getvalue()] * 32)
    validation = write_images(tmp_path / "validation", shapes.dataset(64, seed=24)[0])
    sets = Quantization(calibration, validation, Gate(), weights_fallback=fallback)
    served = runtime(trained_shapes, tmp_path / "cache", "int8", sets)
    info = served.load()
    assert info.precision == ("int8-weights" if fallback else "fp32"), info
    assert "int8 refused by the quality gate" in info.precision_note, info
    record = served.ensure_quantized()
    full, weights = record["candidates"]
    assert full["gate"]["top1_agreement"] < 0.9 <= weights["gate"]["top1_agreement"], record
    fresh, labels = shapes.dataset(200, seed=25)
    assert accuracy(served, fresh, labels) >= 0.9


def test_thresholds_apply_to_the_cached_verdict(trained_shapes: shapes.TrainedModel, tmp_path: Path) -> None:
    """The gate's figures are cached with the int8 model; raising a threshold needs no requantizing."""
    calibration = write_images(tmp_path / "calibration", shapes.dataset(32, seed=26)[0])
    validation = write_images(tmp_path / "validation", shapes.dataset(32, seed=27)[0])
    cache = tmp_path / "cache"
    assert (
        runtime(trained_shapes, cache, "int8", Quantization(calibration, validation, Gate())).load().precision
        == "int8"
    )
    strict = Quantization(calibration, validation, Gate(min_top1=1.01))
    info = runtime(trained_shapes, cache, "int8", strict).load()
    assert info.precision == "fp32" and "needs 1.01" in info.precision_note
    assert "int8-weights refused" in info.precision_note  # both candidates, each with its figures


def test_preprocessing_of_views_matches_the_serving_pipeline() -> None:
    pixels = views([Path("serving/data/parity/coffee.jpg").read_bytes()], 2, 3, 224)
    prepared = preprocessing.get("caffe")(pixels.copy())
    assert prepared.dtype == np.float32 and prepared.shape == (2, 224, 224, 3)
