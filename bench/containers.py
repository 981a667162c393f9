"""``python -m bench.containers`` (and a part of ``make bench``): what a user of containers asks for.

Each image's size; the time from ``docker-compose up`` to every healthcheck green on fresh volumes
and again after ``down`` (volumes kept: converted models cached); each container's resident memory
at rest and under load; and ResNet50 goodput at 8 clients (wrk, new bytes every request) through the
compose fleet next to the same figure through ``make run``'s fleet: both up at once, in alternating
rounds (``BENCH_ROUNDS``, 3, of ``BENCH_SECONDS``, 15), medians reported. Both on their defaults
with WEIGHTS=random. Results in bench/results/containers.{json,md}.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench import load
from bench.fleets import MODELS, base_env, cpu_name, settle
from deploy.docker import engine as docker_engine
from deploy.docker import project
from deploy.local.fleet import ROOT, Fleet
from deploy.local.running import on_free_ports, running

RESULTS = ROOT / "bench" / "results"
PHOTO = (ROOT / "tests" / "fixtures" / "coffee.jpg").read_bytes()
WHERE = {
    "compose": "compose, published port (127.0.0.1)",
    "compose_nginx_address": "compose, Nginx's address on the project network",
    "make_run": "make run",
}
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


def warm(url: str) -> None:
    """Every model's path once, as the local bench warms."""
    for model in MODELS:
        load.run(f"{url}/v1/predict?model={model}", load.Payload.raw(PHOTO), connections=8, seconds=3)


class Containers:
    """The model containers' own ports, reached on the project's bridge network from the host (for
    ``bench.fleets.settle``, which asks each model service about its queue)."""

    def __init__(self, fleet: project.ComposeFleet) -> None:
        self.urls = {}
        for model in MODELS:
            [container] = fleet.containers(model)
            [network] = fleet.inspect(container)["NetworkSettings"]["Networks"].values()
            self.urls[model] = f"http://{network['IPAddress']}:{project.MODEL_PORTS[model]}"

    def service_url(self, model: str) -> str:
        return self.urls[model]


@contextmanager
def compose_fleet() -> Iterator[tuple[project.ComposeFleet, dict[str, Any]]]:
    """The compose project built and up (the engine stopped and the project removed after); with
    its image sizes, build time and times from ``up`` to green, fresh and with the volumes kept."""
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
        fleet.compose("down", "--timeout", "10")
        warm_up = fleet.up()
        log(f"up to green again after down (volumes kept): {warm_up:.1f} s")
        yield (
            fleet,
            {
                "image_mb": sizes,
                "warm_build_s": round(build_s, 1),
                "up_s": {"fresh_volumes": round(cold_up, 1), "volumes_kept": round(warm_up, 1)},
            },
        )
    finally:
        if fleet is not None:
            fleet.compose("down", "-v", "--remove-orphans", "--timeout", "10", check=False)
        engine.stop()


def under_load(fleet: project.ComposeFleet, seconds: int) -> dict[str, float]:
    """Each container's memory halfway through a ResNet50 load run (not a measured one: ``docker
    stats`` takes CPU of its own)."""
    sampled: dict[str, float] = {}

    def sample() -> None:
        time.sleep(seconds / 2)
        sampled.update(memory(fleet))

    sampler = threading.Thread(target=sample)
    sampler.start()
    goodput(fleet.url, seconds)
    sampler.join()
    return sampled


def measure(seconds: int, rounds: int) -> dict[str, Any]:
    """Both fleets up at once, on their defaults; ResNet50 at 8 clients through each in turn, the
    order alternating round by round; medians of ``rounds`` runs each."""
    results: dict[str, Any] = {
        "measured": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpu": cpu_name(),
        "cpus": os.cpu_count(),
        "seconds_per_run": seconds,
        "rounds": rounds,
    }
    cache = Path(os.environ.get("MODEL_CACHE") or Path.home() / ".cache" / "imagerec" / "converted")
    with compose_fleet() as (fleet, found), tempfile.TemporaryDirectory(prefix="imagerec-bench-") as folder:
        Path(folder).chmod(0o755)
        with running(Fleet(on_free_ports(Path(folder), models=MODELS)), base_env(cache)) as local:
            results["compose"] = found
            results["compose"]["memory_mib"] = {"at_rest": memory(fleet)}
            warm(fleet.url)
            warm(local.url)
            results["compose"]["memory_mib"]["under_load"] = under_load(fleet, seconds)
            # Through the published port (loopback: Docker's proxy), and through Nginx's address on
            # the project's network (what a client on another host gets, by Docker's NAT).
            targets = {
                "compose": (fleet.url, Containers(fleet)),
                "compose_nginx_address": (
                    f"http://{project.NGINX_ADDRESS}:{project.NGINX_PORT}",
                    Containers(fleet),
                ),
                "make_run": (local.url, local),
            }
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
            for turn in range(rounds):
                for name in list(targets)[:: 1 if turn % 2 == 0 else -1]:
                    url, services = targets[name]
                    settle(services)
                    runs[name].append(goodput(url, seconds))
                    log(f"round {turn + 1}: {name} {runs[name][-1]}")
    results["resnet50_8_clients"] = {
        name: {
            "runs": found_runs,
            **{
                key: statistics.median(run[key] for run in found_runs)
                for key in ("img_per_s", "p50_ms", "p99_ms")
            },
            **{key: sum(run[key] for run in found_runs) for key in ("refused", "errors")},
        }
        for name, found_runs in runs.items()
    }
    figures = results["resnet50_8_clients"]
    results["compose_vs_local"] = round(figures["compose"]["img_per_s"] / figures["make_run"]["img_per_s"], 3)
    return results


def write(results: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "containers.json").write_text(json.dumps(results, indent=2))
    c = results["compose"]
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
        f"ResNet50 at 8 clients, both fleets up at once, {results['rounds']} rounds of "
        f"{results['seconds_per_run']} s each, the order alternating; medians (each run's img/s in "
        "brackets):",
        "",
        "| ResNet50, 8 clients | img/s | p50 ms | p99 ms | refused | errors |",
        "|---|---|---|---|---|---|",
        *(
            f"| {WHERE[name]} | {r['img_per_s']} ({', '.join(str(run['img_per_s']) for run in r['runs'])}) "
            f"| {r['p50_ms']} | {r['p99_ms']} | {r['refused']} | {r['errors']} |"
            for name, r in results["resnet50_8_clients"].items()
        ),
        "",
        f"Compose through its published port delivers {results['compose_vs_local']}x the goodput of "
        "`make run`.",
        "",
    ]
    (RESULTS / "containers.md").write_text("\n".join(lines))


def main() -> None:
    reason = docker_engine.why_not()
    if reason:
        raise SystemExit(f"bench.containers: {reason}")
    seconds = int(os.environ.get("BENCH_SECONDS", "15"))
    results = measure(seconds, int(os.environ.get("BENCH_ROUNDS", "3")))
    write(results)
    log(f"done: {RESULTS}/containers.md")


if __name__ == "__main__":
    main()
