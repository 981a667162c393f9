"""Part 1: raw in-process throughput per model and backend, batch 1 and 8 (no HTTP, no decoding);
``PRECISION=auto`` is bf16 where this CPU computes it natively and it passed its gate (it says fp32
where not); int8 is the PRECISION=int8 model (it says fp32 when the quality gate refused it).

Each OpenVINO form is measured twice: one call at a time on the latency hint (one stream on every
core), and as the model services can run it, the throughput hint's streams each fed by a thread
of its own, all at once (``streams`` in the row). The runtime's best rate is the higher of the two.

Run as ``python -m bench.raw --cache DIR``; prints JSON. Random weights (seed 0), the same weights
the fleet serves in the benchmark, so the figures compare like with like.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
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


def at_once(runtime: OpenVINORuntime, streams: int, batch: np.ndarray, budget_s: float) -> float:
    """Images a second with ``streams`` threads calling at once, each on its own infer request (so
    its own stream), as a model service's batcher workers do: two warm-up calls each, then
    ``budget_s`` of calls."""
    start, done = threading.Barrier(streams), []

    def worker() -> None:
        runtime.predict(batch)
        runtime.predict(batch)
        start.wait()
        ends, calls = time.monotonic() + budget_s, 0
        while time.monotonic() < ends:
            runtime.predict(batch)
            calls += 1
        done.append(calls)

    threads = [threading.Thread(target=worker) for _ in range(streams)]
    for thread in threads:
        thread.start()
    started = time.monotonic()
    for thread in threads:
        thread.join()
    return round(sum(done) * len(batch) / (time.monotonic() - started), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--budget", type=float, default=6.0, help="seconds per measurement")
    parser.add_argument("--models", default="", help="comma-separated names (default: every model)")
    args = parser.parse_args()
    chosen = [s for s in SPECS if not args.models or s.name in args.models.split(",")]
    rng = np.random.default_rng(0)
    results = []
    for spec in chosen:
        size = spec.input_size
        batches = {n: rng.uniform(-120, 120, (n, size, size, 3)).astype(np.float32) for n in (1, 8)}
        keras_runtime = KerasRuntime(spec, PLAN)
        keras_runtime.load()
        openvino = OpenVINORuntime(spec, PLAN, cache_dir=args.cache, streams=1)
        openvino.load()
        auto = OpenVINORuntime(spec, PLAN, cache_dir=args.cache, precision="auto", streams=1)
        auto_info = auto.load()
        int8 = OpenVINORuntime(spec, PLAN, cache_dir=args.cache, precision="int8", streams=1)
        int8_info = int8.load()
        model = build_keras_model(spec, PLAN)
        backends: dict[str, Callable[[np.ndarray], object]] = {
            "keras model.predict (seed's path)": lambda x, m=model: m.predict(x, verbose=0),
            "keras compiled call": keras_runtime.predict,
            "openvino fp32 (latency hint)": openvino.predict,
            f"openvino {auto_info.precision} (PRECISION=auto, latency hint)": auto.predict,
            f"openvino {int8_info.precision} (PRECISION=int8)": int8.predict,
        }
        for backend, call in backends.items():
            for n, batch in batches.items():
                rate = images_per_second(call, batch, args.budget)
                results.append({"model": spec.name, "backend": backend, "batch": n, "img_per_s": rate})
                print(json.dumps(results[-1]), flush=True)
        # int8 as the services compile it by default (the throughput hint's streams); fp32, which
        # they run on one stream by default, on two for comparison
        for precision, streams in (("fp32", 2), ("int8", 0)):
            runtime = OpenVINORuntime(spec, PLAN, cache_dir=args.cache, precision=precision, streams=streams)
            info = runtime.load()
            if info.streams < 2:
                continue
            label = "fp32" if precision == "fp32" else f"{info.precision} (PRECISION=int8)"
            backend = f"openvino {label}, {info.streams} streams at once"
            for n, batch in batches.items():
                rate = at_once(runtime, info.streams, batch, args.budget)
                results.append(
                    {
                        "model": spec.name,
                        "backend": backend,
                        "batch": n,
                        "img_per_s": rate,
                        "streams": info.streams,
                    }
                )
                print(json.dumps(results[-1]), flush=True)
    print("RESULT " + json.dumps(results))


if __name__ == "__main__":
    main()
