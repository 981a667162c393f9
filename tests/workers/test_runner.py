"""A job chunk's life without Celery: a real Redis, a job folder, and the gateway's Predictor on a
fake model client (so failures and cancellations can be placed exactly)."""

from __future__ import annotations

import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler
from typing import Any

import pytest

from common.errors import BadRequest, ModelUnavailable, Overloaded
from common.jobs import upkeep
from common.jobs.fair import FairQueue
from common.jobs.settings import JobSettings
from common.jobs.store import JobStore
from common.outcomes import Predicted, Selection
from common.tenancy.keys import KeyStore
from deploy.local.running import wait_until
from fleet.fetch import UrlFetcher
from fleet.predict import Predictor
from tests.gateway.slow_http import serve_slow_images
from tests.helpers import auth_settings, gateway_settings, photo
from tests.http_fixtures import serve
from tests.workers.fakes import ScriptedClient
from workers import callbacks
from workers.callbacks import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign
from workers.runner import Cancelled, ChunkRunner, Requeue

CAT, COFFEE = photo("chelsea.jpg"), photo("coffee.jpg")


class Clock:
    """Fake time: sleeping moves it on."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def make_runner(store: JobStore, clock: Clock, **settings: Any) -> tuple[ChunkRunner, ScriptedClient]:
    gateway = gateway_settings()
    client = ScriptedClient(gateway)
    jobs = JobSettings(redis_url="redis://unused", chunk_images=4, batch_images=2, **settings)
    runner = ChunkRunner(
        store,
        Predictor(client, gateway),  # type: ignore[arg-type]
        UrlFetcher(allow_networks=("127.0.0.0/8",), allow_ports=()),
        jobs,
        sleep=clock.sleep,
        clock=clock,
    )
    return runner, client


def submit(store: JobStore, images: list[bytes], chunk_images: int = 4, **record: Any) -> str:
    """A job as the gateway writes one: inputs, per-chunk item lists, and the record."""
    staged = store.staging()
    (staged / "inputs").mkdir()
    (staged / "chunks").mkdir()
    items = []
    for index, data in enumerate(images):
        (staged / "inputs" / f"{index:06d}").write_bytes(data)
        items.append({"index": index, "name": f"photo-{index}.jpg", "file": f"inputs/{index:06d}"})
    chunks = [items[i : i + chunk_images] for i in range(0, len(items), chunk_images)]
    for number, part in enumerate(chunks):
        (staged / "chunks" / f"{number:06d}.json").write_text(json.dumps(part))
    job_id = f"{len(images):032x}"
    store.create(
        job_id,
        staged,
        {
            "kind": "inference",
            "model": "vgg16",
            "members": ["vgg16"],
            "selection": Selection("vgg16", ("vgg16",)).to_json(),
            "top_k": 3,
            "total": len(images),
            "chunks": len(chunks),
            "chunk_images": chunk_images,
            "callback_url": "",
            **record,
        },
    )
    return job_id


def test_chunks_in_any_order_give_every_image_once_in_input_order(store: JobStore) -> None:
    clock = Clock()
    runner, client = make_runner(store, clock)
    images = [CAT, COFFEE, b"not an image", CAT, COFFEE, CAT, COFFEE, CAT, CAT, COFFEE]
    job_id = submit(store, images)
    outcomes = [runner.run(job_id, chunk) for chunk in (2, 0, 1)]
    assert [o.finished for o in outcomes] == [False, False, True]
    job = store.get(job_id)
    assert job is not None
    assert (job["status"], job["done"], job["failed"]) == ("completed", 9, 1)
    assert job["weights"] == {"vgg16": "random"}
    results = [o.to_json() for o in store.results(job)]
    assert [r["index"] for r in results] == list(range(10))
    assert [r["name"] for r in results] == [f"photo-{i}.jpg" for i in range(10)]
    assert results[2]["error"]["code"] == "unsupported_media_type" and "predictions" not in results[2]
    assert all(len(r["predictions"]) == 3 for i, r in enumerate(results) if i != 2)
    # Two images a call at most, every call at background priority: interactive clients go first.
    assert {n for _, n, _ in client.calls} <= {1, 2} and set(client.priorities) == {"background"}
    assert clock.slept == []


def test_a_redelivered_chunk_counts_once(store: JobStore) -> None:
    runner, _ = make_runner(store, Clock())
    job_id = submit(store, [CAT] * 6)
    first = runner.run(job_id, 0)
    again = runner.run(job_id, 0)  # redelivered after it was recorded
    assert first.recorded and again.skipped == "already recorded"
    # Redelivered after its results were written but before they were recorded (the worker died
    # in between): written again with the same content, counted once.
    store.write_results(job_id, 1, [Predicted(4, "x", ())])
    assert runner.run(job_id, 1).finished
    assert store.record(job_id, 1, 2, 0, None).first is False  # a second record changes nothing
    job = store.get(job_id)
    assert job is not None and (job["done"], job["failed"], job["status"]) == (6, 0, "completed")
    assert [r.index for r in store.results(job)] == list(range(6))


def test_a_cancelled_job_stops_between_calls_and_keeps_what_it_has(store: JobStore) -> None:
    runner, client = make_runner(store, Clock())
    job_id = submit(store, [CAT] * 8)
    assert runner.run(job_id, 0).recorded
    client.after_call = lambda: store.cancel(job_id)
    with pytest.raises(Cancelled):
        runner.run(job_id, 1)
    assert len(client.calls) == 3  # two for chunk 0, one for chunk 1, then it stopped
    job = store.get(job_id)
    assert job is not None and (job["status"], job["done"]) == ("cancelled", 4)
    assert runner.run(job_id, 1).skipped == "cancelled"
    assert len(list(store.results(job))) == 4  # the finished chunk stays readable


def test_a_revoked_owners_job_is_cancelled_at_its_next_batch(store: JobStore) -> None:
    keys = KeyStore(auth_settings(key_cache_s=0.1), client=store.redis)
    made = keys.create("tenant", ["jobs"], {}, "admin")
    runner, client = make_runner(store, Clock())
    runner.is_live = keys.is_live
    job_id = submit(store, [CAT] * 8, owner=made["id"])
    assert runner.run(job_id, 0).recorded
    client.after_call = lambda: keys.revoke(made["id"])  # revoke clears this process's cache
    with pytest.raises(Cancelled):
        runner.run(job_id, 1)
    job = store.get(job_id)
    assert job is not None and job["status"] == "cancelled" and job["error"] == "key_revoked"
    assert (job["done"], len(client.calls)) == (4, 3)  # chunk 0, then one call of chunk 1
    assert runner.run(job_id, 1).skipped == "cancelled"
    other = submit(store, [CAT] * 4, owner=made["id"])  # queued before the revocation
    assert runner.run(other, 0).skipped == "key revoked" and store.get(other)["status"] == "cancelled"  # type: ignore[index]


def test_a_chunk_of_slow_urls_ends_within_its_budget(store: JobStore) -> None:
    """Each batch used to get a fresh fetch timeout: 4 URLs of 2 s, two per batch, took 4 s+ of a
    0.5 s budget. Now the chunk's budget is the fetches' deadline too."""
    runner, _ = make_runner(store, Clock(), chunk_budget_s=0.5)
    runner.clock = time.monotonic  # real time: the fetches take real time
    job_id = submit(store, [CAT] * 4)
    with serve_slow_images() as server:
        chunk = store.folder(job_id) / "chunks" / "000000.json"
        items = [{"index": n, "name": f"u{n}", "url": f"{server}/slow?2"} for n in range(4)]
        chunk.write_text(json.dumps(items))
        started = time.monotonic()
        assert runner.run(job_id, 0).finished
        took = time.monotonic() - started
    assert took < 1.5, took
    errors = [outcome.to_json()["error"]["code"] for outcome in store.results(store.get(job_id))]  # type: ignore[arg-type]
    assert errors == ["url_fetch_timeout"] * 4


def test_an_overloaded_model_is_retried_after_its_retry_after(store: JobStore) -> None:
    clock = Clock()
    runner, client = make_runner(store, clock)
    client.script = [Overloaded("busy", retry_after=3), ModelUnavailable("restarting")]
    job_id = submit(store, [CAT, COFFEE])
    assert runner.run(job_id, 0).finished
    assert len(clock.slept) == 2 and 3 <= clock.slept[0] <= 4.5  # Retry-After, jittered up
    job = store.get(job_id)
    assert job is not None and (job["done"], job["failed"]) == (2, 0)


def test_a_chunk_out_of_time_is_requeued_and_its_last_run_fails_the_images(store: JobStore) -> None:
    clock = Clock()
    runner, client = make_runner(store, clock, chunk_budget_s=10, visibility_timeout_s=60)
    client.script = [ModelUnavailable("down", retry_after=4)] * 10
    job_id = submit(store, [CAT, COFFEE])
    with pytest.raises(Requeue) as requeue:
        runner.run(job_id, 0)
    assert 4 <= requeue.value.countdown_s <= 6 and sum(clock.slept) < 10
    assert not store.chunk_done(job_id, 0)
    runner.run(job_id, 0, final=True)
    job = store.get(job_id)
    assert job is not None and (job["status"], job["done"], job["failed"]) == ("failed", 0, 2)
    assert {r.to_json()["error"]["code"] for r in store.results(job)} == {"model_unavailable"}


def test_a_request_the_model_refuses_fails_its_images_at_once(store: JobStore) -> None:
    clock = Clock()
    runner, client = make_runner(store, clock)
    client.script = [BadRequest("no")]
    job_id = submit(store, [CAT, COFFEE, CAT])
    runner.run(job_id, 0)
    job = store.get(job_id)
    assert job is not None and (job["done"], job["failed"]) == (1, 2) and clock.slept == []


def test_the_finished_job_is_posted_to_its_callback_signed(store: JobStore) -> None:
    received: list[tuple[dict[str, str], bytes]] = []
    arrived = threading.Event()

    class Hook(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((dict(self.headers), body))
            self.send_response(204)
            self.end_headers()
            arrived.set()

    runner, _ = make_runner(store, Clock(), callback_secret="s3cret")
    stop = threading.Event()
    deliverer = callbacks.Deliverer(store, runner.fetcher, runner.settings)
    delivering = threading.Thread(target=callbacks.serve, args=(store.redis, deliverer, 2, stop))
    with serve(Hook) as url:
        job_id = submit(store, [CAT] * 5, callback_url=f"{url}/done")
        runner.run(job_id, 0)
        assert store.redis.llen(callbacks.QUEUE) == 0  # only the chunk that ends the job calls back
        runner.run(job_id, 1)
        # Queued, not delivered by the task: a slow callback host holds no job worker.
        assert store.redis.lrange(callbacks.QUEUE, 0, -1) == [job_id] and not received
        delivering.start()
        try:
            assert arrived.wait(5)
        finally:
            stop.set()
            delivering.join()
    [(headers, body)] = received
    assert json.loads(body)["status"] == "completed" and json.loads(body)["done"] == 5
    assert headers[SIGNATURE_HEADER] == sign("s3cret", headers[TIMESTAMP_HEADER], body)


def test_a_slow_callback_host_holds_one_delivery_thread_not_the_others(store: JobStore) -> None:
    """Callbacks are delivered ``threads`` at a time: one to a host that never answers leaves the
    others going."""
    runner, _ = make_runner(store, Clock(), callback_timeout_s=30, callback_attempts=1)
    got: list[str] = []
    arrived = threading.Event()

    class Hook(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            if self.path == "/slow":
                arrived.wait(30)  # answers only once the other callback has arrived
            got.append(self.path)
            self.send_response(204)
            self.end_headers()
            if self.path == "/fast":
                arrived.set()

    stop = threading.Event()
    deliverer = callbacks.Deliverer(store, runner.fetcher, runner.settings)
    delivering = threading.Thread(target=callbacks.serve, args=(store.redis, deliverer, 2, stop))
    with serve(Hook) as url:
        slow = submit(store, [CAT], callback_url=f"{url}/slow")
        fast = submit(store, [CAT, CAT], callback_url=f"{url}/fast")  # its id differs by its size
        runner.run(slow, 0)
        runner.run(fast, 0)
        delivering.start()
        try:
            assert arrived.wait(10)  # delivered while the slow one still waits
            wait_until(lambda: "/slow" in got, 10, "the slow callback to end")
        finally:
            stop.set()
            delivering.join()
    assert got == ["/fast", "/slow"]


def test_a_stalled_job_is_reported_once_per_period_with_its_unrecorded_chunks(store: JobStore) -> None:
    runner, _ = make_runner(store, Clock())
    running = submit(store, [CAT] * 10)  # 3 chunks
    pending = submit(store, [CAT] * 3)
    runner.run(running, 1)
    assert upkeep.stalled(store, 60, pending_too=True) == []  # both made progress (or were made) just now
    for job_id in (running, pending):
        store.redis.hset(store.key(job_id), "progress_at", 0)
    assert upkeep.stalled(store, 60, pending_too=False) == [(running, [0, 2])]
    assert upkeep.stalled(store, 60, pending_too=False) == []  # reported once per stall period
    assert upkeep.stalled(store, 60, pending_too=True) == [(pending, [0])]


def test_the_watchdog_leaves_alone_chunks_still_waiting_their_turn(store: JobStore) -> None:
    """A job whose chunks wait in its owner's fair backlog is not stalled: queueing them again
    would put them past every other key's."""
    runner, _ = make_runner(store, Clock())
    job_id = submit(store, [CAT] * 10)  # 3 chunks
    runner.run(job_id, 0)
    store.redis.hset(store.key(job_id), "progress_at", 0)
    fair = FairQueue(store.redis, per_principal=1, stale_s=600)
    fair.submit("admin", job_id, [1, 2], now=time.time())  # 1 sent, 2 in the backlog
    found = upkeep.stalled(store, 60, pending_too=False, waiting=lambda job: fair.waiting("admin", job["id"]))
    assert found == []


def test_expired_job_folders_are_swept_and_live_ones_kept(store: JobStore) -> None:
    live = submit(store, [CAT])
    expired = submit(store, [CAT, CAT])
    (store.folder(expired) / "EXPIRES").write_text("1000")  # long past
    abandoned = store.staging()  # an upload the gateway never finished
    os.utime(abandoned, (0, 0))
    fresh = store.staging()  # one being received right now
    assert upkeep.sweep(store.root) == 2
    assert store.folder(live).exists() and fresh.exists()
    assert not store.folder(expired).exists() and not abandoned.exists()
    assert store.redis.ttl(store.key(live)) > 3500  # the record expires by itself (retention 1 h)
