"""Issue 30's explanation target, measured (part 16 of ``make bench``; alone: ``python -m
bench.explain``; results in ``bench/results/explain.md`` and ``explain.json``).

ResNet50 alone, ``make run``'s defaults otherwise (WEIGHTS=random, PRECISION=auto), rate limits
off (wrk's connection and the explaining client come from one address):

1. one interactive client (wrk, one connection, new bytes every request) alone: its p50 and p99;
2. the same client while a second one asks ``POST /v1/explain`` (grid 7: 50 forward passes) back
   to back: its p50 and p99 again, the explanations' own latency, and the forward passes the
   service computed per explanation (its ``imagerec_inference_images_total``, less the interactive
   images) against the 50 each answer states.

Target: with an explanation running, the interactive p50 stays within 1.5x its unloaded p50.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import requests

from bench import load
from bench.fleets import NO_EDGE_LIMIT, base_env, cpu_name, settle
from deploy.local.fleet import ROOT, Fleet
from deploy.local.running import on_free_ports, running
from tests.helpers import metric_value

PHOTO = (ROOT / "tests" / "fixtures" / "coffee.jpg").read_bytes()
RESULTS = ROOT / "bench" / "results"
GRID = 7
TARGET = 1.5


def log(message: str) -> None:
    print(f"[explain {time.strftime('%H:%M:%S')}] {message}", flush=True)


def images_computed(fleet: Any) -> float:
    text = requests.get(f"{fleet.service_url('resnet50')}/metrics", timeout=10).text
    return metric_value(text, "imagerec_inference_images_total", model="resnet50")


def explaining(url: str, stop: threading.Event, done: list[dict[str, Any]]) -> None:
    """Explanations back to back until ``stop``: each one's latency, status and stated passes."""
    session = requests.Session()
    n = 0
    while not stop.is_set():
        n += 1
        body = PHOTO + n.to_bytes(8, "big")  # bytes after the JPEG's end: a new photo, the same picture
        started = time.perf_counter()
        response = session.post(
            f"{url}/v1/explain?model=resnet50&grid={GRID}",
            data=body,
            headers={"Content-Type": "image/jpeg"},
            timeout=120,
        )
        answer = (
            response.json() if response.headers.get("Content-Type", "").startswith("application/json") else {}
        )
        done.append(
            {
                "ms": (time.perf_counter() - started) * 1000,
                "status": response.status_code,
                "passes": answer.get("passes"),
            }
        )


def measure(seconds: int = 20) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="imagerec-explain-") as folder:
        Path(folder).chmod(0o755)
        cache = Path.home() / ".cache" / "imagerec" / "converted"
        env = {**base_env(cache), "GATEWAY_RATE_LIMIT": ""}
        with running(
            Fleet(on_free_ports(Path(folder), models=("resnet50",)), nginx=NO_EDGE_LIMIT), env, timeout_s=1200
        ) as fleet:
            model = requests.get(f"{fleet.service_url('resnet50')}/v1/model", timeout=10).json()
            url = f"{fleet.url}/v1/predict?model=resnet50"
            alone = load.run(url, load.Payload.raw(PHOTO), connections=1, seconds=seconds)
            log(f"alone: p50 {alone['p50_ms']} ms, p99 {alone['p99_ms']} ms, {alone['img_per_s']} img/s")
            settle(fleet, ("resnet50",))
            before = images_computed(fleet)
            stop, done = threading.Event(), []
            worker = threading.Thread(target=explaining, args=(fleet.url, stop, done), daemon=True)
            worker.start()
            time.sleep(1.0)  # the first explanation is under way before the client starts
            loaded = load.run(url, load.Payload.raw(PHOTO), connections=1, seconds=seconds)
            stop.set()
            worker.join(120)
            settle(fleet, ("resnet50",))
            computed = images_computed(fleet) - before
    answered = [d for d in done if d["status"] == 200]
    interactive = loaded["statuses"].get(200, 0)
    result = {
        "cpu": cpu_name(),
        "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "precision": model.get("precision"),
        "seconds": seconds,
        "grid": GRID,
        "alone": {k: alone[k] for k in ("p50_ms", "p99_ms", "img_per_s")},
        "with_explanations": {k: loaded[k] for k in ("p50_ms", "p99_ms", "img_per_s")},
        "ratio_p50": round(loaded["p50_ms"] / alone["p50_ms"], 2),
        "explanations": len(answered),
        "explanation_statuses": sorted({d["status"] for d in done}),
        "explanation_p50_ms": round(statistics.median(d["ms"] for d in answered), 1) if answered else None,
        "stated_passes": sorted({d["passes"] for d in answered}),
        "passes_computed_per_explanation": round((computed - interactive) / len(done), 2) if done else None,
    }
    result["met"] = result["ratio_p50"] <= TARGET
    log(json.dumps(result))
    return result


def write(result: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "explain.json").write_text(json.dumps(result, indent=2))
    alone, loaded = result["alone"], result["with_explanations"]
    lines = [
        "# An interactive client while explanations run (issue 30)",
        "",
        f"Measured {result['measured']} on {result['cpu']}; ResNet50 alone, `make run`'s defaults "
        f"(WEIGHTS=random, precision {result['precision']}), rate limits off; {result['seconds']} s per run; "
        "one interactive client (wrk, one connection, new bytes every request); the explaining client asks "
        f"`POST /v1/explain?grid={result['grid']}` back to back.",
        "",
        "| interactive client | p50 ms | p99 ms | img/s |",
        "|---|---|---|---|",
        f"| alone | {alone['p50_ms']} | {alone['p99_ms']} | {alone['img_per_s']} |",
        f"| with explanations running | {loaded['p50_ms']} | {loaded['p99_ms']} | {loaded['img_per_s']} |",
        "",
        f"- p50 with explanations / alone: **{result['ratio_p50']}x** (target ≤ {TARGET}x: "
        f"{'met' if result['met'] else 'NOT met'}).",
        f"- Explanations answered: {result['explanations']} (statuses {result['explanation_statuses']}), "
        f"p50 {result['explanation_p50_ms']} ms each; stated passes {result['stated_passes']}; "
        f"forward passes the service computed per explanation: {result['passes_computed_per_explanation']}.",
        "",
    ]
    (RESULTS / "explain.md").write_text("\n".join(lines))


if __name__ == "__main__":
    write(measure())
