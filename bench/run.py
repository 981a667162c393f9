"""``make bench``: every measurement of issue #3 in one run on one machine, written to bench/results/.

1. raw in-process throughput per model and backend, batch 1 and 8 (bench/raw.py);
2. end to end through Nginx -> gateway -> service at concurrency 1, 8, 32, per model and ensemble;
3. the seed-style baseline (bench/seed_server.py, gunicorn -w 4) under the same load;
4. gateway + Nginx overhead with stub model services, and the request rate they sustain;
5. 12 MP JPEG ingestion, plain Pillow vs ours (bench/ingest.py);
6. resident memory of every process, idle and after the load;
7. overload: an open-loop client at 4x capacity against the default settings (bench/overload.py).
Runs 2-6 measure throughput with closed-loop clients (wrk) that never honour Retry-After, so their
fleets allow a long queue (MAX_QUEUE_DELAY_MS=60000, the throughput configuration); run 7 measures the
default, latency-bounded one.
Random weights throughout (the ImageNet files cannot be had here); speed does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

from bench import ingest, load, overload, report
from deploy.local.fleet import ROOT, ExtraService, Fleet
from deploy.local.running import free_port, on_free_ports, rss_mb, running, wait_until

RESULTS = ROOT / "bench" / "results"
PHOTO = (ROOT / "tests" / "fixtures" / "chelsea.jpg").read_bytes()
MODELS = ("resnet50", "inceptionv3", "vgg16")


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def base_env(cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "FLEET_"))}
    # capacity is what is measured: per-client rate limits off (wrk is one client), and a queue long
    # enough for closed-loop clients (the default sheds them: see run 7)
    env.update(
        MAX_QUEUE_DELAY_MS="60000",
        GATEWAY_CACHE_SIZE="0",  # one photo, sent again and again: the models must compute it
        WEIGHTS="random",
        BACKEND="auto",
        MODEL_CACHE=str(cache),
        TF_CPP_MIN_LOG_LEVEL="2",
        GATEWAY_RATE_LIMIT="",
    )
    return env


def settle(url: str) -> None:
    """Wait out the backlog a load run leaves queued (answers are FIFO), so runs do not overlap."""
    requests.post(url, data=PHOTO, headers={"Content-Type": "image/jpeg"}, timeout=300)


def raw_throughput(cache: Path, budget: float) -> list[dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, "-m", "bench.raw", "--cache", str(cache), "--budget", str(budget)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=base_env(cache),
        check=True,
    )
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])  # type: ignore[no-any-return]


def end_to_end(cache: Path, seconds: int, concurrencies: tuple[int, ...]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="imagerec-bench-") as folder:
        Path(folder).chmod(0o755)
        with running(Fleet(on_free_ports(Path(folder), models=MODELS)), base_env(cache)) as fleet:
            idle = fleet.memory_mb()
            for target in (*MODELS, "ensemble"):  # warm every path once, so growth means a leak
                url = f"{fleet.url}/v1/predict?model={target}"
                load.run(url, load.Payload.raw(PHOTO), connections=8, seconds=min(seconds, 5))
                settle(url)
            warm = fleet.memory_mb()
            runs = []
            for target in (*MODELS, "ensemble"):
                for connections in concurrencies:
                    url = f"{fleet.url}/v1/predict?model={target}"
                    result = load.run(url, load.Payload.raw(PHOTO), connections=connections, seconds=seconds)
                    runs.append({"target": target, "path": "nginx -> gateway -> service", **result})
                    settle(url)
                    log(
                        f"e2e {target} c={connections}: {result['img_per_s']} img/s p50 {result['p50_ms']} ms"
                    )
            backends = {
                m["name"]: m["backend"]
                for m in requests.get(f"{fleet.url}/v1/models", timeout=10).json()["models"]
            }
            batching = {
                name: requests.get(f"{fleet.service_url(name)}/v1/model", timeout=10).json()["batching"]
                for name in MODELS
            }
            return {
                "runs": runs,
                "memory_idle_mb": idle,
                "memory_warm_mb": warm,
                "memory_after_mb": fleet.memory_mb(),
                "backends": backends,
                "batching": batching,
            }


BENTOML = ROOT / "bench" / ".venv-bento" / "bin" / "bentoml"


def baseline(
    target: str,
    path: str,
    command: list[str],
    url: str,
    field: str,
    seconds: int,
    concurrencies: tuple[int, ...],
) -> dict[str, Any]:
    """Start another server, warm it, load it like the fleet, and stop it."""
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_until(lambda: requests.post(url, files={field: PHOTO}, timeout=60).ok, 300, target)
        for _ in range(8):  # several workers each load their model on their first requests
            requests.post(url, files={field: PHOTO}, timeout=120)
        idle = rss_mb(process.pid)
        runs = []
        for connections in concurrencies:
            payload = load.Payload.multipart(PHOTO, field=field)
            result = load.run(url, payload, connections=connections, seconds=seconds)
            runs.append({"target": target, "path": path, **result})
            requests.post(url, files={field: PHOTO}, timeout=300)  # settle the backlog
            log(f"{target} c={connections}: {result['img_per_s']} img/s, p50 {result['p50_ms']} ms")
        return {"runs": runs, "memory_idle_mb": idle, "memory_after_mb": rss_mb(process.pid)}
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(60)


def seed_baseline(seconds: int, concurrencies: tuple[int, ...]) -> dict[str, Any]:
    """The article's approach (bench/seed_server.py) under gunicorn -w 4."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "gunicorn",
        "-w",
        "4",
        "--timeout",
        "300",
        "--bind",
        f"127.0.0.1:{port}",
        "bench.seed_server:app",
    ]
    return baseline(
        "seed-style resnet50",
        "gunicorn -w 4, model.predict",
        command,
        f"http://127.0.0.1:{port}/predict",
        "file",
        seconds,
        concurrencies,
    )


