"""Where the plumbing's time goes: CPU per answered request of each process, and the gateway's
functions by their share of its samples, under closed-loop load (``python -m bench.profile``).

The fleet as ``make run`` starts it (rate limit off: wrk's connections are one client), with stub
model services (``bench.stub_service``: the same HTTP surface, a canned answer), so what is measured
is Nginx and the gateway alone - what every answered image costs outside the model. Every request
carries new bytes, so the response cache never answers. While wrk runs, py-spy samples every
gateway worker (``--idle`` off: on-CPU time only) and each process's CPU seconds are read from
``/proc``. Writes ``bench/results/profile.json`` and ``profile.md``.

``--precision int8`` (or fp32) profiles the default fleet with ResNet50 itself instead of stubs:
the model service's worker is sampled too, after the gateway, into ``profile-int8.*``. (py-spy
sees Python threads only: OpenVINO's own inference threads are not in its samples.)
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench import load
from bench.fleets import NO_EDGE_LIMIT, base_env, cpu_seconds, processes
from deploy.local.fleet import ExtraService, Fleet
from deploy.local.running import free_port, on_free_ports, running

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PHOTO = (ROOT / "tests" / "fixtures" / "chelsea.jpg").read_bytes()
MODELS = ("vgg16", "resnet50", "inceptionv3")


def profile_gateway(pids: list[int], seconds: int, folder: Path) -> list[Path]:
    """py-spy ``raw`` (folded) stacks of each gateway worker for ``seconds``."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    outputs, procs = [], []
    for pid in pids:
        out = folder / f"gateway-{pid}.txt"
        outputs.append(out)
        procs.append(
            subprocess.Popen(
                [
                    spy,
                    "record",
                    "--pid",
                    str(pid),
                    "--duration",
                    str(seconds),
                    "--rate",
                    "250",
                    "--format",
                    "raw",
                    "--output",
                    str(out),
                    "--nonblocking",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    for proc in procs:
        proc.wait(seconds + 60)
    return [out for out in outputs if out.exists()]


def shares(stacks: list[Path], top: int = 25) -> dict[str, Any]:
    """Functions by share of the samples: ``self`` (the sample's innermost frame) and ``total``
    (anywhere on its stack), project functions and libraries alike."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for path in stacks:
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not count.isdigit():
                continue
            n = int(count)
            frames = [
                frame.split(" (")[0] + " " + frame.split(" (")[-1].split(":")[0].rsplit("/", 1)[-1]
                for frame in stack.split(";")
                if frame
            ]
            total += n
            if frames:
                own[frames[-1]] += n
            for frame in set(frames):
                inclusive[frame] += n

    def table(counter: collections.Counter[str]) -> list[tuple[str, float]]:
        return [(name, round(100 * n / total, 1)) for name, n in counter.most_common(top)] if total else []

    return {"samples": total, "self": table(own), "total": table(inclusive)}


def measure(
    fleet: Any, connections: int, seconds: int, folder: Path, sampled_roles: tuple[str, ...]
) -> dict[str, Any]:
    """One closed-loop run on ``fleet``: CPU per answered request of every process, and py-spy's
    profile of the workers of ``sampled_roles``."""
    url = f"{fleet.url}/v1/predict?model=resnet50"
    payload = load.Payload.raw(PHOTO)
    load.run(url, payload, connections=connections, seconds=3)  # warm the connections
    roles = processes(fleet, stubs="resnet50" not in sampled_roles)
    before = {role: sum(cpu_seconds(p) for p in pids) for role, pids in roles.items()}
    sampled: dict[str, list[Path]] = {}

    def sample() -> None:
        for role in sampled_roles:  # one at a time: py-spy itself costs CPU on 2 cores
            sampled[role] = profile_gateway(roles[role][1:], (seconds - 2) // len(sampled_roles), folder)

    spy = threading.Thread(target=sample)
    spy.start()
    result = load.run(url, payload, connections=connections, seconds=seconds)
    spy.join()
    after = {role: sum(cpu_seconds(p) for p in pids) for role, pids in roles.items()}
    answered = max(round(result["img_per_s"] * result["seconds"]), 1)
    cpu_ms = {role: round(1000 * (after[role] - before[role]) / answered, 2) for role in roles}
    return {
        "connections": connections,
        "seconds": seconds,
        "req_per_s": result["img_per_s"],
        "p50_ms": result["p50_ms"],
        "answered": answered,
        "cpu_ms_per_request": cpu_ms,
        "profiles": {role: shares(stacks) for role, stacks in sampled.items()},
    }


def run(clients: list[int], seconds: int, precision: str | None) -> list[dict[str, Any]]:
    """Every run on one fleet: stub services (``precision`` None) or ResNet50 itself at
    ``precision`` (the other models are not started: they would idle)."""
    with tempfile.TemporaryDirectory(prefix="imagerec-profile-") as folder:
        Path(folder).chmod(0o755)
        if precision is None:
            stubs = [ExtraService(name, free_port(), "bench.stub_service:create_app()") for name in MODELS]
            fleet = Fleet(on_free_ports(Path(folder), models=()), stubs, nginx=NO_EDGE_LIMIT)
            env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "FLEET_"))}
            roles: tuple[str, ...] = ("gateway",)
        else:
            cache = Path(os.environ.get("MODEL_CACHE") or Path.home() / ".cache" / "imagerec" / "converted")
            fleet = Fleet(on_free_ports(Path(folder), models=("resnet50",)), nginx=NO_EDGE_LIMIT)
            env = {**base_env(cache), "PRECISION": precision}
            roles = ("gateway", "resnet50")
        env["GATEWAY_RATE_LIMIT"] = ""
        with running(fleet, env, timeout_s=1200) as live:
            return [measure(live, c, seconds, Path(folder), roles) for c in clients]


def report(runs: list[dict[str, Any]], precision: str | None) -> str:
    what = (
        "stub models: Nginx and the gateway alone"
        if precision is None
        else f"ResNet50 {precision} on OpenVINO, the default fleet"
    )
    command = "python -m bench.profile" + (f" --precision {precision}" if precision else "")
    lines = [
        f"# Where the time goes ({what})",
        "",
        f"`{command}`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{os.cpu_count()} cores; wrk, new bytes every request, the response cache never answers.",
        "",
    ]
    roles = sorted({role for r in runs for role in r["cpu_ms_per_request"]})
    lines += [
        "| clients | req/s | p50 ms | " + " | ".join(f"CPU ms per request: {role}" for role in roles) + " |",
        "|---|---|---|" + "---|" * len(roles),
    ]
    for r in runs:
        cpu = r["cpu_ms_per_request"]
        lines.append(
            f"| {r['connections']} | {r['req_per_s']} | {r['p50_ms']} | "
            + " | ".join(str(cpu.get(role, "")) for role in roles)
            + " |"
        )
    for r in runs:
        for role, profile in r["profiles"].items():
            title = f"## {role} workers at {r['connections']} clients ({profile['samples']} samples)"
            lines += ["", title, ""]
            lines += ["| function (file) | share of samples, anywhere on the stack |", "|---|---|"]
            lines += [f"| `{name}` | {share} % |" for name, share in profile["total"]]
            lines += ["", "| function (file) | share of samples, innermost |", "|---|---|"]
            lines += [f"| `{name}` | {share} % |" for name, share in profile["self"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 32])
    parser.add_argument(
        "--precision",
        choices=["fp32", "int8"],
        help="profile ResNet50 itself at this precision (default: stubs)",
    )
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("bench.profile needs wrk: apt-get install wrk")
    runs = run(args.clients, args.seconds, args.precision)
    RESULTS.mkdir(exist_ok=True)
    name = f"profile-{args.precision}" if args.precision else "profile"
    (RESULTS / f"{name}.json").write_text(json.dumps(runs, indent=2))
    (RESULTS / f"{name}.md").write_text(report(runs, args.precision))
    print(report(runs, args.precision))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
