"""``python -m bench.soak``: half an hour of mixed traffic on ``make run``'s defaults, watching for
anything that grows without bound (issue 27).

The whole fleet as ``make run`` starts it (three models, the gateway, job workers, the trainer,
both Redis, Nginx; WEIGHTS=random), except that the URL fetcher may reach loopback, where a host
accepts connections and never answers. Every client sends new bytes each request. The traffic,
each part a loop of its own until the end:

- interactive: three keys and two anonymous addresses sending photos, paced, to each model in
  turn and now and then to a soft-vote ensemble; their latency is what the figures report;
- URL inputs to the silent host: eight anonymous clients from an address of their own, each
  sending the next as soon as the last is answered (the fetch timeout, or a refusal);
- jobs: a 20-photo archive every minute, its results read; a job of 20 URLs to the silent host
  every five minutes (ended jobs are kept for ``JOBS_RETENTION_S``, 24 h, bounded by ``kept_jobs``);
- a custom model trained, used and deleted every five minutes;
- a key made, used once and revoked every 30 s (the revoked key must get a 401).

Sampled every ``BENCH_SOAK_SAMPLE_S`` (20 s): each program's resident memory and open descriptors
(its process and children together), both Redis' ``used_memory``, and the bytes under the run folder
(logs apart: they grow until supervisord rotates them at 20 MB a file). Reported: each series at
minute 10 and at the end (medians of the samples around them), its growth and least-squares slope
over that span, and the interactive p50/p99 per five minutes. Targets: no process's memory or
descriptors grow by more than 10% from minute 10 to minute 30; the last five minutes' p99 within
1.5x the first five's.

``BENCH_SOAK_S`` (1800) sets the length: shorter runs scale every minute mark with it. Results in
bench/results/soak.{json,md}.
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
import requests

from bench import jobs
from bench.fairness import make_key, nudged
from bench.fleets import admin_session, base_env, cpu_name, processes
from deploy.local.fleet import ROOT, Fleet
from deploy.local.running import on_free_ports, rss_mb, running
from tests import colours
from tests.http_fixtures import from_address, silent_host

RESULTS = ROOT / "bench" / "results"
PHOTO = (ROOT / "tests" / "fixtures" / "coffee.jpg").read_bytes()
ROUTES = ("model=resnet50", "model=inceptionv3", "model=vgg16", "model=resnet50", "model=ensemble&vote=soft")


def log(message: str) -> None:
    print(f"[bench soak {time.strftime('%H:%M:%S')}] {message}", flush=True)


class Soak:
    """The traffic's threads, what they saw, and the samples."""

    def __init__(self, fleet: Any, silent: str, seconds: float, sample_s: float) -> None:
        self.fleet, self.url, self.silent = fleet, fleet.url, silent
        self.seconds, self.sample_s = seconds, sample_s
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.started = time.monotonic()
        self.latencies: list[tuple[float, float]] = []  # (seconds since the start, ms) of interactive 200s
        self.outcomes: dict[str, Counter[str]] = {}
        self.samples: list[dict[str, Any]] = []
        self.photos = itertools.count()
        self.admin = admin_session(fleet)

    def now(self) -> float:
        return time.monotonic() - self.started

    def count(self, part: str, outcome: str) -> None:
        with self.lock:
            self.outcomes.setdefault(part, Counter())[outcome] += 1

    def every(self, interval_s: float, part: str, action: Callable[[], None], offset_s: float = 0.0) -> None:
        """Run ``action`` every ``interval_s`` until the end; a failure is counted, never fatal."""
        next_at = self.now() + offset_s
        while not self.stop.wait(max(0.0, next_at - self.now())):
            next_at += interval_s
            try:
                action()
            except (requests.RequestException, KeyError, ValueError, TimeoutError) as exc:
                self.count(part, f"error {type(exc).__name__}")

    # the parts of the traffic

    def interactive(self, session: requests.Session, part: str, interval_s: float) -> None:
        routes = itertools.cycle(ROUTES)

        def send() -> None:
            route, started = next(routes), time.perf_counter()
            answer = session.post(
                f"{self.url}/v1/predict?{route}&top_k=3",
                data=nudged(next(self.photos)),
                headers={"Content-Type": "image/jpeg"},
                timeout=60,
            )
            if answer.status_code == 200:
                with self.lock:
                    self.latencies.append((self.now(), (time.perf_counter() - started) * 1000))
            self.count(part, str(answer.status_code))

        self.every(interval_s, part, send)

    def url_client(self, n: int) -> None:
        session = from_address("127.0.0.5")
        while not self.stop.is_set():
            try:
                answer = session.post(
                    f"{self.url}/v1/predict?model=resnet50",
                    json={"url": f"{self.silent}/{n}.jpg"},
                    timeout=60,
                )
                self.count("slow urls", str(answer.status_code))
            except requests.RequestException as exc:
                self.count("slow urls", f"error {type(exc).__name__}")

    def photo_job(self, session: requests.Session) -> None:
        run = jobs.run_job(session, self.url, PHOTO, 20, f"soak-{next(self.photos)}", timeout_s=600)
        results = session.get(f"{self.url}/v1/jobs/{run['job_id']}/results", timeout=60)
        self.count("photo jobs", f"{run['status']} {run['done']}/20 results {results.status_code}")

    def url_job(self, session: requests.Session) -> None:
        urls = [f"{self.silent}/job-{next(self.photos)}.jpg" for _ in range(20)]
        answer = session.post(f"{self.url}/v1/jobs?model=resnet50", json={"urls": urls}, timeout=60)
        answer.raise_for_status()
        job_id = answer.json()["job_id"]
        last = jobs.wait_finished(session, self.url, job_id, 600)
        self.count("url jobs", f"{last['status']} {last['failed']}/20 failed")

    def training(self, session: requests.Session) -> None:
        name = f"soak-colours-{next(self.photos)}"
        answer = session.post(
            f"{self.url}/v1/training",
            files={"dataset": ("photos.zip", colours.archive(10, seed=1))},
            data={"name": name, "base": "resnet50", "epochs": "20"},
            timeout=300,
        )
        answer.raise_for_status()
        last = jobs.wait_finished(session, self.url, answer.json()["job_id"], 900)
        used = session.post(
            f"{self.url}/v1/predict?model={name}",
            data=nudged(next(self.photos)),
            timeout=60,
            headers={"Content-Type": "image/jpeg"},
        )
        deleted = session.delete(f"{self.url}/v1/models/{name}", timeout=30)
        self.count("trainings", f"{last['status']} used {used.status_code} delete {deleted.status_code}")

    def key_turnover(self) -> None:
        made = self.admin.post(
            f"{self.url}/v1/keys",
            json={"name": f"soak-{next(self.photos)}", "scopes": ["predict"]},
            timeout=10,
        )
        made.raise_for_status()
        key = {"Authorization": f"Bearer {made.json()['key']}", "Content-Type": "image/jpeg"}
        url = f"{self.url}/v1/predict?model=resnet50&top_k=1"
        used = requests.post(url, data=nudged(next(self.photos)), headers=key, timeout=60)
        revoked = self.admin.delete(f"{self.url}/v1/keys/{made.json()['id']}", timeout=10)
        after = requests.post(url, data=nudged(next(self.photos)), headers=key, timeout=60)
        self.count("keys", f"used {used.status_code} revoked {revoked.status_code} then {after.status_code}")

    # what is sampled

    def sample(self) -> None:
        row: dict[str, Any] = {"t": round(self.now(), 1), "rss_mb": {}, "fds": {}}
        for program, pids in processes(self.fleet, stubs=False).items():
            row["rss_mb"][program] = round(sum(rss_mb(pid) for pid in pids), 1)
            row["fds"][program] = sum(_descriptors(pid) for pid in pids)
        for name, url in (
            ("redis", self.fleet.fleet.redis_url),
            ("redis-cache", self.fleet.fleet.cache_redis_url),
        ):
            store = redis.Redis.from_url(self.fleet.fleet.authenticated(url), socket_timeout=5)
            row[f"{name}_used_memory"] = int(store.info("memory")["used_memory"])  # type: ignore[index]
        run_dir = self.fleet.fleet.run_dir
        logs = run_dir / "logs"
        row["run_dir_bytes"] = _bytes_under(run_dir, skip=logs)
        row["log_bytes"] = _bytes_under(logs)
        self.samples.append(row)

    def run(self) -> None:
        keys = [from_address("127.0.0.1") for _ in range(3)]
        for n, session in enumerate(keys):
            session.headers["Authorization"] = make_key(self.fleet, f"soak-user-{n}", ["predict"])[
                "Authorization"
            ]
        owner = from_address("127.0.0.1")
        owner.headers["Authorization"] = make_key(self.fleet, "soak-owner", ["predict", "jobs", "train"])[
            "Authorization"
        ]
        parts: list[tuple[Callable[..., None], tuple[Any, ...]]] = [
            *((self.interactive, (session, "keyed photos", 1.0)) for session in keys),
            *(
                (self.interactive, (from_address(f"127.0.0.{3 + n}"), "anonymous photos", 2.0))
                for n in range(2)
            ),
            *((self.url_client, (n,)) for n in range(8)),
            (self.every, (60.0, "photo jobs", lambda: self.photo_job(owner), 5.0)),
            (self.every, (300.0, "url jobs", lambda: self.url_job(owner), 20.0)),
            (self.every, (300.0, "trainings", lambda: self.training(owner), 40.0)),
            (self.every, (30.0, "keys", self.key_turnover)),
        ]
        threads = [threading.Thread(target=target, args=args, daemon=True) for target, args in parts]
        for thread in threads:
            thread.start()
        next_at = 0.0
        while self.now() < self.seconds:
            self.sample()
            if len(self.samples) % 15 == 1:
                log(f"{self.now():.0f} s: {self.samples[-1]['rss_mb']}")
            next_at += self.sample_s
            time.sleep(max(0.0, next_at - self.now()))
        self.stop.set()
        for thread in threads:
            thread.join(timeout=120)


