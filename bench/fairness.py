"""``python -m bench.fairness``: issue 27's hostile-load targets, measured on `make run`'s defaults.

A ResNet50 fleet with the default settings (WEIGHTS=random), except that the URL fetcher may reach
loopback (``GATEWAY_FETCH_ALLOW_NETWORKS=127.0.0.0/8``, any port): the hostile host lives there, a
socket that accepts connections and never answers.

1. **URL flood.** A client with a key sends photos as bytes (new bytes every request), alone and
   then while 300 clients from another address each keep a URL request to the silent host in
   flight, retrying at once whatever they are told (``Retry-After`` ignored). Target: its p50 within
   2x unloaded. Twice: the flood without a key (the target's case, held at the edge), then with a
   made-up key per client (which Nginx cannot tell from a real one: the gateway refuses it).
2. **Fair job queues.** One key queues four jobs of 1,000 URLs to the silent host; another key then
   submits a 10-image job. Target: it completes within 60 s.
3. **Kept jobs.** One key submits 10,000 one-URL jobs that each end at once (a refused port).
   Target: refused (429 ``kept_jobs``) past its quota, and Redis memory flat from there on.

Results in bench/results/fairness.{json,md}.
"""

from __future__ import annotations

import base64
import json
import os
import statistics
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import redis
import requests

from bench.fleets import admin_session, base_env, cpu_name
from deploy.local.fleet import ROOT, Fleet
from deploy.local.running import on_free_ports, running, wait_until
from tests.http_fixtures import from_address, silent_host

RESULTS = ROOT / "bench" / "results"
PHOTO = (ROOT / "tests" / "fixtures" / "coffee.jpg").read_bytes()
MODELS = ("resnet50",)
FLOOD_ADDRESS = "127.0.0.2"  # the hostile clients' address; the photo client's is 127.0.0.1
WHO = {"none": "without a key", "made-up": "each with a made-up key"}


def log(message: str) -> None:
    print(f"[bench fairness {time.strftime('%H:%M:%S')}] {message}", flush=True)


