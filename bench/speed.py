"""Issue 29's speed targets, measured in one run (part 15 of ``make bench``; alone:
``python -m bench.speed``; results in ``bench/results/speed.md`` and ``speed.json``).

ResNet50, new bytes every request (wrk), on this machine, everything in the same run:

1. the raw runtime per precision (``bench.raw`` for ResNet50 alone): fp32, ``PRECISION=auto``
   (bf16 where this CPU computes it natively and it passed its gate) and int8, best form each;
2. the fleet as ``make run`` starts it, ResNet50 alone (the other services would idle), once per
   precision - ``auto`` (the default), ``fp32`` and ``int8`` - at 1 and 8 clients; for each, the
   batch times ``/v1/model`` gives right after start-up (the warm-up's) and after the load (the
   served calls'), and the CPU every process spent per answered image at 8 clients;
3. perf_analyzer (``bench.perf_analyzer``) against the default fleet, v2 over HTTP and gRPC, a
   concurrency sweep 1-8;
4. the peers (``bench.baselines``: BentoML, LitServe, MLServer serving the same IR, each in the
   arithmetic of the fleet's form it is compared with) at 1 and 8 clients.

Settings differ from ``make run`` in WEIGHTS=random, ResNet50 alone, and no rate limits (the
gateway's and Nginx's for requests without a key): wrk's and perf_analyzer's connections come from
one address, which the limits count as one client.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

from bench import baselines, load
from bench import perf_analyzer as analyzer
from bench.fleets import NO_EDGE_LIMIT, base_env, batching, cpu_name, cpu_seconds, processes, settle
from deploy.local.fleet import ROOT, Fleet
from deploy.local.running import on_free_ports, running

RESULTS = ROOT / "bench" / "results"
PHOTO = (ROOT / "tests" / "fixtures" / "coffee.jpg").read_bytes()
CLIENTS = (1, 8)
FLEETS = ("auto", "fp32", "int8")


def log(message: str) -> None:
    print(f"[speed {time.strftime('%H:%M:%S')}] {message}", flush=True)


def raw(cache: Path, budget_s: float) -> list[dict[str, Any]]:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.raw",
            "--cache",
            str(cache),
            "--budget",
            str(budget_s),
            "--models",
            "resnet50",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    rows: list[dict[str, Any]] = json.loads(line.removeprefix("RESULT "))
    return rows


def served_run(fleet: Any, clients: int, seconds: int) -> dict[str, Any]:
    """One wrk run at ``clients`` with every process's CPU per answered image."""
    roles = processes(fleet, stubs=False)
    before = {role: sum(cpu_seconds(p) for p in pids) for role, pids in roles.items()}
    url = f"{fleet.url}/v1/predict?model=resnet50"
    result = load.run(url, load.Payload.raw(PHOTO), connections=clients, seconds=seconds)
    answered = max(1, result["statuses"].get(200, 0))
    result["cpu_ms_per_image"] = {
        role: round((sum(cpu_seconds(p) for p in pids) - before[role]) * 1000 / answered, 2)
        for role, pids in roles.items()
    }
    settle(fleet, ("resnet50",))
    log(f"c={clients}: {result['img_per_s']} img/s, p50 {result['p50_ms']} ms")
    log(f"c={clients}: CPU ms per image {result['cpu_ms_per_image']}")
    return result


