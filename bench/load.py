"""Closed-loop HTTP load with wrk (C, one thread): N connections, each sending the next request as
soon as the previous answer arrives - refused or not, wrk never honours Retry-After.

Every request carries different bytes unless ``same_bytes`` is set: a per-run nonce and a counter are
appended after the body (after a JPEG's end marker, which decoders ignore), so a response cache
cannot answer it, in this run or from an earlier one. In the JSON form the image is base64 text, and
so is what is appended to it.
Reports answered img/s (200s only), p50/p95/p99 of every answer, and the answers by status.
"""

from __future__ import annotations

import base64
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
-- The JSON form (BENCH_JSON=1): the body file is the image's base64 text, sent between
-- BENCH_JSON_BEFORE and BENCH_JSON_AFTER. The image is padded to whole 3-byte groups and nonce and
-- counter are 48 bytes, so their base64 joins the image's as the base64 of the two together.
local json = os.getenv("BENCH_JSON") == "1"
local before, after = os.getenv("BENCH_JSON_BEFORE"), os.getenv("BENCH_JSON_AFTER")
local B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
local function base64(s)
  local out = {}
  for i = 1, #s, 3 do
    local a, b, c = s:byte(i, i + 2)
    local n = a * 65536 + b * 256 + c
    for shift = 18, 0, -6 do
      local k = math.floor(n / 2 ^ shift) % 64 + 1
      out[#out + 1] = B64:sub(k, k)
    end
  end
  return table.concat(out)
end
if json then
  assert(#nonce + 16 == 48, "the nonce and counter must be whole 3-byte groups")
  wrk.body = before .. body .. after
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
  local suffix = nonce .. string.format("%016d", counter)
  if json then
    return wrk.format(nil, nil, nil, before .. body .. base64(suffix) .. after)
  end
  local image = body .. suffix
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
    around: tuple[str, str] | None = None  # JSON: ``body`` is base64 text, sent between these

    @staticmethod
    def raw(image: bytes) -> Payload:
        return Payload(image, "image/jpeg")

    @staticmethod
    def v2(image: bytes) -> Payload:
        """A v2 infer request in the binary form: a JSON header, then the image file as it is."""
        return Payload(image, "application/octet-stream", v2_binary=True)

    @staticmethod
    def v2_json(image: bytes, name: str = "image") -> Payload:
        """A v2 infer request in JSON, the image one BYTES element in base64 (MLServer's
        ``content_type: base64``). The image is padded with zeros after its end marker to whole
        3-byte groups, so that the base64 of each request's suffix joins its own."""
        padded = image + b"\0" * (-len(image) % 3)
        head, tail = json.dumps(
            {
                "inputs": [
                    {
                        "name": name,
                        "datatype": "BYTES",
                        "shape": [1],
                        "parameters": {"content_type": "base64"},
                        "data": ["IMAGE"],
                    }
                ]
            }
        ).split("IMAGE")
        return Payload(base64.b64encode(padded), "application/json", around=(head, tail))

    def whole(self) -> bytes:
        """One request's body as wrk sends it with ``same_bytes`` (not the binary v2 form, whose
        header wrk's script writes)."""
        if self.v2_binary:
            raise ValueError("the binary v2 body is made by wrk's script")
        if self.around:
            return self.around[0].encode() + self.body + self.around[1].encode()
        return self.body

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
            "BENCH_JSON": "1" if payload.around else "0",
            "BENCH_JSON_BEFORE": payload.around[0] if payload.around else "",
            "BENCH_JSON_AFTER": payload.around[1] if payload.around else "",
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
