"""Goodput of the three ways to send a photo, on one fleet in one run (``python -m bench.protocols``):
``POST /v1/predict`` with the JPEG as the body, ``POST /v2/models/resnet50/infer`` in the binary
tensor form, and gRPC ``ModelInfer`` (raw_input_contents), all through Nginx, 8 clients each.

The fleet is ``make run``'s defaults with ``PRECISION`` as asked (int8 by default: the issue's
target) and ResNet50 alone (the other services would idle; started, they only cost start-up
time), rate limit off (one load generator is one client). Every request carries new bytes. wrk
drives both HTTP forms; gRPC is driven by ``GrpcLoad`` (Python, one channel - one HTTP/2
connection - per client, like wrk's connections). The three run in interleaved rounds and each
one's median is reported. Writes ``bench/results/protocols.json`` and ``protocols.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import grpc

from bench import load
from bench.fleets import NO_EDGE_LIMIT, base_env, batching, cpu_name, cpu_seconds, processes, settle
from deploy.local.fleet import Fleet
from deploy.local.running import on_free_ports, running
from gateway import v2_proto as proto

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PHOTO = (ROOT / "tests" / "fixtures" / "coffee.jpg").read_bytes()  # 600x400, as make bench sends
CLIENTS = 8


class GrpcLoad:
    """Closed-loop ``ModelInfer`` calls: ``clients`` threads, each on its own channel, each sending
    the next call when the last one is answered; every image new bytes (after the JPEG's end)."""

    def __init__(self, address: str, clients: int) -> None:
        self.address, self.clients = address, clients
        request_class, response_class = proto.METHODS["ModelInfer"]
        self.request_class, self.response_class = request_class, response_class

    def run(self, seconds: float) -> dict[str, Any]:
        nonce = uuid.uuid4().hex.encode()
        stop = time.monotonic() + seconds
        latencies: list[float] = []
        failures: dict[str, int] = {}
        lock = threading.Lock()

        def client(k: int) -> None:
            channel = grpc.insecure_channel(self.address)
            call = channel.unary_unary(
                f"/{proto.SERVICE}/ModelInfer",
                request_serializer=self.request_class.SerializeToString,
                response_deserializer=self.response_class.FromString,
            )
            counter = 0
            while time.monotonic() < stop:
                counter += 1
                image = PHOTO + nonce + b"%04d%012d" % (k, counter)
                request = self.request_class(model_name="resnet50")
                request.inputs.add(name="image", datatype="BYTES", shape=[1])
                request.raw_input_contents.append(struct.pack("<I", len(image)) + image)
                request.parameters["top_k"].int64_param = 5
                started = time.perf_counter()
                try:
                    call(request, timeout=60)
                except grpc.RpcError as error:
                    with lock:
                        failures[error.code().name] = failures.get(error.code().name, 0) + 1
                    continue
                with lock:
                    latencies.append(time.perf_counter() - started)
            channel.close()

        began = time.monotonic()
        threads = [threading.Thread(target=client, args=(k,)) for k in range(self.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - began
        ordered = sorted(latencies)
        return {
            "connections": self.clients,
            "seconds": round(elapsed, 2),
            "requests": len(ordered) + sum(failures.values()),
            "img_per_s": round(len(ordered) / elapsed, 2),
            "p50_ms": round(ordered[len(ordered) // 2] * 1000, 2) if ordered else None,
            "p99_ms": round(ordered[int(len(ordered) * 0.99)] * 1000, 2) if ordered else None,
            "failures": failures,
        }


def measure(cache: Path, precision: str, seconds: int, rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="imagerec-bench-") as folder:
        Path(folder).chmod(0o755)
        env = {**base_env(cache), "PRECISION": precision, "GATEWAY_RATE_LIMIT": ""}
        fleet_settings = on_free_ports(Path(folder), models=("resnet50",))
        with running(Fleet(fleet_settings, nginx=NO_EDGE_LIMIT), env, timeout_s=1200) as fleet:
            paths = {
                "v1 JPEG body": lambda s: load.run(
                    f"{fleet.url}/v1/predict?model=resnet50",
                    load.Payload.raw(PHOTO),
                    connections=CLIENTS,
                    seconds=s,
                ),
                "v2 REST, binary": lambda s: load.run(
                    f"{fleet.url}/v2/models/resnet50/infer",
                    load.Payload.v2(PHOTO),
                    connections=CLIENTS,
                    seconds=s,
                ),
                "v2 gRPC": GrpcLoad(fleet.fleet.grpc_address, CLIENTS).run,
            }
            for measure_path in paths.values():  # warm every path (connections, caches) once
                measure_path(3)
                settle(fleet, ("resnet50",))
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in paths}
            roles = processes(fleet, stubs=False)
            for round_ in range(rounds):
                for name, measure_path in paths.items():
                    before = {role: sum(cpu_seconds(p) for p in pids) for role, pids in roles.items()}
                    client_before = time.process_time()
                    result = measure_path(seconds)
                    spent = {
                        role: sum(cpu_seconds(p) for p in pids) - before[role] for role, pids in roles.items()
                    }
                    if name == "v2 gRPC":  # the load generator is this process (wrk is its own)
                        spent["load generator"] = time.process_time() - client_before
                    answered = max(result["img_per_s"] * result["seconds"], 1)
                    result["cpu_ms_per_image"] = {
                        role: round(1000 * cpu / answered, 2) for role, cpu in spent.items()
                    }
                    settle(fleet, ("resnet50",))
                    runs[name].append(result)
                    print(
                        f"[protocols] round {round_ + 1} {name}: {result['img_per_s']} img/s "
                        f"p50 {result['p50_ms']} ms",
                        flush=True,
                    )
            # ms per model call by batch size as the service measured them under this load (EWMA)
            under_load = batching(fleet, "resnet50")
    summary = {
        name: {
            "median_img_per_s": statistics.median(r["img_per_s"] for r in results),
            "median_p50_ms": statistics.median(r["p50_ms"] for r in results if r["p50_ms"] is not None),
            "median_cpu_ms_per_image": {
                role: statistics.median(r["cpu_ms_per_image"][role] for r in results)
                for role in results[0]["cpu_ms_per_image"]
            },
        }
        for name, results in runs.items()
    }
    jpeg = summary["v1 JPEG body"]["median_img_per_s"]
    for entry in summary.values():
        entry["vs_jpeg"] = round(entry["median_img_per_s"] / jpeg, 3) if jpeg else None
    return {
        "precision": precision,
        "clients": CLIENTS,
        "seconds": seconds,
        "runs": runs,
        "summary": summary,
        "batch_ms_under_load": under_load["batch_ms"],
        "average_batch": under_load.get("average_batch"),
    }


def write(results: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "protocols.json").write_text(json.dumps(results, indent=2))
    rounds = len(next(iter(results["runs"].values())))
    lines = [
        "# Goodput by protocol (ResNet50, one fleet, one run)",
        "",
        f"Measured {results['measured']} on {results.get('cpu', 'a CPU not recorded')} ({results['cpus']} "
        f"cores); precision {results['precision']}, "
        f"{results['clients']} closed-loop clients, new bytes every request, {rounds} "
        f"interleaved rounds of {results['seconds']} s; medians.",
        "",
        "| path | img/s | p50 ms | vs the JPEG body |",
        "|---|---|---|---|",
    ]
    for name, entry in results["summary"].items():
        lines.append(
            f"| {name} | {entry['median_img_per_s']} | {entry['median_p50_ms']} | {entry['vs_jpeg']} |"
        )
    roles = sorted(
        {role for entry in results["summary"].values() for role in entry["median_cpu_ms_per_image"]}
    )
    lines += [
        "",
        "CPU ms per answered image, by process (medians; the gRPC load generator is Python, in the",
        "bench's own process, on the same 2 cores; wrk's CPU is not counted):",
        "",
        "| path | " + " | ".join(roles) + " |",
        "|---|" + "---|" * len(roles),
    ]
    for name, entry in results["summary"].items():
        cpu = entry["median_cpu_ms_per_image"]
        lines.append(f"| {name} | " + " | ".join(str(cpu.get(role, "")) for role in roles) + " |")
    per_call = results.get("batch_ms_under_load") or {}
    if per_call:
        lines += [
            "",
            "The service's ms per model call by batch size after these runs (its moving averages, what",
            "admission estimates with), and per image:",
            "",
            "| batch size | " + " | ".join(per_call) + " |",
            "|---|" + "---|" * len(per_call),
            "| ms per call | " + " | ".join(str(ms) for ms in per_call.values()) + " |",
            "| ms per image | " + " | ".join(str(round(ms / int(n), 2)) for n, ms in per_call.items()) + " |",
        ]
    (RESULTS / "protocols.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--precision", default="int8", choices=["fp32", "int8"])
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    cache = Path(os.environ.get("MODEL_CACHE") or Path.home() / ".cache" / "imagerec" / "converted")
    results = measure(cache, args.precision, args.seconds, args.rounds)
    results.update(measured=time.strftime("%Y-%m-%d %H:%M:%S %Z"), cpu=cpu_name(), cpus=os.cpu_count())
    write(results)
    print(f"[protocols] wrote {RESULTS}/protocols.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