def _descriptors(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:  # gone, e.g. the trainer's child between trainings
        return 0


def _bytes_under(folder: Path, skip: Path | None = None) -> int:
    total = 0
    for path in folder.rglob("*"):
        if skip is not None and path.is_relative_to(skip):
            continue
        try:
            total += path.stat().st_size if path.is_file() else 0
        except OSError:  # removed while walking
            continue
    return total


def trend(points: list[tuple[float, float]], start_s: float, end_s: float, span_s: float) -> dict[str, Any]:
    """A series from ``start_s`` to ``end_s``: the median of the samples within ``span_s`` of each
    end, the growth between them, and the least-squares slope per hour over the span."""
    inside = [(t, v) for t, v in points if start_s - span_s <= t <= end_s]
    first = [v for t, v in inside if abs(t - start_s) <= span_s]
    last = [v for t, v in inside if t >= end_s - span_s]
    if len(inside) < 2 or not first or not last:
        return {}
    at_start, at_end = statistics.median(first), statistics.median(last)
    mean_t = statistics.fmean(t for t, _ in inside)
    mean_v = statistics.fmean(v for _, v in inside)
    spread = sum((t - mean_t) ** 2 for t, _ in inside)
    slope = sum((t - mean_t) * (v - mean_v) for t, v in inside) / spread if spread else 0.0
    return {
        "at_start": round(at_start, 1),
        "at_end": round(at_end, 1),
        "growth_pct": round((at_end - at_start) / at_start * 100, 1) if at_start else None,
        "slope_per_hour": round(slope * 3600, 1),
    }


def windows(latencies: list[tuple[float, float]], seconds: float, count: int = 6) -> list[dict[str, Any]]:
    width = seconds / count
    rows = []
    for n in range(count):
        times = sorted(ms for t, ms in latencies if n * width <= t < (n + 1) * width)
        rows.append(
            {
                "from_s": round(n * width),
                "to_s": round((n + 1) * width),
                "answers": len(times),
                "p50_ms": round(statistics.median(times), 1) if times else None,
                "p99_ms": round(times[max(0, int(len(times) * 0.99) - 1)], 1) if times else None,
            }
        )
    return rows


def summarise(soak: Soak) -> dict[str, Any]:
    start_s, end_s = soak.seconds / 3, soak.seconds  # minute 10 and minute 30 of a 30-minute soak
    span_s = max(soak.seconds / 30, 2 * soak.sample_s)  # a minute either side (two samples at least)
    samples = soak.samples
    series: dict[str, dict[str, Any]] = {}
    for program in samples[-1]["rss_mb"]:
        for measure in ("rss_mb", "fds"):
            points = [(row["t"], row[measure].get(program, 0)) for row in samples]
            series[f"{program} {measure}"] = trend(points, start_s, end_s, span_s)
    for measure in ("redis_used_memory", "redis-cache_used_memory", "run_dir_bytes", "log_bytes"):
        series[measure] = trend([(row["t"], row[measure]) for row in samples], start_s, end_s, span_s)
    latency = windows(soak.latencies, soak.seconds)
    first, last = latency[0]["p99_ms"], latency[-1]["p99_ms"]
    processes_grown = {
        name: figures["growth_pct"]
        for name, figures in series.items()
        if name.endswith(("rss_mb", "fds")) and figures and (figures["growth_pct"] or 0) > 10
    }
    return {
        "measured": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpu": cpu_name(),
        "cpus": os.cpu_count(),
        "seconds": soak.seconds,
        "sample_s": soak.sample_s,
        "series": series,
        "latency_windows": latency,
        "p99_last_over_first": round(last / first, 2) if first and last else None,
        "processes_grown_over_10_pct": processes_grown,
        "outcomes": {part: dict(counts) for part, counts in soak.outcomes.items()},
        "samples": samples,
    }


def write(results: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "soak.json").write_text(json.dumps(results, indent=2))
    minutes = results["seconds"] / 60
    lines = [
        "# Soak: mixed traffic on `make run`'s defaults (`python -m bench.soak`)",
        "",
        f"Measured {results['measured']} on {results['cpu']} ({results['cpus']} cores): "
        f"{minutes:.0f} minutes, sampled every {results['sample_s']:.0f} s. Growth is from minute "
        f"{minutes / 3:.0f} to the end "
        "(medians of the samples a minute either side); the slope is least squares over that span.",
        "",
        f"- Processes grown by more than 10%: {results['processes_grown_over_10_pct'] or 'none'}",
        f"- Interactive p99, last window over first: {results['p99_last_over_first']}x",
        "",
        "| series | at start | at end | growth % | slope per hour |",
        "|---|---|---|---|---|",
        *(
            f"| {name} | {f['at_start']:,} | {f['at_end']:,} | {f['growth_pct']} | {f['slope_per_hour']:,} |"
            for name, f in results["series"].items()
            if f
        ),
        "",
        "| interactive, from-to s | answers | p50 ms | p99 ms |",
        "|---|---|---|---|",
        *(
            f"| {w['from_s']}-{w['to_s']} | {w['answers']} | {w['p50_ms']} | {w['p99_ms']} |"
            for w in results["latency_windows"]
        ),
        "",
        "| traffic | outcomes |",
        "|---|---|",
        *(f"| {part} | {counts} |" for part, counts in sorted(results["outcomes"].items())),
        "",
    ]
    (RESULTS / "soak.md").write_text("\n".join(lines))


def measure(seconds: float, sample_s: float) -> dict[str, Any]:
    cache = Path(os.environ.get("MODEL_CACHE") or Path.home() / ".cache" / "imagerec" / "converted")
    env = {**base_env(cache), "GATEWAY_FETCH_ALLOW_NETWORKS": "127.0.0.0/8", "GATEWAY_FETCH_ALLOW_PORTS": ""}
    with tempfile.TemporaryDirectory(prefix="imagerec-soak-") as folder, silent_host() as (silent, _):
        Path(folder).chmod(0o755)
        with running(Fleet(on_free_ports(Path(folder))), env, timeout_s=900) as fleet:
            soak = Soak(fleet, silent, seconds, sample_s)
            log(f"soaking for {seconds:.0f} s")
            soak.run()
            return summarise(soak)


def main() -> None:
    results = measure(
        float(os.environ.get("BENCH_SOAK_S", "1800")), float(os.environ.get("BENCH_SOAK_SAMPLE_S", "20"))
    )
    write(results)
    grown, ratio = results["processes_grown_over_10_pct"], results["p99_last_over_first"]
    log(f"done: {RESULTS}/soak.md; grown over 10%: {grown}; p99 last over first: {ratio}x")


if __name__ == "__main__":
    main()