def nudged(n: int) -> bytes:
    """The photo with a JPEG comment: the same image, new bytes (the response cache never answers)."""
    comment = f"bench {n} {time.time()}".encode()
    return PHOTO[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + PHOTO[2:]


def make_key(fleet: Any, name: str, scopes: list[str], **quotas: int) -> dict[str, str]:
    made = admin_session(fleet).post(
        f"{fleet.url}/v1/keys", json={"name": name, "scopes": scopes, "quotas": quotas}, timeout=10
    )
    made.raise_for_status()
    return {"Authorization": f"Bearer {made.json()['key']}"}


def photo_p50(fleet: Any, key: dict[str, str], seconds: float) -> dict[str, Any]:
    """One client sending new photos as bytes back to back: p50 and p99 of the 200s."""
    session, times, statuses, n = requests.Session(), [], Counter[int](), 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        n += 1
        started = time.perf_counter()
        answer = session.post(
            f"{fleet.url}/v1/predict?model=resnet50&top_k=1",
            data=nudged(n),
            headers={**key, "Content-Type": "image/jpeg"},
            timeout=60,
        )
        statuses[answer.status_code] += 1
        if answer.status_code == 200:
            times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return {
        "requests": n,
        "p50_ms": round(statistics.median(times), 1) if times else None,
        "p99_ms": round(times[int(len(times) * 0.99) - 1], 1) if times else None,
        "statuses": dict(statuses),
    }


def url_flood(fleet: Any, silent: str, seconds: float, keys: str, clients: int = 300) -> dict[str, Any]:
    """A photo client's latency alone, then under ``clients`` URL clients from another address
    that send no key (``keys="none"``) or a made-up key each (``keys="made-up"``)."""
    key = make_key(fleet, f"bench-photos-{keys}", ["predict"])
    photo_p50(fleet, key, 3)  # warm
    unloaded = photo_p50(fleet, key, seconds)
    log(f"unloaded photo p50 {unloaded['p50_ms']} ms")
    stop, statuses, lock = threading.Event(), Counter[int](), threading.Lock()

    def flood(n: int) -> None:
        session = from_address(FLOOD_ADDRESS)
        if keys == "made-up":
            session.headers["Authorization"] = f"Bearer made-up-key-{n:04d}-{'x' * 32}"
        while not stop.is_set():
            try:
                answer = session.post(
                    f"{fleet.url}/v1/predict?model=resnet50", json={"url": f"{silent}/{n}.jpg"}, timeout=60
                )
                status = answer.status_code
            except requests.RequestException:
                status = 0
            with lock:
                statuses[status] += 1

    threads = [threading.Thread(target=flood, args=(n,), daemon=True) for n in range(clients)]
    for thread in threads:
        thread.start()
    time.sleep(3)  # pacing: let the flood reach its steady state before measuring
    cpu_started, wall_started = time.process_time(), time.monotonic()
    loaded = photo_p50(fleet, key, seconds)
    client_cores = (time.process_time() - cpu_started) / (time.monotonic() - wall_started)
    stop.set()
    log(
        f"photo p50 under {clients} URL clients ({keys} key) {loaded['p50_ms']} ms; flood answers "
        f"{dict(statuses)}; the clients used {client_cores:.2f} cores"
    )
    return {
        "clients": clients,
        "keys": keys,
        "unloaded": unloaded,
        "under_flood": loaded,
        "flood_statuses": dict(statuses),
        "ratio": round(loaded["p50_ms"] / unloaded["p50_ms"], 2) if loaded["p50_ms"] else None,
        # the load generator's own CPU (its 300 threads and the photo client), in cores: it shares
        # the machine with the fleet
        "client_cores": round(client_cores, 2),
        "threads": threads,
    }


def job_state(fleet: Any, key: dict[str, str], job_id: str) -> str:
    return str(requests.get(f"{fleet.url}/v1/jobs/{job_id}", headers=key, timeout=10).json()["status"])


def fair_jobs(fleet: Any, silent: str) -> dict[str, Any]:
    hog = make_key(fleet, "bench-hog", ["jobs"], active_jobs=8)
    other = make_key(fleet, "bench-other", ["jobs"])
    hogs = []
    for n in range(4):
        body = {"urls": [f"{silent}/{n}/{i}.jpg" for i in range(1000)]}
        answer = requests.post(f"{fleet.url}/v1/jobs?model=resnet50", json=body, headers=hog, timeout=60)
        answer.raise_for_status()
        hogs.append(answer.json()["job_id"])
    images = [base64.b64encode(nudged(10_000 + i)).decode() for i in range(10)]
    started = time.monotonic()
    answer = requests.post(
        f"{fleet.url}/v1/jobs?model=resnet50", json={"images": images}, headers=other, timeout=60
    )
    answer.raise_for_status()
    job_id = answer.json()["job_id"]
    wait_until(lambda: job_state(fleet, other, job_id) in ("completed", "failed"), 600, "the other key's job")
    took = time.monotonic() - started
    state = job_state(fleet, other, job_id)
    log(f"another key's 10-image job {state} in {took:.1f} s behind four 1,000-URL jobs")
    for hog_id in hogs:
        requests.delete(f"{fleet.url}/v1/jobs/{hog_id}", headers=hog, timeout=10)
    return {
        "hog_jobs": 4,
        "urls_each": 1000,
        "other_job_images": 10,
        "state": state,
        "seconds": round(took, 1),
    }


def kept_jobs(fleet: Any, attempts: int = 10_000) -> dict[str, Any]:
    key = make_key(fleet, "bench-kept", ["jobs"], active_jobs=attempts)
    store = redis.Redis.from_url(fleet.fleet.authenticated(fleet.fleet.redis_url))

    def memory() -> int:
        return int(store.info("memory")["used_memory"])  # type: ignore[index]

    before = memory()
    statuses: Counter[str] = Counter()
    at_quota: list[int] = []
    lock = threading.Lock()

    def submit(n: int) -> None:
        body = {"urls": [f"http://127.0.0.1:1/{n}.jpg"]}  # a refused port: the job ends at once
        answer = requests.post(f"{fleet.url}/v1/jobs?model=resnet50", json=body, headers=key, timeout=60)
        label = str(answer.status_code)
        if answer.status_code == 429:  # the quota it names, or the rate limit
            error = answer.json()["error"]
            label += " " + str(error.get("quota") or error["code"])
        with lock:
            statuses[label] += 1
            if label == "429 kept_jobs" and not at_quota:
                at_quota.append(memory())

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(submit, range(attempts)))
    after = memory()
    log(f"{attempts} one-URL jobs: {dict(statuses)}; Redis {before} -> {at_quota[:1]} -> {after} bytes")
    return {
        "attempts": attempts,
        "statuses": dict(statuses),
        "redis_used_memory": {
            "before": before,
            "at_quota": at_quota[0] if at_quota else None,
            "after": after,
        },
    }


