"""Overload: an open-loop client offering N x the model's capacity; what accepted and shed
requests see. ``python -m bench.overload`` runs this part alone; ``make bench`` includes it.

Open loop (requests leave on a fixed schedule, whatever the answers) is what overload is: wrk's
closed loop slows down with the server and never offers more than it can take. Steps, on one fleet
with default settings: unloaded latency (one request at a time), capacity (two clients, the most the
default admission bound keeps in a CPU model's pipeline), then the schedule at ``factor`` x capacity.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import requests

from deploy.local.fleet import ROOT, Fleet
from deploy.local.running import on_free_ports, running

PHOTO = (ROOT / "tests" / "fixtures" / "chelsea.jpg").read_bytes()
_local = threading.local()


def _send(url: str) -> tuple[int, float, str | None]:
    session = getattr(_local, "session", None) or requests.Session()
    _local.session = session
    started = time.perf_counter()
    response = session.post(url, data=PHOTO, headers={"Content-Type": "image/jpeg"}, timeout=60)
    return response.status_code, (time.perf_counter() - started) * 1000, response.headers.get("Retry-After")


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0}
    p50, p99 = np.percentile(values, [50, 99])
    return {"p50_ms": round(float(p50), 1), "p99_ms": round(float(p99), 1), "max_ms": round(max(values), 1)}


def closed_loop(url: str, clients: int, seconds: float) -> dict[str, Any]:
    stop = time.monotonic() + seconds
    results: list[tuple[int, float, str | None]] = []

    def client() -> None:
        while time.monotonic() < stop:
            results.append(_send(url))

    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client) for _ in range(clients)]:
            future.result()
    ok = [ms for status, ms, _ in results if status == 200]
    return {
        "clients": clients,
        "req_per_s": round(len(ok) / seconds, 2),
        "errors": len(results) - len(ok),
        **_percentiles(ok),
    }


def open_loop(url: str, rate: float, seconds: float) -> dict[str, Any]:
    """Send at ``rate`` per second for ``seconds``, on schedule, from a pool big enough never to wait."""
    count = int(rate * seconds)
    start = time.perf_counter() + 0.2
    late: list[float] = []

    def scheduled(i: int) -> tuple[int, float, str | None]:
        due = start + i / rate
        time.sleep(max(0.0, due - time.perf_counter()))
        late.append((time.perf_counter() - due) * 1000)
        return _send(url)

    with ThreadPoolExecutor(max(64, int(rate * 2))) as pool:
        results = list(pool.map(scheduled, range(count)))
    elapsed = time.perf_counter() - start
    accepted = [ms for status, ms, _ in results if status == 200]
    shed = [ms for status, ms, _ in results if status in (429, 503)]
    other = [status for status, _, _ in results if status not in (200, 429, 503)]
    return {
        "offered_req_per_s": round(rate, 2),
        "requests": count,
        "accepted": len(accepted),
        "shed": len(shed),
        "other_errors": len(other),
        "shed_with_retry_after": sum(1 for status, _, ra in results if status in (429, 503) and ra),
        "goodput_req_per_s": round(len(accepted) / elapsed, 2),
        "accepted_latency": _percentiles(accepted),
        "shed_latency": _percentiles(shed),
        "schedule_lag_p99_ms": round(float(np.percentile(late, 99)), 1),
    }


def measure(cache: Path, seconds: int, factor: float = 4.0, model: str = "resnet50") -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "FLEET_", "MAX_QUEUE"))}
    env.update(
        WEIGHTS="random",
        MODEL_CACHE=str(cache),
        TF_CPP_MIN_LOG_LEVEL="2",
        GATEWAY_RATE_LIMIT="",
        GATEWAY_CACHE_SIZE="0",  # one photo, sent again and again: the model must compute it
    )
    with tempfile.TemporaryDirectory(prefix="imagerec-overload-") as folder:
        Path(folder).chmod(0o755)
        with running(Fleet(on_free_ports(Path(folder), models=(model,))), env) as fleet:
            url = f"{fleet.url}/v1/predict?model={model}"
            for _ in range(10):
                _send(url)
            unloaded = closed_loop(url, 1, seconds)
            capacity = closed_loop(url, 2, seconds)
            overload = open_loop(url, factor * capacity["req_per_s"], seconds)
            batching = requests.get(f"{fleet.service_url(model)}/v1/model", timeout=10).json()["batching"]
    return {
        "model": model,
        "factor": factor,
        "unloaded": unloaded,
        "capacity": capacity,
        "overload": overload,
        "service_batching": batching,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--factor", type=float, default=4.0)
    parser.add_argument("--write", action="store_true", help="merge into bench/results and redo the report")
    args = parser.parse_args()
    cache = Path(os.environ.get("MODEL_CACHE") or Path.home() / ".cache" / "imagerec" / "converted")
    measured = measure(cache, args.seconds, args.factor)
    print(json.dumps(measured, indent=2))
    if args.write:
        from bench import report

        folder = ROOT / "bench" / "results"
        results = json.loads((folder / "results.json").read_text())
        results["overload"] = measured
        (folder / "results.json").write_text(json.dumps(results, indent=2))
        report.write(results, folder)


if __name__ == "__main__":
    main()
