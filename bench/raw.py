"""Part 1: raw in-process throughput per model and backend, batch 1 and 8 (no HTTP, no decoding);
int8 is the PRECISION=int8 model (it says fp32 when the quality gate refused it).

Run as ``python -m bench.raw --cache DIR``; prints JSON. Random weights (seed 0), the same weights
the fleet serves in the benchmark, so the figures compare like with like.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from services import inceptionv3, resnet50, vgg16
from serving.backends import OpenVINORuntime
from serving.runtime import KerasRuntime, build_keras_model
from serving.weights import WeightsPlan

SPECS = (resnet50.SPEC, inceptionv3.SPEC, vgg16.SPEC)
PLAN = WeightsPlan("random", seed=0)


def images_per_second(call: Callable[[np.ndarray], object], batch: np.ndarray, budget_s: float) -> float:
    """Median rate over repeated calls after two warm-ups, within about ``budget_s``."""
    call(batch)
    call(batch)
    times: list[float] = []
    deadline = time.monotonic() + budget_s
    while len(times) < 3 or (time.monotonic() < deadline and len(times) < 30):
        started = time.perf_counter()
        call(batch)
        times.append(time.perf_counter() - started)
    return round(len(batch) / statistics.median(times), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--budget", type=float, default=6.0, help="seconds per measurement")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    results = []
    for spec in SPECS:
        size = spec.input_size
        batches = {n: rng.uniform(-120, 120, (n, size, size, 3)).astype(np.float32) for n in (1, 8)}
        keras_runtime = KerasRuntime(spec, PLAN)
        keras_runtime.load()
        openvino = OpenVINORuntime(spec, PLAN, cache_dir=args.cache)
        openvino.load()
        int8 = OpenVINORuntime(spec, PLAN, cache_dir=args.cache, precision="int8")
        int8_info = int8.load()
        model = build_keras_model(spec, PLAN)
        backends: dict[str, Callable[[np.ndarray], object]] = {
            "keras model.predict (seed's path)": lambda x, m=model: m.predict(x, verbose=0),
            "keras compiled call": keras_runtime.predict,
            "openvino fp32 (latency hint)": openvino.predict,
            f"openvino {int8_info.precision} (PRECISION=int8)": int8.predict,
        }
        for backend, call in backends.items():
            for n, batch in batches.items():
                rate = images_per_second(call, batch, args.budget)
                results.append({"model": spec.name, "backend": backend, "batch": n, "img_per_s": rate})
                print(json.dumps(results[-1]), flush=True)
    print("RESULT " + json.dumps(results))


if __name__ == "__main__":
    main()