def measure(seconds: float) -> dict[str, Any]:
    cache = Path(os.environ.get("MODEL_CACHE") or Path.home() / ".cache" / "imagerec" / "converted")
    env = {**base_env(cache), "GATEWAY_FETCH_ALLOW_NETWORKS": "127.0.0.0/8", "GATEWAY_FETCH_ALLOW_PORTS": ""}
    results: dict[str, Any] = {
        "measured": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpu": cpu_name(),
        "cpus": os.cpu_count(),
    }
    with tempfile.TemporaryDirectory(prefix="imagerec-fairness-") as folder, silent_host() as (silent, _):
        Path(folder).chmod(0o755)
        with running(Fleet(on_free_ports(Path(folder), models=MODELS)), env) as fleet:
            for keys in ("none", "made-up"):
                flood = url_flood(fleet, silent, seconds, keys)
                for thread in flood.pop("threads"):  # each ends with its request (the fetch timeout)
                    thread.join(timeout=60)
                results[f"url_flood_{keys.replace('-', '_')}_key"] = flood
            results["fair_jobs"] = fair_jobs(fleet, silent)
            results["kept_jobs"] = kept_jobs(fleet)
    return results


def write(results: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fairness.json").write_text(json.dumps(results, indent=2))
    floods = (results["url_flood_none_key"], results["url_flood_made_up_key"])
    jobs, kept = results["fair_jobs"], results["kept_jobs"]
    memory = kept["redis_used_memory"]
    lines = [
        "# Fair sharing under hostile load (`python -m bench.fairness`)",
        "",
        f"Measured {results['measured']} on {results['cpu']} ({results['cpus']} cores): a ResNet50 fleet on "
        "`make run`'s defaults (WEIGHTS=random), the fetcher allowed to reach loopback, where a host "
        "accepts connections and never answers.",
        "",
        "| target | figure |",
        "|---|---|",
        *(
            f"| a photo's p50 with {flood['clients']} URL clients ({WHO[flood['keys']]}) from another "
            f"address hanging, within 2x unloaded | {flood['under_flood']['p50_ms']} ms against "
            f"{flood['unloaded']['p50_ms']} ms ({flood['ratio']}x); the flood's answers "
            f"{flood['flood_statuses']}; the load generator used {flood['client_cores']} of the cores |"
            for flood in floods
        ),
        f"| another key's 10-image job behind four 1,000-URL jobs, within 60 s | {jobs['state']} in "
        f"{jobs['seconds']} s |",
        f"| {kept['attempts']:,} one-URL jobs from one key: refused past kept_jobs, Redis flat | "
        f"{kept['statuses']}; Redis used_memory {memory['before']:,} before, {memory['at_quota'] or 0:,} "
        f"at the quota, {memory['after']:,} after |",
        "",
    ]
    (RESULTS / "fairness.md").write_text("\n".join(lines))


def main() -> None:
    results = measure(float(os.environ.get("BENCH_SECONDS", "15")))
    write(results)
    log(f"done: {RESULTS}/fairness.md")


if __name__ == "__main__":
    main()
