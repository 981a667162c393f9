"""int8 by NNCF from the converted OpenVINO model, gated by agreement with fp32.

Run in a child process (``python -m serving.quantize ...``), like the conversion it starts from. Two
int8 candidates are made from the fp32 IR (``serving.convert``), in the order they are preferred:

* ``int8``: post-training quantization of weights and activations, calibrated on *calibration*
  images - the speed (int8 arithmetic) and the memory;
* ``int8-weights``: weights alone compressed to int8 (symmetric, per output channel, as the first
  candidate's weights are), activations and arithmetic fp32 - about the memory of the first at
  fp32's speed, and no calibration to go wrong.

Both answer *validation* images that are not the calibration ones, beside fp32, and each records its
top-1 agreement with fp32 and the mean share of fp32's top-5 in its own. The service serves the
first candidate the gate (``Gate``) admits with today's thresholds, else fp32, loudly
(``choose``). Output, in ``<out>/``: one folder per candidate with its IR, and ``record.json`` with
every candidate's figures; candidates the gate refuses are kept too, so a verdict is cached with its
reasons and a changed threshold needs no requantizing.

Images: the folders the operator names (``CALIBRATION_DIR``, ``VALIDATION_DIR``), read through the
serving pipeline; by default, views of the photos shipped in ``serving/data/parity`` - random
crops (25-100 % of the area), flips and brightness/contrast changes, 64 for calibration and 48
others (another seed) for validation. Why that is enough: post-training quantization only
estimates each activation's range, which a few dozen natural images pin down (NNCF's ImageNet
figures use 300 and lose 0.1-0.2 points on these models); varied crops of real photos cover
object scale and exposure; and the gate, not the calibration set, is what guards quality - on a
model that fails it, users get the next candidate or fp32. An operator with their own data should
name it.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance

from common import imaging
from common.models import ModelSpec
from serving import preprocessing
from serving.convert import spec_from_json

SHIPPED_PHOTOS = Path(__file__).parent / "data" / "parity"
CALIBRATION_VIEWS, VALIDATION_VIEWS = 64, 48
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
LAYOUT = 2
"""Version of the folder and record layout, in the cache key: 2 added the weights-only candidate."""
CANDIDATES = ("int8", "int8-weights")
"""Served precisions other than fp32, in the order they are preferred."""


@dataclass(frozen=True)
class Gate:
    """Thresholds an int8 model must meet against fp32 on the validation images."""

    min_top1: float = 0.9
    min_top5: float = 0.8

    def admits(self, figures: dict[str, Any]) -> bool:
        """Whether measured figures (``agreement``'s) meet these thresholds."""
        return figures["top1_agreement"] >= self.min_top1 and figures["top5_overlap"] >= self.min_top5


def views(photos: list[bytes], count: int, seed: int, size: int) -> np.ndarray:
    """``count`` varied uint8 views (crops, flips, exposure) of ``photos``, ``size`` x ``size``."""
    rng = np.random.default_rng(seed)
    out = np.empty((count, size, size, 3), np.uint8)
    images = [Image.open(io.BytesIO(data)).convert("RGB") for data in photos]
    for n in range(count):
        image = images[n % len(images)]
        width, height = image.size
        area = rng.uniform(0.25, 1.0) * width * height
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        w = int(min(width, round(np.sqrt(area * aspect))))
        h = int(min(height, round(np.sqrt(area / aspect))))
        left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        view = image.crop((left, top, left + w, top + h)).resize((size, size), Image.Resampling.BILINEAR)
        if rng.random() < 0.5:
            view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        view = ImageEnhance.Brightness(view).enhance(rng.uniform(0.75, 1.25))
        view = ImageEnhance.Contrast(view).enhance(rng.uniform(0.75, 1.25))
        out[n] = np.asarray(view)
    return out


def folder_pixels(folder: Path, size: int, limit: int) -> np.ndarray:
    """Up to ``limit`` images of ``folder`` (sorted, recursively) through the serving pipeline."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not files:
        raise ValueError(f"no images in {folder}")
    limits = imaging.ImageLimits()
    return np.stack([imaging.load_pixels(p.read_bytes(), size, limits) for p in files])


def image_sets(
    spec: ModelSpec, calibration: Path | None, validation: Path | None
) -> tuple[np.ndarray, np.ndarray]:
    """(calibration, validation) uint8 pixels: the named folders, else views of the shipped photos."""
    size = spec.input_size
    calib = (
        folder_pixels(calibration, size, 300) if calibration else views(shipped(), CALIBRATION_VIEWS, 1, size)
    )
    return calib, validation_set(spec, validation)


def validation_set(spec: ModelSpec, validation: Path | None) -> np.ndarray:
    """The validation uint8 pixels a reduced precision is judged on (int8's and bf16's gates)."""
    size = spec.input_size
    return folder_pixels(validation, size, 500) if validation else views(shipped(), VALIDATION_VIEWS, 2, size)


def shipped() -> list[bytes]:
    return [p.read_bytes() for p in sorted(SHIPPED_PHOTOS.glob("*.jpg"))]


def digest(*arrays: np.ndarray) -> str:
    """Names a calibration set in the cache key: the same pixels, the same int8 model."""
    h = hashlib.blake2b(digest_size=6)
    for array in arrays:
        h.update(np.ascontiguousarray(array).data)
    return h.hexdigest()


def agreement(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Top-1 agreement and mean top-5 overlap of ``candidate`` with ``reference`` (rows: images);
    a model with fewer than 5 classes is judged on all of them (its top-5 is every class)."""
    top1 = float(np.mean(reference.argmax(1) == candidate.argmax(1)))
    k = min(5, reference.shape[1])
    ref5 = np.argsort(-reference, axis=1, kind="stable")[:, :k]
    can5 = np.argsort(-candidate, axis=1, kind="stable")[:, :k]
    overlap = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ref5, can5, strict=True)]))
    return {"top1_agreement": round(top1, 4), "top5_overlap": round(overlap, 4)}


