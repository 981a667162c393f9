"""Closed-loop HTTP load with wrk (C, one thread): N connections, each sending the next request as
soon as the previous answer arrives - refused or not, wrk never honours Retry-After.

Every request carries different bytes unless ``same_bytes`` is set: a per-run nonce and a counter are
appended after the body (after a JPEG's end marker, which decoders ignore), so a response cache
cannot answer it, in this run or from an earlier one.
Reports answered img/s (200s only), p50/p95/p99 of every answer, and the answers by status.
"""

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
local body = f:read("*all")
f:close()
local unique = os.getenv("BENCH_UNIQUE") == "1"
-- new for every run: the cache must not answer a run with what an earlier run computed
local nonce = os.getenv("BENCH_NONCE")
wrk.method = "POST"
wrk.body = body
wrk.headers["Content-Type"] = os.getenv("BENCH_CONTENT_TYPE")
if os.getenv("BENCH_AUTHORIZATION") ~= "" then
  wrk.headers["Authorization"] = os.getenv("BENCH_AUTHORIZATION")
end
local counter = 0
-- The Open Inference Protocol's binary form (BENCH_V2=1): a JSON header, then the image as one
-- length-prefixed BYTES element. Every image has the same length (nonce and counter are fixed
-- width), so the header - and Inference-Header-Content-Length - is the same for every request.
local v2 = os.getenv("BENCH_V2") == "1"
local v2_header = ""
local function le32(n)
  local b = math.floor
  return string.char(n % 256, b(n / 256) % 256, b(n / 65536) % 256, b(n / 16777216) % 256)
end
if v2 then
  local size = #body + (unique and (#nonce + 16) or 0)
  v2_header = '{"inputs":[{"name":"image","datatype":"BYTES","shape":[1],"parameters":' ..
    '{"binary_data_size":' .. (size + 4) .. '}}],"parameters":{"top_k":5,"binary_data_output":true}}'
  wrk.headers["Inference-Header-Content-Length"] = tostring(#v2_header)
  wrk.body = v2_header .. le32(size) .. body
end
-- NOTE: request() and response() run in each thread's Lua state, done() in the main one: the
-- counts are globals of the thread states, collected through setup()'s thread handles.
statuses = {}
local threads = {}

function setup(thread)
  threads[#threads + 1] = thread
end

function request()
  if not unique then
    return wrk.format()
  end
  counter = counter + 1
  local image = body .. nonce .. string.format("%016d", counter)
  if v2 then
    return wrk.format(nil, nil, nil, v2_header .. le32(#image) .. image)
  end
  return wrk.format(nil, nil, nil, image)
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local e = summary.errors
  local totals = {}
  for _, thread in ipairs(threads) do
    for status, count in pairs(thread:get("statuses")) do
      totals[status] = (totals[status] or 0) + count
    end
  end
  local parts = {}
  for status, count in pairs(totals) do
    parts[#parts + 1] = string.format('"%d": %d', status, count)
  end
  io.write(string.format(
    'BENCH {"requests": %d, "seconds": %.3f, "p50_ms": %.2f, "p95_ms": %.2f, "p99_ms": %.2f, ' ..
    '"socket_errors": %d, "statuses": {%s}}\n', summary.requests, summary.duration / 1e6,
    latency:percentile(50) / 1e3, latency:percentile(95) / 1e3, latency:percentile(99) / 1e3,
    e.connect + e.read + e.write + e.timeout, table.concat(parts, ", ")))
end
"""


@dataclass(frozen=True)
class Payload:
    body: bytes
    content_type: str
    v2_binary: bool = False  # the image as the v2 binary tensor extension carries it

    @staticmethod
    def raw(image: bytes) -> Payload:
        return Payload(image, "image/jpeg")

    @staticmethod
    def v2(image: bytes) -> Payload:
        """A v2 infer request in the binary form: a JSON header, then the image file as it is."""
        return Payload(image, "application/octet-stream", v2_binary=True)

    @staticmethod
    def multipart(image: bytes, field: str = "file", filename: str = "photo.jpg") -> Payload:
        """A multipart body. Its per-request counter lands after the closing boundary, where parsers
        ignore it: the image bytes stay the same, which is fine for servers without a cache."""
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


def run(
    url: str,
    payload: Payload,
    *,
    connections: int,
    seconds: int,
    images_per_request: int = 1,
    same_bytes: bool = False,
    api_key: str = "",
) -> dict:
    """One wrk run. ``img_per_s`` counts 200 answers times images each (refusals are not goodput);
    ``api_key``: sent as ``Authorization: Bearer`` with every request."""
    wrk = shutil.which("wrk")
    if not wrk:
        raise RuntimeError("wrk is not installed (apt-get install wrk)")
    with tempfile.TemporaryDirectory() as folder:
        script, body = Path(folder) / "post.lua", Path(folder) / "body"
        script.write_text(LUA)
        body.write_bytes(payload.body)
        env = {
            "BENCH_BODY": str(body),
            "BENCH_CONTENT_TYPE": payload.content_type,
            "BENCH_UNIQUE": "0" if same_bytes else "1",
            "BENCH_NONCE": uuid.uuid4().hex,
            "BENCH_AUTHORIZATION": f"Bearer {api_key}" if api_key else "",
            "BENCH_V2": "1" if payload.v2_binary else "0",
            "PATH": "/usr/bin:/bin",
        }
        done = subprocess.run(
            [wrk, "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "60s", "-s", str(script), url],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
    line = next(line for line in done.stdout.splitlines() if line.startswith("BENCH "))
    result = json.loads(line[len("BENCH ") :])
    statuses = {int(status): count for status, count in result.pop("statuses").items()}
    ok = statuses.get(200, 0)
    result.update(
        connections=connections,
        statuses=statuses,
        refused=statuses.get(503, 0) + statuses.get(429, 0),
        bad_gateway=statuses.get(502, 0),
        errors=sum(count for status, count in statuses.items() if status != 200) + result["socket_errors"],
        img_per_s=round(ok * images_per_request / result["seconds"], 2),
    )
    return result
