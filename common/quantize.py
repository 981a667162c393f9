"""int8 by post-training quantization (NNCF) of the converted OpenVINO model, gated by agreement.

Run in a child process (``python -m common.quantize ...``), like the conversion it starts from: the
fp32 IR (``common.convert``) is quantized with NNCF on *calibration* images, then the int8 and fp32
models answer *validation* images that are not the calibration ones, and the int8 model is served
only if its top-1 answer agrees with fp32 on at least ``min_top1`` of them and its top-5 shares at
least ``min_top5`` of fp32's on average. Output, in ``<out>/``: ``model.xml``/``.bin`` (int8 IR)
and ``record.json`` with the gate's figures and verdict; a model that fails is written all the
same, so the verdict is cached with its reasons, and the service serves fp32 instead (loudly).

Images: the folders the operator names (``CALIBRATION_DIR``, ``VALIDATION_DIR``), read through the
serving pipeline; by default, views of the photos shipped in ``common/data/parity`` - random
crops (25-100 % of the area), flips and brightness/contrast changes, 64 for calibration and 48
others (another seed) for validation. Why that is enough: post-training quantization only
estimates each activation's range, which a few dozen natural images pin down (NNCF's ImageNet
figures use 300 and lose 0.1-0.2 points on these models); varied crops of real photos cover
object scale and exposure; and the gate, not the calibration set, is what guards quality - on a
model that fails it, users get fp32. An operator with their own data should name it.
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

from common import imaging, preprocessing
from common.models import ModelSpec

SHIPPED_PHOTOS = Path(__file__).parent / "data" / "parity"
CALIBRATION_VIEWS, VALIDATION_VIEWS = 64, 48
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


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
    shipped = [p.read_bytes() for p in sorted(SHIPPED_PHOTOS.glob("*.jpg"))]
    size = spec.input_size
    calib = (
        folder_pixels(calibration, size, 300) if calibration else views(shipped, CALIBRATION_VIEWS, 1, size)
    )
    valid = folder_pixels(validation, size, 500) if validation else views(shipped, VALIDATION_VIEWS, 2, size)
    return calib, valid


def digest(*arrays: np.ndarray) -> str:
    """Names a calibration set in the cache key: the same pixels, the same int8 model."""
    h = hashlib.blake2b(digest_size=6)
    for array in arrays:
        h.update(np.ascontiguousarray(array).data)
    return h.hexdigest()


def agreement(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Top-1 agreement and mean top-5 overlap of ``candidate`` with ``reference`` (rows: images)."""
    top1 = float(np.mean(reference.argmax(1) == candidate.argmax(1)))
    ref5 = np.argsort(-reference, axis=1, kind="stable")[:, :5]
    can5 = np.argsort(-candidate, axis=1, kind="stable")[:, :5]
    overlap = float(np.mean([len(set(a) & set(b)) / 5 for a, b in zip(ref5, can5, strict=True)]))
    return {"top1_agreement": round(top1, 4), "top5_overlap": round(overlap, 4)}


def quantize(
    fp32_xml: Path, out: Path, spec: ModelSpec, calibration: np.ndarray, validation: np.ndarray, gate: Gate
) -> dict[str, Any]:
    """Quantize ``fp32_xml`` on ``calibration``, gate it on ``validation``, write IR + record."""
    import nncf
    import openvino as ov

    started = time.perf_counter()
    prepare = preprocessing.get(spec.preprocessing)
    core = ov.Core()
    model = core.read_model(fp32_xml)
    samples = [prepare(calibration[i : i + 1].copy()) for i in range(len(calibration))]
    quantized = nncf.quantize(model, nncf.Dataset(samples), subset_size=len(samples))
    staging = Path(tempfile.mkdtemp(prefix=".quantizing-", dir=out.parent))
    ov.save_model(quantized, staging / "model.xml", compress_to_fp16=False)
    config = {"INFERENCE_PRECISION_HINT": "f32"}
    inputs = prepare(validation.copy())
    reference = np.asarray(core.compile_model(fp32_xml, "CPU", config)(inputs)[0])
    candidate = np.asarray(core.compile_model(staging / "model.xml", "CPU", config)(inputs)[0])
    figures = agreement(reference, candidate)
    passed = gate.admits(figures)
    record = {
        "precision": "int8",
        "method": f"nncf {nncf.__version__} post-training quantization",
        "calibration_images": len(calibration),
        "validation_images": len(validation),
        "gate": {**figures, "min_top1": gate.min_top1, "min_top5": gate.min_top5, "passed": passed},
        "quantize_seconds": round(time.perf_counter() - started, 1),
    }
    (staging / "record.json").write_text(json.dumps(record, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(staging, out)  # atomic, as for conversions
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spec", required=True, help="ModelSpec as JSON")
    parser.add_argument("--fp32", required=True, type=Path, help="the fp32 IR (model.xml)")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--calibration", type=Path, default=None)
    parser.add_argument("--validation", type=Path, default=None)
    parser.add_argument("--min-top1", type=float, default=Gate.min_top1)
    parser.add_argument("--min-top5", type=float, default=Gate.min_top5)
    args = parser.parse_args(argv)
    fields = json.loads(args.spec)
    spec = ModelSpec(**{**fields, "labels_path": Path(fields["labels_path"])})
    calibration, validation = image_sets(spec, args.calibration, args.validation)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = quantize(args.fp32, args.out, spec, calibration, validation, Gate(args.min_top1, args.min_top5))
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
