"""Part 3 of ``make bench``: other servers under the fleet's load - the seed-style server, and the
peers (BentoML, LitServe, MLServer) serving the fleet's own ResNet50 IR, fp32 and int8 (the IR
that the fleet's PRECISION=int8 serves), each in its own virtualenv (bench/peer_model.py).

A peer whose virtualenv is missing (``make bench`` installs them; an install that failed leaves
none) is skipped, and the log says so; so is its int8 sweep when no int8 IR is cached.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

from bench import load
from deploy.local.fleet import ROOT
from deploy.local.running import free_port, rss_mb, wait_until
from services import resnet50
from serving import bf16
from serving.backends import OpenVINORuntime
from serving.quantize import Gate, choose
from serving.weights import WeightsPlan

VENVS = {name: ROOT / "bench" / f".venv-{name}" for name in ("bento", "litserve", "mlserver")}
Start = Callable[[int, Path], tuple[list[str], str, dict[str, str]]]
"""A peer's start on a port with an IR: its command, its URL, and its environment beyond PEER_IR."""


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def baseline(
    target: str,
    path: str,
    command: list[str],
    url: str,
    payload: load.Payload,
    seconds: int,
    concurrencies: tuple[int, ...],
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Start another server (``env`` added to ours), warm it, load it like the fleet, stop it."""
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    body, headers = payload.whole(), {"Content-Type": payload.content_type}

    def post(timeout: float) -> requests.Response:
        return requests.post(url, data=body, headers=headers, timeout=timeout)

    try:
        wait_until(lambda: post(60).ok, 300, target)
        for _ in range(8):  # several workers each load their model on their first requests
            post(120)
        idle = rss_mb(process.pid)
        runs = []
        for connections in concurrencies:
            result = load.run(url, payload, connections=connections, seconds=seconds)
            runs.append({"target": target, "path": path, **result})
            post(300)  # settle the backlog
            log(f"{target} c={connections}: {result['img_per_s']} img/s, p50 {result['p50_ms']} ms")
        return {"runs": runs, "memory_idle_mb": idle, "memory_after_mb": rss_mb(process.pid)}
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(60)


def seed_baseline(photo: bytes, seconds: int, concurrencies: tuple[int, ...]) -> dict[str, Any]:
    """The article's approach (bench/seed_server.py) under gunicorn -w 4."""
    port = free_port()
    command = [sys.executable, "-m", "gunicorn", "-w", "4", "--timeout", "300"]
    command += ["--bind", f"127.0.0.1:{port}", "bench.seed_server:app"]
    return baseline(
        "seed-style resnet50",
        "gunicorn -w 4, model.predict",
        command,
        f"http://127.0.0.1:{port}/predict",
        load.Payload.multipart(photo, field="file"),
        seconds,
        concurrencies,
    )


def peer_irs(cache: Path) -> dict[str, Path]:
    """The IRs the fleet serves ResNet50 from (random weights, seed 0), found as its runtime finds
    them: fp32; bf16 (the fp32 IR computed in bf16) where this CPU computes bf16 natively, as the
    fleet's default PRECISION=auto may; and the int8 form its quality gate admits (none when
    quantization never ran)."""
    import openvino as ov

    runtime = OpenVINORuntime(resnet50.SPEC, WeightsPlan("random", seed=0), cache_dir=cache)
    irs = {"fp32": runtime.cache_path() / "model.xml"}
    if bf16.native(ov.Core()):
        irs["bf16"] = irs["fp32"]
    record = runtime.int8_path() / "record.json"
    if record.is_file():
        served, _ = choose(json.loads(record.read_text()), Gate())
        if served != "fp32":
            irs["int8"] = runtime.int8_path() / served / "model.xml"
    return {precision: ir for precision, ir in irs.items() if ir.is_file()}


def _peer(
    name: str,
    venv: str,
    path: str,
    start: Start,
    payload: load.Payload,
    irs: dict[str, Path],
    seconds: int,
    concurrencies: tuple[int, ...],
) -> dict[str, Any] | None:
    """A peer's sweep per precision, and its version."""
    if not (VENVS[venv] / ".installed").is_file():
        log(f"{name} is not installed (bench/.venv-{venv}): skipped")
        return None
    results: dict[str, Any] = {"version": _version(venv, name.lower())}
    for precision, ir in irs.items():
        command, url, env = start(free_port(), ir)
        target = f"{name.lower()} resnet50 {precision}"
        run = baseline(
            target,
            path,
            command,
            url,
            payload,
            seconds,
            concurrencies,
            {"PEER_IR": str(ir), "PEER_PRECISION": bf16.precision_hint(precision), **env},
        )
        results[precision] = {**run, "ir": str(ir)}
    return results


def _version(venv: str, package: str) -> str:
    python = VENVS[venv] / "bin" / "python"
    program = f"import importlib.metadata as m; print(m.version({package!r}))"
    return subprocess.run([str(python), "-c", program], capture_output=True, text=True).stdout.strip()


def bentoml_baseline(
    photo: bytes, irs: dict[str, Path], seconds: int, concurrencies: tuple[int, ...]
) -> dict[str, Any] | None:
    """BentoML (bench/bento_service.py): adaptive batching up to 8, multipart ``images``."""

    def start(port: int, ir: Path) -> tuple[list[str], str, dict[str, str]]:
        command = [str(VENVS["bento"] / "bin" / "bentoml"), "serve", "bench.bento_service:ResNet50"]
        command += ["--port", str(port), "--host", "127.0.0.1"]
        return command, f"http://127.0.0.1:{port}/predict", {}

    payload = load.Payload.multipart(photo, field="images")
    path = "bentoml serve, adaptive batching (8), multipart"
    return _peer("BentoML", "bento", path, start, payload, irs, seconds, concurrencies)


def litserve_baseline(
    photo: bytes, irs: dict[str, Path], seconds: int, concurrencies: tuple[int, ...]
) -> dict[str, Any] | None:
    """LitServe (bench/litserve_service.py): batches up to 8 within 5 ms, multipart ``image``."""

    def start(port: int, ir: Path) -> tuple[list[str], str, dict[str, str]]:
        python = str(VENVS["litserve"] / "bin" / "python")
        command = [python, "-m", "bench.litserve_service", "--port", str(port)]
        return command, f"http://127.0.0.1:{port}/predict", {}

    payload = load.Payload.multipart(photo, field="image")
    path = "LitServer, batching (8, 5 ms), multipart"
    return _peer("LitServe", "litserve", path, start, payload, irs, seconds, concurrencies)


def mlserver_baseline(
    photo: bytes, irs: dict[str, Path], seconds: int, concurrencies: tuple[int, ...]
) -> dict[str, Any] | None:
    """MLServer (bench/mlserver_peer/): adaptive batching up to 8 within 5 ms, v2 JSON with the
    JPEG as base64 BYTES. Its gRPC and metrics servers get free ports too, and its metrics folder
    (made in the working directory otherwise) a temporary one."""
    payload = load.Payload.v2_json(photo)
    path = "mlserver start, adaptive batching (8, 5 ms), v2 JSON base64"
    with tempfile.TemporaryDirectory(prefix="imagerec-mlserver-") as metrics:

        def start(port: int, ir: Path) -> tuple[list[str], str, dict[str, str]]:
            command = [str(VENVS["mlserver"] / "bin" / "mlserver"), "start", "bench/mlserver_peer"]
            env = {
                "MLSERVER_HTTP_PORT": str(port),
                "MLSERVER_GRPC_PORT": str(free_port()),
                "MLSERVER_METRICS_PORT": str(free_port()),
                "MLSERVER_METRICS_DIR": metrics,
            }
            return command, f"http://127.0.0.1:{port}/v2/models/resnet50/infer", env

        return _peer("MLServer", "mlserver", path, start, payload, irs, seconds, concurrencies)