def fleet_runs(
    cache: Path, precision: str, seconds: int, with_analyzer: bool, **settings: str
) -> dict[str, Any]:
    """The fleet (ResNet50 alone) with ``PRECISION=precision`` and ``settings`` over the defaults."""
    with tempfile.TemporaryDirectory(prefix="imagerec-speed-") as folder:
        Path(folder).chmod(0o755)
        env = {**base_env(cache), "PRECISION": precision, "GATEWAY_RATE_LIMIT": "", **settings}
        started = time.monotonic()
        fleet_settings = on_free_ports(Path(folder), models=("resnet50",))
        with running(Fleet(fleet_settings, nginx=NO_EDGE_LIMIT), env, timeout_s=1200) as fleet:
            ready_s = round(time.monotonic() - started, 1)
            model = requests.get(f"{fleet.service_url('resnet50')}/v1/model", timeout=10).json()
            at_start = batching(fleet, "resnet50")
            runs = {clients: served_run(fleet, clients, seconds) for clients in CLIENTS}
            after = batching(fleet, "resnet50")
            sweeps = []
            if with_analyzer:
                reason = analyzer.unavailable()
                if reason:
                    log(f"perf_analyzer skipped: {reason}")
                for protocol, address in (
                    ("http", fleet.url.removeprefix("http://")),
                    ("grpc", fleet.fleet.grpc_address),
                ):
                    if reason:
                        break
                    sweep = analyzer.sweep(protocol, address, "resnet50")
                    log(f"perf_analyzer -i {protocol}: exit {sweep['exit']}, {sweep['rows']}")
                    sweeps.append(sweep)
    return {
        "precision": precision,
        "served": model.get("precision"),
        "precision_note": model.get("precision_note", ""),
        "streams": model.get("streams"),
        "ready_s": ready_s,
        "runs": runs,
        "batch_ms_at_start": at_start["batch_ms"],
        "batch_ms_taken_at_start": at_start["batch_ms_taken"],
        "batch_ms_after": after["batch_ms"],
        "batch_ms_taken_after": after["batch_ms_taken"],
        "perf_analyzer": sweeps,
    }


def peers(cache: Path, seconds: int) -> dict[str, Any]:
    irs = baselines.peer_irs(cache)
    found = {
        "bentoml": baselines.bentoml_baseline(PHOTO, irs, seconds, CLIENTS),
        "litserve": baselines.litserve_baseline(PHOTO, irs, seconds, CLIENTS),
        "mlserver": baselines.mlserver_baseline(PHOTO, irs, seconds, CLIENTS),
    }
    return {name: result for name, result in found.items() if result}


