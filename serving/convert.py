"""Convert a Keras model to a faster CPU backend, and prove it answers like Keras before it serves.

Run in a child process (``python -m serving.convert ...``) so the serving process never imports
TensorFlow when it serves a converted backend. Output, in ``<cache>/<key>/``: ``model.xml``/``.bin``
(OpenVINO IR, fp32: ``save_model`` would compress to fp16 by default and shift the outputs) and
``record.json`` with the Keras weights hash and the parity result on ``serving/data/parity``
photos: same top-5 order and max |dp| <= 1e-4, or the backend is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from common import imaging
from common.models import ModelSpec
from serving import preprocessing
from serving.weights import WeightsPlan

PARITY_PHOTOS = Path(__file__).parent / "data" / "parity"
PARITY_MAX_ABS_DIFF = 1e-4


def parity_inputs(spec: ModelSpec) -> np.ndarray:
    """The parity photos through the serving pipeline: what the backend must agree on."""
    photos = sorted(PARITY_PHOTOS.glob("*.jpg"))
    pixels = [imaging.load_pixels(p.read_bytes(), spec.input_size, imaging.ImageLimits()) for p in photos]
    return preprocessing.get(spec.preprocessing)(np.stack(pixels))


def compare(reference: np.ndarray, candidate: np.ndarray) -> dict[str, Any]:
    """Parity verdict: same top-5 order per photo and max |dp| within the bound."""
    top5 = [
        list(np.argsort(-r, kind="stable")[:5]) == list(np.argsort(-c, kind="stable")[:5])
        for r, c in zip(reference, candidate, strict=True)
    ]
    max_diff = float(np.abs(reference - candidate).max())
    return {
        "max_abs_diff": max_diff,
        "top5_match": all(top5),
        "photos": len(reference),
        "bound": PARITY_MAX_ABS_DIFF,
        "passed": all(top5) and max_diff <= PARITY_MAX_ABS_DIFF,
    }


def convert_openvino(spec: ModelSpec, plan: WeightsPlan, out: Path) -> dict[str, Any]:
    """Build the Keras model, convert it, check parity, and write IR + record into ``out``."""
    import openvino as ov
    import tensorflow as tf

    from serving.runtime import build_keras_model, weights_digest

    started = time.perf_counter()
    model = build_keras_model(spec, plan)
    size = spec.input_size
    ir = ov.convert_model(model, input=[(-1, size, size, 3)])
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=out.parent))
    ov.save_model(ir, staging / "model.xml", compress_to_fp16=False)
    inputs = parity_inputs(spec)
    reference = np.asarray(tf.function(lambda x: model(x, training=False))(inputs))
    compiled = ov.Core().compile_model(staging / "model.xml", "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    record = {
        "backend": f"openvino-{ov.get_version().split('-')[0]}",
        "model": spec.name,
        "weights": plan.kind,
        "weights_hash": weights_digest(model.get_weights()),
        "classes": int(model.output_shape[-1]),
        "parity": compare(reference, compiled(inputs)[0]),
        "convert_seconds": round(time.perf_counter() - started, 1),
    }
    (staging / "record.json").write_text(json.dumps(record, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(staging, out)  # atomic: a half-written conversion is never picked up
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spec", required=True, help="ModelSpec as JSON")
    parser.add_argument("--plan", required=True, help="WeightsPlan as JSON")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    spec = spec_from_json(args.spec)
    plan_fields = json.loads(args.plan)
    plan = WeightsPlan(
        plan_fields["kind"], Path(plan_fields["path"]) if plan_fields["path"] else None, plan_fields["seed"]
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = convert_openvino(spec, plan, args.out)
    print(json.dumps(record))
    return 0 if record["parity"]["passed"] else 3


def to_json(value: Any) -> str:
    """Dataclasses (with paths) as JSON, for the command line above."""
    return json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(value).items()})


def spec_from_json(text: str) -> ModelSpec:
    """The ``ModelSpec`` ``to_json`` wrote, for the child processes' command lines."""
    fields = json.loads(text)
    return ModelSpec(**{**fields, "labels_path": Path(fields["labels_path"])})


if __name__ == "__main__":
    sys.exit(main())
