"""``make bench``: the fleet as ``make run`` starts it, measured on this machine in one run.

1. raw in-process throughput per model and backend, batch 1 and 8 (bench/raw.py);
2. end to end through Nginx -> gateway -> service on the default settings: ResNet50 at 1, 2, 8, 32
   and 64 clients, the other models and the ensemble at 1, 8 and 32; clients never honour
   Retry-After and every request has new bytes (wrk), so the response cache never answers;
3. the seed-style server (bench/seed_server.py) under the same load, and the peers - BentoML, LitServe
   and MLServer, each serving the fleet's own ResNet50 IR, fp32 and int8, batching up to 8 - under
   the same sweep (bench/baselines.py);
4. gateway + Nginx overhead with stub model services, and cache hits (the same photo again);
5. 12 MP JPEG ingestion, plain Pillow vs ours (bench/ingest.py);
6. resident memory of every process, idle and after the load;
7. overload: an open-loop client at 4x capacity on the same fleet (bench/overload.py);
8. asynchronous jobs: a 2,000-photo ResNet50 job alone, and beside one interactive client
   (bench/jobs.py), on the same fleet and its one worker;
9. int8: the same fleet with PRECISION=int8 - ResNet50 at 1 and 8 clients, every process's memory
   after load, and each model's quality-gate figures;
10. authentication: the p50 a key adds to a ResNet50 prediction at 1 client (bench/auth.py);
11. custom classes: a ResNet50 custom model trained through Nginx (time, held-out and fresh
   accuracy), the memory ten more custom models add, and a fine-tuned one's time, accuracy,
   memory and latency (bench/custom.py), on the default fleet;
12. containers: image sizes, compose's start times and memory, and ResNet50 at 8 clients through
   compose next to make run's fleet (bench/containers.py, bench/results/containers.md);
13. fair sharing under hostile load: a photo's p50 under a URL flood to a host that never answers,
   another key's job behind four 1,000-URL jobs, 10,000 one-URL jobs and Redis memory
   (bench/fairness.py, bench/results/fairness.md; the fetcher may reach loopback there).
14. a soak: 30 minutes (``BENCH_SOAK_S``) of mixed traffic on the whole default fleet, every
   process's memory and descriptors, Redis memory, the run folder's bytes and the interactive
   p50/p99 per five minutes (bench/soak.py, bench/results/soak.md), measured last;
15. speed (issue 29): ResNet50's raw runtime per precision, the fleet with PRECISION=auto (the
   default), fp32 and int8 at 1 and 8 clients with every process's CPU per image and the batch
   times at start-up and after the load, perf_analyzer over v2 HTTP and gRPC, and the peers at
   1 and 8 clients (bench/speed.py, bench/results/speed.md).
16. explanations (issue 30): one interactive client's p50 and p99 alone and while another client
   asks for explanations back to back, and the forward passes each cost (bench/explain.py,
   bench/results/explain.md).
Random weights throughout (the ImageNet files cannot be had here); speed does not depend on them.
Settings differ from ``make run`` only in WEIGHTS=random; no rate limits (the gateway's, and
Nginx's for requests without a key) in part 4's cache run and part 9's int8 run (wrk's connections
come from one address, which the limiters count as one client); and the fetcher reaching loopback
in parts 13 and 14.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

from bench import (
    auth,
    baselines,
    containers,
    custom,
    explain,
    fairness,
    ingest,
    jobs,
    load,
    overload,
    protocols,
    report,
    soak,
    speed,
)
from bench.fleets import MODELS, NO_EDGE_LIMIT, base_env, batching, cpu_name, settle
from deploy.local.fleet import ROOT, ExtraService, Fleet
from deploy.local.running import free_port, on_free_ports, running
from serving.quantize import LAYOUT

RESULTS = ROOT / "bench" / "results"
PHOTO = (ROOT / "tests" / "fixtures" / "coffee.jpg").read_bytes()  # 600x400, as a phone thumbnail
SWEEP = (1, 2, 8, 32, 64)  # ResNet50, the seed-style server and the peers
OTHERS = (1, 8, 32)  # the other models and the ensemble
JOB_IMAGES = 2000


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


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
    return json.loads(line[len("RESULT ") :])


def measured_run(fleet: Any, target: str, connections: int, seconds: int) -> dict[str, Any]:
    """One closed-loop run through Nginx, with the average batch the model formed during it."""
    url = f"{fleet.url}/v1/predict?model={target}"
    member = target if target in MODELS else "resnet50"
    before = batching(fleet, member)
    result = load.run(url, load.Payload.raw(PHOTO), connections=connections, seconds=seconds)
    after = batching(fleet, member)
    settle(fleet)
    images, batches = after["images"] - before["images"], after["batches"] - before["batches"]
    result.update(
        target=target,
        path="nginx -> gateway -> service",
        average_batch=round(images / batches, 2) if batches else 0.0,
    )
    log(
        f"e2e {target} c={connections}: {result['img_per_s']} img/s p50 {result['p50_ms']} ms "
        f"p99 {result['p99_ms']} ms, refused {result['refused']}, batch {result['average_batch']}"
    )
    return result


def end_to_end(cache: Path, seconds: int) -> dict[str, Any]:
    """The sweep and the overload run, on one fleet started with the default settings."""
    with tempfile.TemporaryDirectory(prefix="imagerec-bench-") as folder:
        Path(folder).chmod(0o755)
        with running(Fleet(on_free_ports(Path(folder), models=MODELS)), base_env(cache)) as fleet:
            idle = fleet.memory_mb()
            for target in (*MODELS, "ensemble"):  # warm every path once, so growth means a leak
                url = f"{fleet.url}/v1/predict?model={target}"
                load.run(url, load.Payload.raw(PHOTO), connections=8, seconds=min(seconds, 5))
                settle(fleet)
            warm = fleet.memory_mb()
            runs = [measured_run(fleet, "resnet50", c, seconds) for c in SWEEP]
            runs += [measured_run(fleet, t, c, seconds) for t in (*MODELS[1:], "ensemble") for c in OTHERS]
            authentication = auth.measure_on(fleet)
            log(
                f"auth: a key adds {authentication['median_added_p50_ms']} ms to ResNet50's p50 at 1 client "
                f"(median of {authentication['rounds']} interleaved rounds)"
            )
            capacity = max(r["img_per_s"] for r in runs if r["target"] == "resnet50")
            log(f"jobs: {JOB_IMAGES} photos alone, then beside one interactive client")
            batch = jobs.measure_on(fleet, PHOTO, JOB_IMAGES, seconds)
            settle(fleet)
            quiet, busy = batch["interactive_unloaded"], batch["interactive_during_job"]
            log(
                f"jobs: alone {batch['job_alone']['img_per_s']} img/s, beside a client "
                f"{batch['job_with_interactive']['img_per_s']} img/s; interactive p50 "
                f"{quiet['p50_ms']} -> {busy['p50_ms']} ms ({batch['p50_ratio']}x)"
            )
            log("custom classes: train on 100 photos, classify fresh ones, ten more models")
            trained = custom.measure_on(fleet)
            settle(fleet)
            t = trained["training"]
            log(
                f"custom: {t['status']} in {t['seconds']} s ({t['images']} photos, {t['epochs']} epochs), "
                f"held out {t['held_out_accuracy']}, fresh {t['fresh_accuracy']}; ten more models "
                f"+{trained['ten_models_mb']['added']} MB"
            )
            f = trained["fine_tuned"]
            log(
                f"custom, fine-tuned: {f['status']} in {f['seconds']} s (published after "
                f"{f.get('to_published_s')} s), fresh {f['fresh_accuracy']}, resnet50 service "
                f"+{f['added_mb']} MB, p50 {f['fine_tuned_p50_ms']} vs {f['resnet50_p50_ms']} ms"
            )
            log(f"overload: open loop at 4x {capacity} req/s")
            pressure = overload.measure_on(
                f"{fleet.url}/v1/predict?model=resnet50",
                fleet.service_url("resnet50"),
                capacity,
                seconds,
                4.0,
            )
            log(
                f"overload: goodput {pressure['goodput_share']:.0%} of capacity, refusals p99 "
                f"{pressure['refusal_latency']['p99_ms']} ms, {pressure['connection_errors']} connection "
                f"errors, {pressure['bad_gateway']} 502s, {pressure['missed_deadline']} missed deadlines"
            )
            listed = requests.get(f"{fleet.url}/v1/models", timeout=10).json()["models"]
            backends = {m["name"]: m["backend"] for m in listed}
            return {
                "runs": runs,
                "auth": authentication,
                "jobs": batch,
                "custom": trained,
                "overload": pressure,
                "memory_idle_mb": idle,
                "memory_warm_mb": warm,
                "memory_after_mb": fleet.memory_mb(),
                "backends": backends,
                "precision": {m["name"]: m.get("precision") for m in listed},
                "batching": {name: batching(fleet, name) for name in MODELS},
            }


def int8_fleet(cache: Path, seconds: int) -> dict[str, Any]:
    """The default fleet with PRECISION=int8 (quantized at start-up, or from the cache)."""
    with tempfile.TemporaryDirectory(prefix="imagerec-bench-") as folder:
        Path(folder).chmod(0o755)
        # Rate limit off, as in every int8 part: wrk's 8 connections are one client, which the
        # default limit refuses above its rate (run of 13:37 UTC, 2026-12-06: 4,196 refused, 99.8 img/s)
        env = {**base_env(cache), "PRECISION": "int8", "GATEWAY_RATE_LIMIT": ""}
        int8 = Fleet(on_free_ports(Path(folder), models=MODELS), nginx=NO_EDGE_LIMIT)
        with running(int8, env, timeout_s=900) as fleet:
            loaded = fleet.memory_mb()
            url = f"{fleet.url}/v1/predict?model=resnet50"
            load.run(url, load.Payload.raw(PHOTO), connections=8, seconds=min(seconds, 5))
            settle(fleet)
            runs = [measured_run(fleet, "resnet50", c, seconds) for c in (1, 8)]
            listed = requests.get(f"{fleet.url}/v1/models", timeout=10).json()["models"]
            after = fleet.memory_mb()
    gates = {}
    for record in cache.glob(f"*-int8v{LAYOUT}-*/record.json"):
        name = record.parent.name.split("-", 1)[0]
        if name in MODELS and "random0" in record.parent.name:
            gates[name] = {c["precision"]: c["gate"] for c in json.loads(record.read_text())["candidates"]}
    return {
        "runs": runs,
        "precision": {m["name"]: m.get("precision") for m in listed},
        "gates": gates,
        "memory_loaded_mb": loaded,
        "memory_after_mb": after,
    }


def overhead(cache: Path, seconds: int) -> dict[str, Any]:
    """Nginx + gateway with stub services: the latency they add, the request rate they sustain, and
    the rate of cache hits (the same photo again and again: the gateway answers from its cache)."""
    with tempfile.TemporaryDirectory(prefix="imagerec-bench-") as folder:
        Path(folder).chmod(0o755)
        stubs = [ExtraService(name, free_port(), "bench.stub_service:create_app()") for name in MODELS]
        settings = on_free_ports(Path(folder), models=())
        env = {**base_env(cache), "GATEWAY_RATE_LIMIT": ""}  # wrk's connections are one client
        with running(Fleet(settings, stubs, nginx=NO_EDGE_LIMIT), env) as fleet:
            payload = load.Payload.raw(PHOTO)
            url = f"{fleet.url}/v1/predict?model=resnet50"
            direct = load.run(
                f"{fleet.service_url('resnet50')}/v1/predict", payload, connections=1, seconds=seconds
            )
            edge = load.run(url, payload, connections=1, seconds=seconds)
            rate = load.run(url, payload, connections=16, seconds=seconds)
            ensemble = load.run(
                f"{fleet.url}/v1/predict?model=ensemble", payload, connections=16, seconds=seconds
            )
            hits = load.run(url, payload, connections=16, seconds=seconds, same_bytes=True)
    log(f"overhead p50: direct {direct['p50_ms']} ms, via nginx+gateway {edge['p50_ms']} ms")
    log(f"cache hits at 16 clients: {hits['img_per_s']} req/s, p50 {hits['p50_ms']} ms")
    return {
        "direct_stub_p50_ms": direct["p50_ms"],
        "edge_stub_p50_ms": edge["p50_ms"],
        "added_p50_ms": round(edge["p50_ms"] - direct["p50_ms"], 2),
        "edge_stub_req_per_s_c16": rate["img_per_s"],
        "edge_stub_ensemble_req_per_s_c16": ensemble["img_per_s"],
        "cache_hits_req_per_s_c16": hits["img_per_s"],
        "cache_hits_p50_ms": hits["p50_ms"],
        "errors": direct["errors"] + edge["errors"] + rate["errors"] + ensemble["errors"] + hits["errors"],
    }


def custom_only(cache: Path) -> dict[str, Any]:
    """Section 10 alone, on a fleet started with the default settings like section 2's."""
    with tempfile.TemporaryDirectory(prefix="imagerec-bench-") as folder:
        Path(folder).chmod(0o755)
        with running(Fleet(on_free_ports(Path(folder), models=MODELS)), base_env(cache)) as fleet:
            return custom.measure_on(fleet)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=15, help="duration of each load run")
    parser.add_argument("--quick", action="store_true", help="short runs, to try the benchmark out")
    parser.add_argument(
        "--only",
        choices=["custom"],
        help="measure one section again on a fresh default fleet and update results.json and the report",
    )
    args = parser.parse_args()
    seconds = 5 if args.quick else args.seconds
    RESULTS.mkdir(parents=True, exist_ok=True)
    cache = Path(os.environ.get("MODEL_CACHE") or Path.home() / ".cache" / "imagerec" / "converted")
    if args.only == "custom":
        results = json.loads((RESULTS / "results.json").read_text())
        log("10: custom classes alone")
        results["custom"] = custom_only(cache)
        results["custom"]["measured"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        (RESULTS / "results.json").write_text(json.dumps(results, indent=2))
        report.write(results, RESULTS)
        log(f"done: {RESULTS}/results.md")
        return 0
    started = time.time()
    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "cpu": cpu_name(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "seconds_per_run": seconds,
    }
    log("5/7 ingestion")
    results["ingestion"] = ingest.measure()
    log("1/7 raw in-process throughput")
    results["raw"] = raw_throughput(cache, 2.0 if args.quick else 6.0)
    log("2/7 end to end on the defaults (and 6/7 memory, 7/7 overload)")
    results["e2e"] = end_to_end(cache, seconds)
    results["overload"] = results["e2e"].pop("overload")
    results["jobs"] = results["e2e"].pop("jobs")
    results["custom"] = results["e2e"].pop("custom")
    log("9/9 int8: the same fleet with PRECISION=int8")
    results["int8"] = int8_fleet(cache, seconds)
    log("9b/9 int8: goodput of the JPEG body, binary REST v2 and gRPC (bench/results/protocols.md)")
    results["protocols"] = protocols.measure(cache, "int8", seconds, rounds=3)
    protocols.write({**results["protocols"], "measured": results["started"], "cpus": os.cpu_count()})
    log("3/7 seed-style baseline")
    results["seed"] = baselines.seed_baseline(PHOTO, seconds, SWEEP)
    log("3b/7 the peers serving the fleet's ResNet50 IR: BentoML, LitServe, MLServer")
    irs = baselines.peer_irs(cache)
    log(f"peers: serving {', '.join(f'{p} {ir}' for p, ir in irs.items())}")
    if "int8" not in irs:
        log("peers: no int8 IR admitted by the quality gate in the cache: their int8 sweeps skipped")
    results["peers"] = {
        "bentoml": baselines.bentoml_baseline(PHOTO, irs, seconds, SWEEP),
        "litserve": baselines.litserve_baseline(PHOTO, irs, seconds, SWEEP),
        "mlserver": baselines.mlserver_baseline(PHOTO, irs, seconds, SWEEP),
    }
    log("4/7 gateway + Nginx overhead with stub services, cache hits")
    results["overhead"] = overhead(cache, seconds)
    log("12: the compose fleet against make run's (bench/results/containers.md)")
    reason = containers.docker_engine.why_not()
    if reason:
        log(f"containers skipped: {reason}")
    else:
        containers.write(containers.measure(seconds, int(os.environ.get("BENCH_ROUNDS", "3"))))
    log("13: fair sharing under hostile load (bench/results/fairness.md)")
    fairness.write(fairness.measure(seconds))
    log("15: speed: the fleet per precision, perf_analyzer, the peers (bench/results/speed.md)")
    speed.write(speed.measure(seconds))
    log("16: an interactive client while explanations run (bench/results/explain.md)")
    explain.write(explain.measure(seconds))
    log("14: a soak of mixed traffic (bench/results/soak.md)")
    soak.write(soak.measure(float(os.environ.get("BENCH_SOAK_S", "1800")), 20.0))
    results["duration_s"] = round(time.time() - started)
    (RESULTS / "results.json").write_text(json.dumps(results, indent=2))
    report.write(results, RESULTS)
    log(f"done in {results['duration_s']} s: {RESULTS}/results.md")
    return 0


if __name__ == "__main__":
    if not shutil.which("wrk"):
        sys.exit("make bench needs wrk: apt-get install wrk")
    sys.exit(main())