def quantize(
    fp32_xml: Path, out: Path, spec: ModelSpec, calibration: np.ndarray, validation: np.ndarray
) -> dict[str, Any]:
    """Make both candidates from ``fp32_xml``, measure them on ``validation``, write IRs + record."""
    import nncf
    import openvino as ov

    started = time.perf_counter()
    prepare = preprocessing.get(spec.preprocessing)
    core = ov.Core()
    samples = [prepare(calibration[i : i + 1].copy()) for i in range(len(calibration))]
    made = {
        "int8": (
            nncf.quantize(core.read_model(fp32_xml), nncf.Dataset(samples), subset_size=len(samples)),
            f"nncf {nncf.__version__} post-training quantization (int8 weights and activations)",
        ),
        "int8-weights": (
            nncf.compress_weights(core.read_model(fp32_xml), mode=nncf.CompressWeightsMode.INT8_SYM),
            f"nncf {nncf.__version__} weight compression int8_sym (fp32 activations and arithmetic)",
        ),
    }
    staging = Path(tempfile.mkdtemp(prefix=".quantizing-", dir=out.parent))
    config = {"INFERENCE_PRECISION_HINT": "f32"}
    inputs = prepare(validation.copy())
    reference = np.asarray(core.compile_model(fp32_xml, "CPU", config)(inputs)[0])
    candidates = []
    for precision in CANDIDATES:
        model, method = made[precision]
        (staging / precision).mkdir()
        ov.save_model(model, staging / precision / "model.xml", compress_to_fp16=False)
        answer = np.asarray(core.compile_model(staging / precision / "model.xml", "CPU", config)(inputs)[0])
        candidates.append({"precision": precision, "method": method, "gate": agreement(reference, answer)})
    record = {
        "layout": LAYOUT,
        "calibration_images": len(calibration),
        "validation_images": len(validation),
        "candidates": candidates,
        "quantize_seconds": round(time.perf_counter() - started, 1),
    }
    (staging / "record.json").write_text(json.dumps(record, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(staging, out)  # atomic, as for conversions
    return record


def choose(record: dict[str, Any], gate: Gate, fallback: bool = True) -> tuple[str, str]:
    """(precision to serve, why it is not ``int8`` - empty if it is) from a quantization record:
    the first candidate ``gate`` admits (only the first when ``fallback`` is off), else fp32."""
    refusals: list[str] = []
    for candidate in record["candidates"][: None if fallback else 1]:
        figures = candidate["gate"]
        if gate.admits(figures):
            note = "" if not refusals else f"{'; '.join(refusals)}; serving {candidate['precision']}"
            return candidate["precision"], note
        refusals.append(
            f"{candidate['precision']} refused by the quality gate: top-1 agreement "
            f"{figures['top1_agreement']:.2f} (needs {gate.min_top1:.2f}), top-5 overlap "
            f"{figures['top5_overlap']:.2f} (needs {gate.min_top5:.2f}) on {record['validation_images']} "
            "validation images"
        )
    return "fp32", f"{'; '.join(refusals)}; serving fp32"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spec", required=True, help="ModelSpec as JSON")
    parser.add_argument("--fp32", required=True, type=Path, help="the fp32 IR (model.xml)")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--calibration", type=Path, default=None)
    parser.add_argument("--validation", type=Path, default=None)
    args = parser.parse_args(argv)
    spec = spec_from_json(args.spec)
    calibration, validation = image_sets(spec, args.calibration, args.validation)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = quantize(args.fp32, args.out, spec, calibration, validation)
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
