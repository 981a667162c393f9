"""bf16 where the CPU computes it natively, gated by agreement with fp32 and measured faster.

OpenVINO's CPU plugin computes bf16 natively where the CPU has AVX-512 BF16 (AMD EPYC Zen 4 and
later, Intel Cooper Lake) or AMX (Intel Sapphire Rapids and later): it then lists ``BF16`` in
``OPTIMIZATION_CAPABILITIES`` and makes bf16 its default inference precision. Elsewhere it offers
none. The fleet forces f32 for ``fp32`` (Keras parity depends on it); ``PRECISION=bf16`` asks for
bf16 and ``PRECISION=auto`` for bf16 only where it is also measured faster here, each gated like
int8 by agreement with fp32 on the validation images, else fp32, loudly (``choose``).

The measurement runs in a child process (``python -m serving.bf16 ...``), like int8's quantization,
so that the service never holds two compiled forms of the model at once: the model as it is served
(its fused preprocessing included) is compiled twice, f32 and bf16 arithmetic, both with the latency
hint the service compiles them with; both answer the validation images, and each times batches of
1 and ``--batch`` images, interleaved, best of ``ROUNDS`` (other services may be warming on the
same cores: contention only slows a call). Output: ``<out>/record.json``, cached per model, CPU
and image set (``OpenVINORuntime.bf16_path``), so a changed threshold needs no measuring again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from serving import preprocessing
from serving.convert import spec_from_json
from serving.quantize import Gate, agreement, validation_set

LAYOUT = 1
"""Version of the record's layout, in the cache key."""
ROUNDS = 3
"""Timings per precision and batch size; the fastest counts."""


def capabilities(core: Any) -> list[str]:
    """What OpenVINO's CPU plugin computes natively on this CPU (``BF16``, ``INT8``, ...)."""
    return [str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")]


def native(core: Any) -> bool:
    return "BF16" in capabilities(core)


def cpu_key(core: Any) -> str:
    """Names this CPU in the cache key: its model and what it computes natively."""
    described = f"{core.get_property('CPU', 'FULL_DEVICE_NAME')}|{','.join(sorted(capabilities(core)))}"
    return hashlib.blake2b(described.encode(), digest_size=5).hexdigest()


def precision_hint(precision: str) -> str:
    """OpenVINO's ``INFERENCE_PRECISION_HINT`` for a served precision: bf16's own, else f32 (int8
    models compute their quantized operations in int8 and the rest in f32)."""
    return "bf16" if precision == "bf16" else "f32"


def measure(graph: Any, validation: np.ndarray, batch: int) -> dict[str, Any]:
    """Both forms' agreement on ``validation`` (uint8 pixels, or floats the graph takes) and their
    best milliseconds for batches of 1 and ``batch``."""
    import openvino as ov

    core = ov.Core()
    requests = {}
    answers = {}
    for precision in ("fp32", "bf16"):
        config = {"INFERENCE_PRECISION_HINT": precision_hint(precision), "PERFORMANCE_HINT": "LATENCY"}
        request = core.compile_model(graph, "CPU", config).create_infer_request()
        rows = [
            np.array(request.infer(validation[i : i + batch])[0]) for i in range(0, len(validation), batch)
        ]
        answers[precision] = np.concatenate(rows)
        requests[precision] = request
    sizes = sorted({1, min(batch, len(validation))})
    best = {precision: {size: float("inf") for size in sizes} for precision in requests}
    for _ in range(ROUNDS):
        for size in sizes:
            for precision, request in requests.items():
                started = time.perf_counter()
                request.infer(validation[:size])
                best[precision][size] = min(best[precision][size], (time.perf_counter() - started) * 1000)
    ms = {
        precision: {str(size): round(t, 2) for size, t in times.items()} for precision, times in best.items()
    }
    return {
        "gate": agreement(answers["fp32"], answers["bf16"]),
        "ms_per_batch": ms,
        "faster": all(best["bf16"][size] < best["fp32"][size] for size in sizes),
    }


def choose(record: dict[str, Any], gate: Gate, *, must_be_faster: bool) -> tuple[str, str]:
    """(precision to serve, why it is not bf16 - empty if it is) from a measurement record."""
    figures = record["gate"]
    if not gate.admits(figures):
        return "fp32", (
            f"bf16 refused by the quality gate: top-1 agreement {figures['top1_agreement']:.2f} (needs "
            f"{gate.min_top1:.2f}), top-5 overlap {figures['top5_overlap']:.2f} (needs {gate.min_top5:.2f}) "
            f"on {record['validation_images']} validation images; serving fp32"
        )
    if must_be_faster and not record["faster"]:
        return (
            "fp32",
            f"bf16 measured no faster than fp32 on this CPU ({record['ms_per_batch']}); serving fp32",
        )
    return "bf16", ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spec", required=True, help="ModelSpec as JSON")
    parser.add_argument("--fp32", required=True, type=Path, help="the fp32 IR (model.xml)")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--validation", type=Path, default=None)
    parser.add_argument("--fused", action="store_true", help="the service folds preprocessing into the graph")
    parser.add_argument("--batch", type=int, default=8, help="the service's largest batch")
    args = parser.parse_args(argv)
    import openvino as ov

    from serving.backends import fold_preprocessing

    spec = spec_from_json(args.spec)
    started = time.perf_counter()
    core = ov.Core()
    pixels = validation_set(spec, args.validation)
    graph = core.read_model(args.fp32)
    if args.fused:
        graph = fold_preprocessing(graph, spec.preprocessing)
    else:
        pixels = preprocessing.get(spec.preprocessing)(pixels.copy())
    record = {
        "layout": LAYOUT,
        "cpu": core.get_property("CPU", "FULL_DEVICE_NAME"),
        "capabilities": capabilities(core),
        "openvino": ov.__version__,
        "fused_preprocessing": args.fused,
        "validation_images": len(pixels),
        **measure(graph, pixels, args.batch),
    }
    record["measure_seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".bf16-", dir=args.out.parent))
    (staging / "record.json").write_text(json.dumps(record, indent=2))
    shutil.rmtree(args.out, ignore_errors=True)
    os.replace(staging, args.out)  # atomic, as for conversions
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
