"""Asynchronous jobs on the running fleet: Nginx, the gateway, Redis and the Celery worker, with
the faults a deployment meets (a worker killed with -9, Redis and the gateway restarted)."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import tarfile
import time
import zipfile
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from celery import Celery

from deploy.local.running import children, wait_until
from tests.e2e import shapes
from tests.e2e.running import E2EFleet, job, wait_for
from tests.helpers import photo, png_declaring
from tests.http_fixtures import serve
from workers.callbacks import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CAT = photo("chelsea.jpg")


def shapes_zip(count: int, seed: int) -> tuple[bytes, dict[str, str]]:
    """A zip of ``count`` shape photos in one folder per class; returns it and name -> class."""
    images, labels = shapes.dataset(count, seed)
    buffer, truth = io.BytesIO(), {}
    with zipfile.ZipFile(buffer, "w") as archive:
        for number, (data, label) in enumerate(zip(images, labels, strict=True)):
            name = f"{shapes.CLASSES[label]}/{number:05d}.png"
            archive.writestr(name, data)
            truth[name] = shapes.CLASSES[label]
    return buffer.getvalue(), truth


def submit(fleet: E2EFleet, query: str, **kwargs: Any) -> requests.Response:
    return requests.post(f"{fleet.url}/v1/jobs?{query}", headers=fleet.admin, timeout=120, **kwargs)


def results(fleet: E2EFleet, job_id: str, form: str = "json") -> requests.Response:
    answer = requests.get(
        f"{fleet.url}/v1/jobs/{job_id}/results?format={form}", headers=fleet.admin, timeout=60
    )
    assert answer.status_code == 200, answer.text
    return answer


def assert_each_image_once_in_order(fleet: E2EFleet, job_id: str, total: int) -> list[dict[str, Any]]:
    body = results(fleet, job_id).json()
    assert [r["index"] for r in body["results"]] == list(range(total))
    assert body["done"] + body["failed"] == total
    return body["results"]  # type: ignore[no-any-return]


def job_count(fleet: E2EFleet) -> int:
    return len(requests.get(f"{fleet.url}/v1/jobs?limit=100", headers=fleet.admin, timeout=10).json()["jobs"])


def test_a_zip_job_classifies_every_image_in_input_order(fleet: E2EFleet) -> None:
    archive, truth = shapes_zip(120, seed=11)
    answer = submit(
        fleet, "model=shapes&top_k=2", files={"archive": ("shapes.zip", archive, "application/zip")}
    )
    assert answer.status_code == 202, answer.text
    accepted = answer.json()
    assert answer.headers["Location"] == f"/v1/jobs/{accepted['job_id']}"
    assert accepted["status"] == "pending" and accepted["total"] == 120 and accepted["model"] == "shapes"

    done = wait_for(fleet, accepted["job_id"], ("completed", "failed"), 180)
    assert (done["status"], done["done"], done["failed"], done["progress"]) == ("completed", 120, 0, 1.0)
    assert done["weights"] == {"shapes": "file"} and done["images_per_s"] > 0 and done["eta_s"] is None
    outcomes = assert_each_image_once_in_order(fleet, accepted["job_id"], 120)
    assert [o["name"] for o in outcomes] == sorted(truth)
    right = sum(o["predictions"][0]["label"] == truth[o["name"]] for o in outcomes)
    assert right >= 0.9 * 120, right

    csv_rows = results(fleet, accepted["job_id"], "csv").text.splitlines()
    assert csv_rows[0] == "index,name,status,label_1,score_1,label_2,score_2,error_code,error_message"
    assert len(csv_rows) == 121 and csv_rows[1].startswith(f"0,{sorted(truth)[0]},ok,")
    assert len(results(fleet, accepted["job_id"], "jsonl").text.splitlines()) == 120
    listed = requests.get(f"{fleet.url}/v1/jobs?limit=5", headers=fleet.admin, timeout=10).json()["jobs"]
    assert accepted["job_id"] in [j["job_id"] for j in listed]


def test_json_images_and_urls_with_poisonous_ones_fail_alone(fleet: E2EFleet) -> None:
    images, _ = shapes.dataset(3, seed=12)
    body = {
        "images": [
            base64.b64encode(images[0]).decode(),
            {"url": f"{fleet.image_server}/cat.jpg"},
            base64.b64encode(b"GIF89a but not really").decode(),
            base64.b64encode(png_declaring(100_000, 100_000)).decode(),  # a decompression bomb
            {"url": f"{fleet.image_server}/missing"},
            "not base64 at all!",
            {"image": base64.b64encode(images[1]).decode(), "name": "second.png"},
        ]
    }
    answer = submit(fleet, "model=shapes&top_k=1", json=body)
    assert answer.status_code == 202, answer.text
    done = wait_for(fleet, answer.json()["job_id"], ("completed", "failed"), 120)
    assert (done["status"], done["done"], done["failed"]) == ("completed", 3, 4)
    outcomes = assert_each_image_once_in_order(fleet, done["job_id"], 7)
    codes = [o.get("error", {}).get("code") for o in outcomes]
    assert codes[0] is None and codes[1] is None and codes[6] is None and outcomes[6]["name"] == "second.png"
    assert codes[2:6] == ["unsupported_media_type", "image_too_large", "url_fetch_failed", "invalid_base64"]


def test_a_finished_job_calls_back_signed_from_outside_the_chunk_tasks(fleet: E2EFleet) -> None:
    """The job worker's main process delivers the callback, signed with the key `make run` made
    in run/secrets (as compose's `make secrets` does)."""
    received: list[tuple[dict[str, str], bytes]] = []

    class Hook(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:  # noqa: N802
            received.append((dict(self.headers), self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

    images, _ = shapes.dataset(1, seed=13)
    with serve(Hook) as url:
        body = {"images": [base64.b64encode(images[0]).decode()], "callback_url": f"{url}/done"}
        answer = submit(fleet, "model=shapes&top_k=1", json=body)
        assert answer.status_code == 202, answer.text
        wait_until(lambda: bool(received), 120, "the job's callback")
    [(headers, sent)] = received
    assert json.loads(sent)["job_id"] == answer.json()["job_id"] and json.loads(sent)["status"] == "completed"
    secret = Path(fleet.fleet.secret_env()["JOBS_CALLBACK_SECRET_FILE"]).read_text().strip()
    assert headers[SIGNATURE_HEADER] == sign(secret, headers[TIMESTAMP_HEADER], sent)


def tar_with(member: tarfile.TarInfo, data: bytes = b"") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        archive.addfile(member, io.BytesIO(data) if data else None)
    return buffer.getvalue()


def zip_of(entries: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def test_hostile_uploads_are_refused_before_any_job_exists(fleet: E2EFleet) -> None:
    link = tarfile.TarInfo("cats/evil.jpg")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    png = shapes.dataset(1, seed=1)[0][0]
    cases = [
        ("corrupt", zip_of({"a.png": png})[:-30], 400, "invalid_archive"),
        ("traversal", zip_of({"../../etc/cron.d/x.png": png}), 400, "unsafe_archive"),
        ("absolute", zip_of({"/tmp/x.png": png}), 400, "unsafe_archive"),
        ("symlink", tar_with(link), 400, "unsafe_archive"),
        (
            "bomb",
            zip_of({"zeros.png": bytes(200 * 1024 * 1024)}, zipfile.ZIP_DEFLATED),
            413,
            "archive_too_large",
        ),
        ("not an archive", CAT, 400, "invalid_archive"),
    ]
    before = job_count(fleet)
    folders = (
        set(os.listdir(fleet.fleet.run_dir / "jobs")) if (fleet.fleet.run_dir / "jobs").exists() else set()
    )
    for what, data, status, code in cases:
        answer = submit(fleet, "model=shapes", files={"archive": ("upload", data)})
        assert (answer.status_code, answer.json()["error"]["code"]) == (status, code), (what, answer.text)
    answer = submit(fleet, "model=nope", files={"archive": ("upload", zip_of({"a.png": png}))})
    assert (answer.status_code, answer.json()["error"]["code"]) == (404, "unknown_model")
    answer = submit(fleet, "model=shapes", json={"images": []})
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "bad_request"
    assert job_count(fleet) == before
    after = (
        set(os.listdir(fleet.fleet.run_dir / "jobs")) if (fleet.fleet.run_dir / "jobs").exists() else set()
    )
    assert after == folders  # nothing left behind, not even a staging folder


def test_a_cancelled_job_stops_within_seconds_and_keeps_its_results(fleet: E2EFleet) -> None:
    answer = submit(fleet, "model=vgg16&top_k=1", files=[("files", (f"{i}.jpg", CAT)) for i in range(160)])
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["job_id"]
    wait_until(lambda: job(fleet, job_id)["done"] >= 2, 120, "the job to make progress")
    cancelled = requests.delete(f"{fleet.url}/v1/jobs/{job_id}", headers=fleet.admin, timeout=10)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    # A chunk already running may finish and be recorded; nothing after it. Settled: no task of
    # the job is queued (each one left is skipped at once) and no worker runs one (asked of them).
    wait_until(lambda: not job_tasks(fleet, job_id), 120, "the cancelled job's tasks to drain")
    settled = job(fleet, job_id)["done"]
    final = job(fleet, job_id)
    assert final["status"] == "cancelled" and final["done"] == settled < 160
    kept = results(fleet, job_id).json()["results"]
    assert len(kept) == settled and all("predictions" in r for r in kept)
    again = requests.delete(f"{fleet.url}/v1/jobs/{job_id}", headers=fleet.admin, timeout=10)
    assert again.status_code == 200  # cancelling twice is harmless


def job_tasks(fleet: E2EFleet, job_id: str) -> int:
    """Tasks of ``job_id`` queued or running on a worker (Celery's own inspection, over the queue's
    Redis)."""
    broker = redis.Redis.from_url(fleet.fleet.authenticated(fleet.fleet.redis_url))
    queued = sum(job_id.encode() in message for message in broker.lrange("jobs", 0, -1))
    control = Celery(broker=fleet.fleet.authenticated(fleet.fleet.redis_url)).control
    active = control.inspect(timeout=2).active() or {}
    running = sum(job_id in str(task.get("args")) for tasks in active.values() for task in tasks)
    return queued + running


def worker_pids(fleet: E2EFleet) -> list[int]:
    """The Celery worker's main process and its pool processes."""
    main = fleet.pids()["worker"]
    return [main, *children(main)]


def test_kill_9_of_every_worker_process_loses_nothing(fleet: E2EFleet) -> None:
    archive, _ = shapes_zip(600, seed=13)
    answer = submit(fleet, "model=shapes&top_k=1", files={"archive": ("s.zip", archive)})
    job_id = answer.json()["job_id"]
    wait_until(lambda: job(fleet, job_id)["done"] >= 64, 120, "the job to make progress")
    victims = worker_pids(fleet)
    assert len(victims) >= 2
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    assert job(fleet, job_id)["status"] == "running"
    wait_until(lambda: fleet.pids().get("worker") not in (None, victims[0]), 60, "the worker to be restarted")
    back = time.monotonic()
    done = wait_for(fleet, job_id, ("completed", "failed"), 150)
    # Its unacknowledged tasks come back after the visibility timeout (JOBS_VISIBILITY_TIMEOUT_S).
    assert time.monotonic() - back < 120
    assert (done["status"], done["done"], done["failed"]) == ("completed", 600, 0)
    assert_each_image_once_in_order(fleet, job_id, 600)


def test_redis_and_the_gateway_restarted_mid_job_lose_nothing(fleet: E2EFleet) -> None:
    archive, _ = shapes_zip(600, seed=14)
    answer = submit(fleet, "model=shapes&top_k=1", files={"archive": ("s.zip", archive)})
    job_id = answer.json()["job_id"]
    wait_until(lambda: job(fleet, job_id)["done"] >= 32, 120, "the job to make progress")
    assert "redis" in fleet.ctl("restart", "redis")
    wait_until(lambda: job(fleet, job_id)["done"] >= 200, 120, "the job to go on after Redis restarted")
    assert "gateway" in fleet.ctl("restart", "gateway")
    # A task lost with Redis's restart (kombu pops, then records it as unacknowledged) is queued
    # again once the job has recorded nothing for JOBS_STALL_S (60 s; checked every 15 s).
    done = wait_for(fleet, job_id, ("completed", "failed"), 240)
    assert (done["status"], done["done"], done["failed"]) == ("completed", 600, 0)
    assert_each_image_once_in_order(fleet, job_id, 600)
