"""Overload: an open-loop client offering N x the fleet's capacity, on the default settings.

Open loop (requests leave on a fixed schedule, whatever the answers) is what overload is: a closed
loop slows down with the server and never offers more than it can take. Every request has new bytes
(the response cache never answers) and no client deadline (the default applies); the requests come
from 32 client addresses in turn, none of them over the default per-client rate limit. Reported: goodput
as a share of capacity, how fast refusals come back, connection errors and 502s (there should be
none), and admitted requests that missed their deadline (admission promised they would not).
``python -m bench.overload`` runs this part alone on a fresh fleet; ``make bench`` includes it.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import requests

from deploy.local.fleet import ROOT, Fleet
from deploy.local.running import on_free_ports, running
from gateway.settings import GatewaySettings

PHOTO = (ROOT / "tests" / "fixtures" / "coffee.jpg").read_bytes()
DEFAULT_DEADLINE_S = GatewaySettings().default_deadline_ms / 1000
_serial = itertools.count()
_nonce = uuid.uuid4().bytes  # new bytes in every run: no cached answer from an earlier one
CLIENTS = 32


class Connections:
    """A minimal HTTP/1.1 client on asyncio streams, keep-alive connections reused: an open-loop
    generator in one thread that costs a fraction of a millisecond per request, so it takes little
    of the two cores the fleet runs on (requests + a thread per request cost several times more)."""

    def __init__(self, url: str, clients: int = CLIENTS) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.target = f"{parts.path}?{parts.query}" if parts.query else parts.path
        # NOTE: many clients, as overload is in life: each from an address of its own (any
        # 127.x.y.z is this machine), so the per-client rate limit sees each at its share of the rate.
        self.sources = [f"127.0.1.{n}" for n in range(1, clients + 1)]
        self.idle: dict[str, list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]] = {
            source: [] for source in self.sources
        }

    async def post(self, body: bytes, client: int) -> tuple[int, str, str | None]:
        """(status, error code, Retry-After); status 0 when no HTTP answer came back."""
        source = self.sources[client % len(self.sources)]
        idle = self.idle[source]
        reader, writer = (
            idle.pop()
            if idle
            else await asyncio.open_connection(self.host, self.port, local_addr=(source, 0))
        )
        head = (
            f"POST {self.target} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: image/jpeg\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        try:
            writer.write(head.encode() + body)
            status_line = await reader.readuntil(b"\r\n")
            headers: dict[str, str] = {}
            while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            payload = await reader.readexactly(int(headers.get("content-length", "0")))
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            writer.close()
            return 0, type(exc).__name__, None
        if headers.get("connection", "").lower() == "close":
            writer.close()
        else:
            idle.append((reader, writer))
        status, code = int(status_line.split()[1]), ""
        if status != 200 and "json" in headers.get("content-type", ""):
            code = str(json.loads(payload).get("error", {}).get("code", ""))
        return status, code, headers.get("retry-after")


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0}
    p50, p99 = np.percentile(values, [50, 99])
    return {"p50_ms": round(float(p50), 1), "p99_ms": round(float(p99), 1), "max_ms": round(max(values), 1)}


def open_loop(url: str, rate: float, seconds: float) -> dict[str, Any]:
    """Send at ``rate`` per second for ``seconds``, on schedule, whatever the answers."""
    return asyncio.run(_open_loop(url, rate, seconds))


async def _open_loop(url: str, rate: float, seconds: float) -> dict[str, Any]:
    count = int(rate * seconds)
    connections = Connections(url)
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.2
    late: list[float] = []

    async def scheduled(i: int) -> tuple[int, float, str, str | None]:
        due = start + i / rate
        await asyncio.sleep(max(0.0, due - loop.time()))
        late.append((loop.time() - due) * 1000)
        sent = loop.time()
        status, code, retry_after = await connections.post(
            PHOTO + _nonce + next(_serial).to_bytes(8, "big"), i
        )
        return status, (loop.time() - sent) * 1000, code, retry_after

    results = await asyncio.gather(*(scheduled(i) for i in range(count)))
    elapsed = loop.time() - start
    for idle in connections.idle.values():
        for _, writer in idle:
            writer.close()
    accepted = [ms for status, ms, _, _ in results if status == 200]
    refused = [ms for status, ms, _, _ in results if status in (429, 503)]
    late_ms = DEFAULT_DEADLINE_S * 1000
    missed = [ms for status, ms, _, _ in results if status == 504 or (status == 200 and ms > late_ms)]
    return {
        "offered_req_per_s": round(rate, 2),
        "requests": count,
        "accepted": len(accepted),
        "refused": len(refused),
        "refused_with_retry_after": sum(1 for s, _, _, ra in results if s in (429, 503) and ra),
        "connection_errors": sum(1 for status, *_ in results if status == 0),
        "bad_gateway": sum(1 for status, *_ in results if status == 502),
        "missed_deadline": len(missed),
        "other": sorted({f"{s} {c}" for s, _, c, _ in results if s not in (0, 200, 429, 502, 503, 504)}),
        "goodput_req_per_s": round(len(accepted) / elapsed, 2),
        "accepted_latency": percentiles(accepted),
        "refusal_latency": percentiles(refused),
        "schedule_lag_p99_ms": round(float(np.percentile(late, 99)), 1) if late else 0.0,
    }


def measure_on(url: str, service_url: str, capacity: float, seconds: float, factor: float) -> dict[str, Any]:
    """The open loop at ``factor`` x ``capacity`` (req/s) against a running fleet's ``url``."""
    before = requests.get(f"{service_url}/v1/model", timeout=10).json()["batching"]
    result = open_loop(url, factor * capacity, seconds)
    after = requests.get(f"{service_url}/v1/model", timeout=10).json()["batching"]
    images, batches = after["images"] - before["images"], after["batches"] - before["batches"]
    return {
        "factor": factor,
        "capacity_req_per_s": capacity,
        "goodput_share": round(result["goodput_req_per_s"] / capacity, 3) if capacity else 0.0,
        "average_batch": round(images / batches, 2) if batches else 0.0,
        **result,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--factor", type=float, default=4.0)
    parser.add_argument("--capacity", type=float, default=0.0, help="req/s (0: measure with 8 clients)")
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "FLEET_"))}
    env.update(WEIGHTS="random", TF_CPP_MIN_LOG_LEVEL="2")
    with tempfile.TemporaryDirectory(prefix="imagerec-overload-") as folder:
        Path(folder).chmod(0o755)
        with running(Fleet(on_free_ports(Path(folder), models=("resnet50",))), env) as fleet:
            url = f"{fleet.url}/v1/predict?model=resnet50"
            open_loop(url, 5, 2)  # warm up
            capacity = args.capacity
            if not capacity:
                from bench import load

                capacity = load.run(url, load.Payload.raw(PHOTO), connections=8, seconds=args.seconds)[
                    "img_per_s"
                ]
            print(
                json.dumps(
                    measure_on(url, fleet.service_url("resnet50"), capacity, args.seconds, args.factor),
                    indent=2,
                )
            )


if __name__ == "__main__":
    main()
