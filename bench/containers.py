"""``python -m bench.containers`` (and a part of ``make bench``): what a user of containers asks for.

Each image's size; the time from ``docker-compose up`` to every healthcheck green on fresh volumes
and again after ``down`` (volumes kept: converted models cached); each container's resident memory
at rest and under load; and ResNet50 goodput at 8 clients (wrk, new bytes every request) through the
compose fleet next to the same figure through ``make run``'s fleet, in the same run. Both on their
defaults with WEIGHTS=random. Results in bench/results/containers.{json,md}.
"""

from __future__ import annotations

import json
import os
import platform
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench import load
from bench.fleets import MODELS, base_env, settle
from deploy.docker import engine as docker_engine
from deploy.docker import project
from deploy.local.fleet import ROOT, Fleet
from deploy.local.running import on_free_ports, running

RESULTS = ROOT / "bench" / "results"
PHOTO = (ROOT / "tests" / "fixtures" / "coffee.jpg").read_bytes()
IMAGES = ("imagerec-model", "imagerec-trainer", "imagerec-gateway", "imagerec-nginx", "imagerec-redis")
UNITS = {"b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 1e3, "mb": 1e6, "gb": 1e9}


def log(message: str) -> None:
    print(f"[bench containers {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _mib(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)\s*([A-Za-z]+)", text.strip()).groups()  # type: ignore[union-attr]
    return round(float(number) * UNITS[unit.lower()] / 2**20, 1)


def memory(fleet: project.ComposeFleet) -> dict[str, float]:
    """Resident memory per container (``docker stats``), MiB, by compose service and number."""
    stats = fleet.docker("stats", "--no-stream", "--format", "{{.Name}} {{.MemUsage}}").stdout
    found = {}
    for line in stats.splitlines():
        name, usage = line.split(" ", 1)
        if name.startswith(project.PROJECT + "_"):
            found[name[len(project.PROJECT) + 1 :]] = _mib(usage.split("/")[0])
    return found


def goodput(url: str, seconds: int) -> dict[str, Any]:
    result = load.run(
        f"{url}/v1/predict?model=resnet50", load.Payload.raw(PHOTO), connections=8, seconds=seconds
    )
    return {key: result[key] for key in ("img_per_s", "p50_ms", "p99_ms", "refused", "errors")}


def compose_part(seconds: int) -> dict[str, Any]:
    engine = docker_engine.Engine()
    engine.start()
    fleet = None
    try:
        fleet = project.ComposeFleet(engine, engine.base_image())
        fleet.compose("down", "-v", "--remove-orphans", "--timeout", "10")
        build_s = fleet.build()
        project.secrets()
        sizes = {
            image: round(int(fleet.docker("image", "inspect", "-f", "{{.Size}}", image).stdout) / 1e6)
            for image in IMAGES
        }
        log(f"images (MB): {sizes}; warm build {build_s:.1f} s")
        cold_up = fleet.up()
        log(f"up to green on fresh volumes: {cold_up:.1f} s")
        at_rest = memory(fleet)
        for model in MODELS:  # every path once, as the local bench warms
            load.run(
                f"{fleet.url}/v1/predict?model={model}", load.Payload.raw(PHOTO), connections=8, seconds=3
            )
        under: dict[str, float] = {}

        def sample() -> None:  # halfway through the load run
            time.sleep(seconds / 2)
            under.update(memory(fleet))

        sampler = threading.Thread(target=sample)
        sampler.start()
        through = goodput(fleet.url, seconds)
        sampler.join()
        log(f"compose: ResNet50 at 8 clients {through['img_per_s']} img/s, p50 {through['p50_ms']} ms")
        fleet.compose("down", "--timeout", "10")
        warm_up = fleet.up()
        log(f"up to green again after down (volumes kept): {warm_up:.1f} s")
        return {
            "image_mb": sizes,
            "warm_build_s": round(build_s, 1),
            "up_s": {"fresh_volumes": round(cold_up, 1), "volumes_kept": round(warm_up, 1)},
            "memory_mib": {"at_rest": at_rest, "under_load": under},
            "resnet50_8_clients": through,
        }
    finally:
        if fleet is not None:
            fleet.compose("down", "-v", "--remove-orphans", "--timeout", "10", check=False)
        engine.stop()


def local_part(seconds: int) -> dict[str, Any]:
    cache = Path(os.environ.get("MODEL_CACHE") or Path.home() / ".cache" / "imagerec" / "converted")
    with tempfile.TemporaryDirectory(prefix="imagerec-bench-") as folder:
        Path(folder).chmod(0o755)
        with running(Fleet(on_free_ports(Path(folder), models=MODELS)), base_env(cache)) as fleet:
            for model in MODELS:
                load.run(
                    f"{fleet.url}/v1/predict?model={model}", load.Payload.raw(PHOTO), connections=8, seconds=3
                )
            settle(fleet)
            through = goodput(fleet.url, seconds)
    log(f"make run: ResNet50 at 8 clients {through['img_per_s']} img/s, p50 {through['p50_ms']} ms")
    return {"resnet50_8_clients": through}


def measure(seconds: int) -> dict[str, Any]:
    results: dict[str, Any] = {
        "measured": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpu": platform.processor() or _cpu_name(),
        "cpus": os.cpu_count(),
        "seconds_per_run": seconds,
    }
    results["compose"] = compose_part(seconds)
    results["local"] = local_part(seconds)
    ours, theirs = results["compose"]["resnet50_8_clients"], results["local"]["resnet50_8_clients"]
    results["compose_vs_local"] = (
        round(ours["img_per_s"] / theirs["img_per_s"], 3) if theirs["img_per_s"] else None
    )
    return results


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def write(results: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "containers.json").write_text(json.dumps(results, indent=2))
    c, local = results["compose"], results["local"]["resnet50_8_clients"]
    lines = [
        "# Containers: the compose fleet measured (`python -m bench.containers`, part of `make bench`)",
        "",
        f"Measured {results['measured']} on {results['cpu']} ({results['cpus']} cores), WEIGHTS=random, "
        f"{results['seconds_per_run']} s per load run, wrk with new bytes every request.",
        "",
        "| image | MB |",
        "|---|---|",
        *(f"| `{image}` | {mb:,} |" for image, mb in c["image_mb"].items()),
        "",
        f"Warm `docker-compose build` of all nine services: {c['warm_build_s']} s.",
        f"`up` to every healthcheck green: {c['up_s']['fresh_volumes']} s on fresh volumes, "
        f"{c['up_s']['volumes_kept']} s after `down` with the volumes kept.",
        "",
        "| container | MiB at rest | MiB under ResNet50 load |",
        "|---|---|---|",
        *(
            f"| {name} | {mib} | {c['memory_mib']['under_load'].get(name, '-')} |"
            for name, mib in sorted(c["memory_mib"]["at_rest"].items())
        ),
        "",
        "| ResNet50, 8 clients | img/s | p50 ms | p99 ms | refused | errors |",
        "|---|---|---|---|---|---|",
        *(
            f"| {where} | {r['img_per_s']} | {r['p50_ms']} | {r['p99_ms']} | {r['refused']} | {r['errors']} |"
            for where, r in (("compose", c["resnet50_8_clients"]), ("make run", local))
        ),
        "",
        f"Compose delivers {results['compose_vs_local']}x the goodput of `make run` in the same run.",
        "",
    ]
    (RESULTS / "containers.md").write_text("\n".join(lines))


def main() -> None:
    reason = docker_engine.why_not()
    if reason:
        raise SystemExit(f"bench.containers: {reason}")
    seconds = int(os.environ.get("BENCH_SECONDS", "15"))
    results = measure(seconds)
    write(results)
    log(f"done: {RESULTS}/containers.md")


if __name__ == "__main__":
    main()