def bentoml_baseline(seconds: int, concurrencies: tuple[int, ...]) -> dict[str, Any] | None:
    """BentoML serving the same ResNet50 (bench/bento_service.py), when its virtualenv exists."""
    if not BENTOML.exists():
        log("BentoML is not installed (bench/.venv-bento): skipped")
        return None
    port = free_port()
    command = [
        str(BENTOML),
        "serve",
        "bench.bento_service:ResNet50",
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
    ]
    return baseline(
        "bentoml resnet50",
        "bentoml serve, adaptive batching",
        command,
        f"http://127.0.0.1:{port}/predict",
        "images",
        seconds,
        concurrencies,
    )


def overhead(seconds: int) -> dict[str, Any]:
    """Nginx + gateway with stub services: the latency they add and the request rate they sustain."""
    with tempfile.TemporaryDirectory(prefix="imagerec-bench-") as folder:
        Path(folder).chmod(0o755)
        stubs = [ExtraService(name, free_port(), "bench.stub_service:create_app()") for name in MODELS]
        settings = on_free_ports(Path(folder), models=())
        with running(Fleet(settings, stubs), base_env(Path(folder))) as fleet:
            payload = load.Payload.raw(PHOTO)
            direct = load.run(
                f"{fleet.service_url('resnet50')}/v1/predict", payload, connections=1, seconds=seconds
            )
            edge = load.run(f"{fleet.url}/v1/predict?model=resnet50", payload, connections=1, seconds=seconds)
            rate = load.run(
                f"{fleet.url}/v1/predict?model=resnet50", payload, connections=16, seconds=seconds
            )
            ensemble = load.run(
                f"{fleet.url}/v1/predict?model=ensemble", payload, connections=16, seconds=seconds
            )
    log(f"overhead p50: direct {direct['p50_ms']} ms, via nginx+gateway {edge['p50_ms']} ms")
    return {
        "direct_stub_p50_ms": direct["p50_ms"],
        "edge_stub_p50_ms": edge["p50_ms"],
        "added_p50_ms": round(edge["p50_ms"] - direct["p50_ms"], 2),
        "edge_stub_req_per_s_c16": rate["img_per_s"],
        "edge_stub_ensemble_req_per_s_c16": ensemble["img_per_s"],
        "errors": direct["errors"] + edge["errors"] + rate["errors"] + ensemble["errors"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=15, help="duration of each load run")
    parser.add_argument("--quick", action="store_true", help="short runs, to try the benchmark out")
    args = parser.parse_args()
    seconds = 5 if args.quick else args.seconds
    concurrencies = (1, 8, 32)
    RESULTS.mkdir(parents=True, exist_ok=True)
    cache = Path(os.environ.get("MODEL_CACHE") or Path.home() / ".cache" / "imagerec" / "converted")
    started = time.time()
    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "seconds_per_run": seconds,
    }
    log("5/6 ingestion")
    results["ingestion"] = ingest.measure()
    log("1/6 raw in-process throughput")
    results["raw"] = raw_throughput(cache, 2.0 if args.quick else 6.0)
    log("2/6 end to end (and 6/6 memory)")
    results["e2e"] = end_to_end(cache, seconds, concurrencies)
    log("3/6 seed-style baseline")
    results["seed"] = seed_baseline(seconds, concurrencies)
    log("3b/6 BentoML serving the same model")
    results["bentoml"] = bentoml_baseline(seconds, concurrencies)
    log("4/6 gateway + Nginx overhead with stub services")
    results["overhead"] = overhead(seconds)
    log("7/7 overload at 4x capacity")
    results["overload"] = overload.measure(cache, seconds)
    results["duration_s"] = round(time.time() - started)
    (RESULTS / "results.json").write_text(json.dumps(results, indent=2))
    report.write(results, RESULTS)
    log(f"done in {results['duration_s']} s: {RESULTS}/results.md")
    return 0


if __name__ == "__main__":
    if not shutil.which("wrk"):
        sys.exit("make bench needs wrk: apt-get install wrk")
    sys.exit(main())