def measure(seconds: int) -> dict[str, Any]:
    cache = Path(os.environ.get("MODEL_CACHE") or Path.home() / ".cache" / "imagerec" / "converted")
    results: dict[str, Any] = {"cpu": cpu_name(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    log("raw runtime, ResNet50")
    results["raw"] = raw(cache, 4.0)
    results["fleets"] = {}
    for precision in FLEETS:
        log(f"the fleet with PRECISION={precision}")
        results["fleets"][precision] = fleet_runs(
            cache, precision, seconds, with_analyzer=precision == "auto"
        )
    log("the peers")
    results["peers"] = peers(cache, seconds)
    return results


# -- the report ---------------------------------------------------------------------------------


def _raw_best(rows: list[dict[str, Any]], label: str) -> dict[str, Any] | None:
    mine = [r for r in rows if label in r["backend"]]
    return max(mine, key=lambda r: r["img_per_s"]) if mine else None


def _peer_best(results: dict[str, Any], precision: str, clients: int) -> tuple[str, dict[str, Any]] | None:
    found = [
        (name, {r["connections"]: r for r in peer[precision]["runs"]}[clients])
        for name, peer in results["peers"].items()
        if precision in peer
    ]
    return max(found, key=lambda f: f[1]["img_per_s"]) if found else None


def _startup(fleet: dict[str, Any]) -> tuple[float, str]:
    """The worst ratio of a size's batch time at start-up to its time after the load, and which."""
    worst, which = 0.0, ""
    for size, start in fleet["batch_ms_at_start"].items():
        warm = fleet["batch_ms_after"].get(size)
        taken = fleet["batch_ms_taken_after"].get(size, {}).get("from")
        if warm and taken == "served" and start / warm > worst:
            worst, which = start / warm, f"batch {size}: {start} ms at start, {warm} served"
    return worst, which


def targets(results: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    fleets = results["fleets"]
    rows: list[tuple[str, str, bool | None]] = []
    auto, fp32, int8 = (fleets.get(p) for p in FLEETS)
    raw_int8 = _raw_best(results["raw"], "PRECISION=int8")
    if int8 and raw_int8:
        fleet_rate = _runs(int8)[8]["img_per_s"]
        core_ms = 2000 / fleet_rate - 2000 / raw_int8["img_per_s"]
        rows.append(
            (
                "plumbing per int8 image at 8 clients, 2,000/fleet - 2,000/raw int8 <= 4.5 core-ms",
                f"2000/{fleet_rate} - 2000/{raw_int8['img_per_s']} = {core_ms:.2f} core-ms",
                core_ms <= 4.5,
            )
        )
    raw_fp32 = _raw_best(results["raw"], "openvino fp32")
    if fp32 and raw_fp32:
        rate = _runs(fp32)[8]["img_per_s"]
        rows.append(
            (
                "fp32 fleet at 8 clients >= 90% of raw fp32's best",
                f"{rate} vs {raw_fp32['img_per_s']} img/s ({raw_fp32['backend']}, "
                f"batch {raw_fp32['batch']}): {rate / raw_fp32['img_per_s']:.0%}",
                rate >= 0.9 * raw_fp32["img_per_s"],
            )
        )
    for precision, fleet, clients, what, factor in (
        ("int8", int8, 8, "int8 at 8 clients >= 1.3x the best peer", 1.3),
        ("fp32", fp32, 8, "fp32 at 8 clients >= 1.1x the best peer", 1.1),
        ("bf16", auto, 8, "auto (bf16 here) at 8 clients >= the best peer in bf16", 1.0),
    ):
        best = _peer_best(results, precision, clients)
        if fleet and best:
            rate = _runs(fleet)[clients]["img_per_s"]
            rows.append(
                (
                    what,
                    f"{rate} vs {best[1]['img_per_s']} img/s ({best[0]}): {rate / best[1]['img_per_s']:.2f}x",
                    rate >= factor * best[1]["img_per_s"],
                )
            )
    best = _peer_best(results, "int8", 1)
    if int8 and best:
        p50 = _runs(int8)[1]["p50_ms"]
        rows.append(
            (
                "int8 at 1 client: p50 no higher than the best peer's",
                f"{p50} vs {best[1]['p50_ms']} ms ({best[0]})",
                p50 <= best[1]["p50_ms"],
            )
        )
    if auto and fp32 and auto["served"] == "bf16":
        a, f = _runs(auto)[8]["img_per_s"], _runs(fp32)[8]["img_per_s"]
        rows.append(
            (
                "auto fleet (bf16 here) at 8 clients >= 1.6x the fp32 fleet",
                f"{a} vs {f} img/s: {a / f:.2f}x",
                a >= 1.6 * f,
            )
        )
    elif auto:
        rows.append(
            (
                "auto serves fp32 where the CPU has no bf16, and says so",
                f"served {auto['served']}: {auto['precision_note']}",
                auto["served"] == "fp32" and bool(auto["precision_note"]),
            )
        )
    for name, fleet in fleets.items():
        worst, which = _startup(fleet)
        rows.append(
            (
                f"start-up batch times within 1.5x the served ones ({name})",
                f"worst {worst:.2f}x, {which}",
                worst <= 1.5,
            )
        )
    if auto:
        sweeps = auto["perf_analyzer"]
        for sweep in sweeps:
            levels = [r["concurrency"] for r in sweep["rows"]]
            rows.append(
                (
                    f"perf_analyzer -i {sweep['protocol']}: a sweep 1-8 with 0 errors",
                    f"exit {sweep['exit']}, levels {levels}",
                    sweep["exit"] == 0 and levels == list(range(1, 9)),
                )
            )
        if not sweeps:
            rows.append(("perf_analyzer sweeps", "not run (see the log)", None))
    return rows


def _runs(fleet: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {int(clients): run for clients, run in fleet["runs"].items()}


def _row(*cells: object) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def _cells(runs: dict[int, dict[str, Any]]) -> tuple[object, ...]:
    one, eight = runs[1], runs[8]
    return one["img_per_s"], one["p50_ms"], eight["img_per_s"], eight["p50_ms"], eight["p99_ms"]


def report(results: dict[str, Any]) -> str:
    lines = [
        f"# Speed: the fleet, its runtime and the peers ({results['started']}, {results['cpu']})",
        "",
        "`python -m bench.speed` (part 15 of `make bench`): ResNet50, new bytes every request, one run. "
        "See the module's docstring for what differs from `make run`.",
        "",
        "## Targets (issue 29)",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    for what, measured, met in targets(results):
        lines.append(f"| {what} | {measured} | {'n/a' if met is None else 'yes' if met else '**no**'} |")
    lines += ["", "## The fleet and the peers at 1 and 8 clients", ""]
    lines += [
        "| server | precision | 1 client img/s | p50 ms | 8 clients img/s | p50 ms | p99 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, fleet in results["fleets"].items():
        runs = _runs(fleet)
        lines.append(_row(f"fleet, PRECISION={name}", fleet["served"], *_cells(runs)))
    for name, peer in results["peers"].items():
        for precision in ("fp32", "bf16", "int8"):
            if precision in peer:
                runs = {r["connections"]: r for r in peer[precision]["runs"]}
                lines.append(_row(f"{name} {peer['version']}", precision, *_cells(runs)))
    lines += ["", "## CPU per answered image at 8 clients, by process (core-ms)", ""]
    roles = sorted({role for f in results["fleets"].values() for role in _runs(f)[8]["cpu_ms_per_image"]})
    lines += ["| fleet | " + " | ".join(roles) + " |", "|---|" + "---|" * len(roles)]
    for name, fleet in results["fleets"].items():
        cpu = _runs(fleet)[8]["cpu_ms_per_image"]
        lines.append(f"| {name} | " + " | ".join(str(cpu.get(role, "")) for role in roles) + " |")
    lines += [
        "",
        "## The raw runtime (ResNet50, in process)",
        "",
        "| form | batch | img/s |",
        "|---|---|---|",
    ]
    for row in results["raw"]:
        lines.append(f"| {row['backend']} | {row['batch']} | {row['img_per_s']} |")
    lines += ["", "## Batch times at start-up and after the load (ms)", ""]
    for name, fleet in results["fleets"].items():
        start, after = fleet["batch_ms_at_start"], fleet["batch_ms_after"]
        taken = fleet["batch_ms_taken_after"]
        cells = ", ".join(
            f"{size}: {start[size]} -> {after.get(size)} ({taken.get(size, {}).get('from')})"
            for size in start
        )
        lines.append(f"- {name} (served {fleet['served']}, ready in {fleet['ready_s']} s): {cells}")
    auto = results["fleets"].get("auto")
    if auto and auto["perf_analyzer"]:
        lines += ["", "## perf_analyzer against the default fleet (ResNet50, v2, one JPEG per request)", ""]
        lines += ["| protocol | concurrency | infer/s | p50 ms | p99 ms |", "|---|---|---|---|---|"]
        for sweep in auto["perf_analyzer"]:
            for row in sweep["rows"]:
                lines.append(
                    _row(
                        sweep["protocol"], row["concurrency"], row["img_per_s"], row["p50_ms"], row["p99_ms"]
                    )
                )
    return "\n".join(lines) + "\n"


def write(results: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "speed.json").write_text(json.dumps(results, indent=2))
    (RESULTS / "speed.md").write_text(report(results))


def main() -> int:
    seconds = int(os.environ.get("BENCH_SECONDS", "15"))
    write(measure(seconds))
    log(f"written: {RESULTS}/speed.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
