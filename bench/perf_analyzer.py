"""NVIDIA's perf_analyzer, the load generator Triton's users already have, against the fleet: v2
over HTTP and over gRPC, a concurrency sweep, each request one JPEG as a BYTES element.

perf_analyzer ships in the ``tritonclient`` wheel the project installs; it starts once Debian's
``libb64-0d`` and the ``nvidia-cuda-runtime-cu12`` wheel's ``libcudart.so.12`` are present (it links
both even when it talks to a CPU server), which ``make bench`` installs (the latter into
``bench/.perf-analyzer``, handed to it on ``LD_LIBRARY_PATH``). It first reads the model's
configuration (Triton's model configuration extension, ``GET /v2/models/<name>/config``), then
sends ``--input-data``: the photo base64-encoded as the BYTES tensor's serialized form (its 4-byte
length, then the bytes). The v2 routes have no response cache, so the same photo every request
is computed every time (the run checks the gateway's cache counters did not move).

Run by ``bench.run``; alone: ``python -m bench.perf_analyzer HOST:PORT HOST:GRPC_PORT``.
"""

from __future__ import annotations

import base64
import csv
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TOOL = Path(sys.executable).parent / "perf_analyzer"
LIBRARIES = ROOT / "bench" / ".perf-analyzer" / "nvidia" / "cuda_runtime" / "lib"
PHOTO = ROOT / "tests" / "fixtures" / "coffee.jpg"


def environment() -> dict[str, str]:
    return {**os.environ, "LD_LIBRARY_PATH": f"{LIBRARIES}:{os.environ.get('LD_LIBRARY_PATH', '')}"}


def unavailable() -> str:
    """Why perf_analyzer cannot run here ('' when it can): what ldd finds missing."""
    if not TOOL.exists():
        return f"{TOOL} is missing (the tritonclient wheel's perf_analyzer)"
    linked = subprocess.run(["ldd", str(TOOL)], capture_output=True, text=True, env=environment())
    missing = [line.split()[0] for line in linked.stdout.splitlines() if "not found" in line]
    return f"perf_analyzer lacks {', '.join(missing)} (make bench installs them)" if missing else ""


def input_data(folder: Path, photo: bytes) -> Path:
    """perf_analyzer's --input-data file: one request, the photo as a one-element BYTES tensor."""
    serialized = struct.pack("<I", len(photo)) + photo
    path = folder / "input.json"
    content = {"content": {"b64": base64.b64encode(serialized).decode()}, "shape": [1]}
    path.write_text(json.dumps({"data": [{"image": content}]}))
    return path


def sweep(
    protocol: str, address: str, model: str, concurrency: str = "1:8", window_ms: int = 4000
) -> dict[str, Any]:
    """One perf_analyzer run: every concurrency level of ``concurrency`` (``start:end``), each
    measured until three windows agree (its default stabilisation). Returns its rows (img/s, p50
    and p99 ms per level), its exit status and the tail of its output."""
    with tempfile.TemporaryDirectory(prefix="perf-analyzer-") as folder:
        data = input_data(Path(folder), PHOTO.read_bytes())
        report = Path(folder) / "report.csv"
        command = [
            str(TOOL),
            "-m",
            model,
            "-u",
            address,
            "-i",
            protocol,
            "--input-data",
            str(data),
            "--concurrency-range",
            concurrency,
            "--measurement-interval",
            str(window_ms),
            "-f",
            str(report),
        ]
        done = subprocess.run(command, capture_output=True, text=True, env=environment(), timeout=1800)
        rows = []
        if report.exists():
            with report.open() as handle:
                for row in csv.DictReader(handle):
                    rows.append(
                        {
                            "concurrency": int(row["Concurrency"]),
                            "img_per_s": round(float(row["Inferences/Second"]), 1),
                            "p50_ms": round(int(row["p50 latency"]) / 1000, 1),
                            "p99_ms": round(int(row["p99 latency"]) / 1000, 1),
                        }
                    )
        return {
            "protocol": protocol,
            "model": model,
            "exit": done.returncode,
            "rows": sorted(rows, key=lambda r: r["concurrency"]),
            "output_tail": (done.stdout + done.stderr)[-1500:],
        }


def main() -> int:
    reason = unavailable()
    if reason:
        print(reason)
        return 1
    http, grpc = sys.argv[1:3]
    for protocol, address in (("http", http), ("grpc", grpc)):
        print(json.dumps(sweep(protocol, address, "resnet50"), indent=1))
    return 0


if __name__ == "__main__":
    assert shutil.which("ldd"), "ldd is needed to check perf_analyzer's libraries"
    sys.exit(main())
