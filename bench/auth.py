"""What authentication costs a prediction: the same fleet, anonymous and with a key, interleaved.

ResNet50 through Nginx at one client (latency, not throughput), new bytes every request (so the
response cache never answers). A round is an anonymous run and a keyed run (a ``predict`` key made
through ``POST /v1/keys``) back to back; the figure is the median over rounds of keyed p50 minus
anonymous p50, so drift on a shared machine falls on both sides of each difference. The key's
check is a SHA-256 and a cache lookup (Redis once per ``AUTH_KEY_CACHE_S``).

``python -m bench.auth`` starts a ResNet50-only fleet with the default settings (WEIGHTS=random)
and writes bench/results/auth.json; ``make bench`` runs ``measure_on`` on its own fleet.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import load
from bench.fleets import admin_session
from deploy.local.fleet import ROOT, Fleet
from deploy.local.running import on_free_ports, running

RESULTS = ROOT / "bench" / "results"
PHOTO = (ROOT / "tests" / "fixtures" / "coffee.jpg").read_bytes()


def predict_key(fleet: Any) -> str:
    """A ``predict`` key, made as the admin (whose key the fleet generated in its run folder)."""
    made = admin_session(fleet).post(
        f"{fleet.url}/v1/keys", json={"name": "bench-auth", "scopes": ["predict"]}, timeout=10
    )
    made.raise_for_status()
    return str(made.json()["key"])


def measure_on(fleet: Any, seconds: int = 8, rounds: int = 5) -> dict[str, Any]:
    url = f"{fleet.url}/v1/predict?model=resnet50"
    key = predict_key(fleet)
    payload = load.Payload.raw(PHOTO)
    load.run(url, payload, connections=1, seconds=3)  # warm
    anonymous, keyed = [], []
    for _ in range(rounds):
        anonymous.append(load.run(url, payload, connections=1, seconds=seconds))
        keyed.append(load.run(url, payload, connections=1, seconds=seconds, api_key=key))
    for run in (*anonymous, *keyed):
        if run["statuses"].get(200, 0) != run["requests"]:
            raise RuntimeError(f"answers other than 200 in a run: {run['statuses']}")
    differences = [k["p50_ms"] - a["p50_ms"] for a, k in zip(anonymous, keyed, strict=True)]
    return {
        "path": "nginx -> gateway -> resnet50, 1 client, new bytes every request",
        "rounds": rounds,
        "seconds_per_run": seconds,
        "anonymous_p50_ms": [a["p50_ms"] for a in anonymous],
        "keyed_p50_ms": [k["p50_ms"] for k in keyed],
        "median_added_p50_ms": round(statistics.median(differences), 2),
        "differences_ms": [round(d, 2) for d in differences],
    }


def main() -> None:
    # The default settings, but for the weights (random: the ImageNet files cannot be had here).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "FLEET_", "AUTH_"))}
    env.update(WEIGHTS="random", TF_CPP_MIN_LOG_LEVEL="2")
    with tempfile.TemporaryDirectory() as folder:
        settings = on_free_ports(Path(folder), models=("resnet50",), workers=False)
        with running(Fleet(settings), env) as fleet:
            result = measure_on(fleet)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "auth.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    sys.exit(0)


if __name__ == "__main__":
    main()
