"""Closed-loop HTTP load with wrk (C, one thread): N connections, each sending the next request
as soon as the previous answer arrives. Reports img/s, p50/p95/p99 and errors as JSON."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

LUA = r"""
local f = assert(io.open(os.getenv("BENCH_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*all")
f:close()
wrk.headers["Content-Type"] = os.getenv("BENCH_CONTENT_TYPE")
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests": %d, "seconds": %.3f, "p50_ms": %.2f, "p95_ms": %.2f, "p99_ms": %.2f, ' ..
    '"errors": %d}\n', summary.requests, summary.duration / 1e6, latency:percentile(50) / 1e3,
    latency:percentile(95) / 1e3, latency:percentile(99) / 1e3,
    e.connect + e.read + e.write + e.status + e.timeout))
end
"""


@dataclass(frozen=True)
class Payload:
    body: bytes
    content_type: str

    @staticmethod
    def raw(image: bytes) -> Payload:
        return Payload(image, "image/jpeg")

    @staticmethod
    def multipart(image: bytes, field: str = "file", filename: str = "photo.jpg") -> Payload:
        boundary = uuid.uuid4().hex
        body = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
                "Content-Type: image/jpeg\r\n\r\n"
            ).encode()
            + image
            + f"\r\n--{boundary}--\r\n".encode()
        )
        return Payload(body, f"multipart/form-data; boundary={boundary}")


def run(url: str, payload: Payload, *, connections: int, seconds: int, images_per_request: int = 1) -> dict:
    """One wrk run; ``img_per_s`` counts answered requests (errors excluded) times images each."""
    wrk = shutil.which("wrk")
    if not wrk:
        raise RuntimeError("wrk is not installed (apt-get install wrk)")
    with tempfile.TemporaryDirectory() as folder:
        script, body = Path(folder) / "post.lua", Path(folder) / "body"
        script.write_text(LUA)
        body.write_bytes(payload.body)
        env = {"BENCH_BODY": str(body), "BENCH_CONTENT_TYPE": payload.content_type, "PATH": "/usr/bin:/bin"}
        done = subprocess.run(
            [wrk, "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "60s", "-s", str(script), url],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
    line = next(line for line in done.stdout.splitlines() if line.startswith("BENCH "))
    result = json.loads(line[len("BENCH ") :])
    ok = result["requests"] - result["errors"]
    result.update(connections=connections, img_per_s=round(ok * images_per_request / result["seconds"], 2))
    return result
