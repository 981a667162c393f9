"""Faults, restarts and overload on the running fleet, under load: what clients see.

Every scenario runs against the real processes (supervisord, Nginx, Gunicorn, the model services)
while client threads keep sending requests; each outcome is recorded and checked afterwards.
"""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
import requests

from deploy.local.running import children, wait_until
from tests.e2e.load import CAT, JPEG, Load, Send, failures, predict
from tests.e2e.running import E2EFleet, assert_json_error, post
from tests.helpers import photo

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def batching(fleet: E2EFleet, model: str, replica: int = 0) -> dict:
    return requests.get(f"{fleet.service_url(model, replica)}/v1/model", timeout=5).json()["batching"]


def replica_ready(fleet: E2EFleet, model: str, replica: int) -> bool:
    models = requests.get(f"{fleet.url}/v1/models", timeout=5).json()["models"]
    return next(m for m in models if m["name"] == model)["replicas"][replica]["ready"]


@contextmanager
def fault(fleet: E2EFleet, kind: str, delay_s: float = 0) -> Iterator[None]:
    """Switch the ``flaky`` member's fault on for the block; off (and answering again) after."""
    chaos = f"{fleet.service_url('flaky')}/chaos"
    requests.post(chaos, json={"fault": kind, "delay_s": delay_s}, timeout=5).raise_for_status()
    try:
        yield
    finally:
        requests.post(chaos, json={"fault": "none"}, timeout=5).raise_for_status()
        wait_until(
            lambda: post(fleet, "model=flaky", data=CAT, headers=JPEG).status_code == 200,
            30,
            "flaky to answer again through the gateway",
        )


def test_sigterm_lets_an_in_flight_request_finish(fleet: E2EFleet) -> None:
    files = [("files", (f"{i}.jpg", CAT, "image/jpeg")) for i in range(16)]
    before = fleet.pids()["vgg16"]
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(post, fleet, "model=vgg16&top_k=1", files=files)
        wait_until(lambda: batching(fleet, "vgg16")["running_images"] >= 16, 60, "the batch to reach vgg16")
        fleet.ctl("restart", "vgg16")  # SIGTERM to its master: drains, then stops; returns once exited
        response = pending.result(timeout=120)
    assert response.status_code == 200, response.text
    assert [len(r["predictions"]) for r in response.json()["results"]] == [1] * 16
    assert fleet.pids()["vgg16"] != before
    fleet.wait_ready()


def test_rolling_restart_of_a_two_replica_model_loses_nothing(fleet: E2EFleet) -> None:
    with Load({"shapes": predict(fleet, "model=shapes&top_k=1")}, threads_per_kind=3) as load:
        load.wait_for(20)
        for replica, program in enumerate(("shapes", "shapes-2")):
            before, mark = fleet.pids()[program], len(load.outcomes)
            fleet.ctl("restart", program)
            assert fleet.pids()[program] != before
            wait_until(
                lambda r=replica: replica_ready(fleet, "shapes", r), 120, f"{program} back in rotation"
            )
            load.wait_for(20, since=mark)
    assert not failures(load.outcomes), failures(load.outcomes)
    assert len(load.outcomes) >= 60


def test_nginx_drains_in_flight_requests_on_quit(fleet: E2EFleet) -> None:
    master = fleet.pids()["nginx"]
    with fault(fleet, "slow", delay_s=3), ThreadPoolExecutor(1) as pool:
        pending = pool.submit(post, fleet, "model=flaky", data=CAT, headers=JPEG)
        wait_until(
            lambda: requests.get(f"{fleet.service_url('flaky')}/chaos", timeout=5).json()["in_flight"] >= 1,
            30,
            "the request to reach the member",
        )
        os.kill(master, signal.SIGQUIT)  # graceful shutdown: stop accepting, finish what is running
        response = pending.result(timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["model"] == "flaky"
    wait_until(lambda: fleet.pids().get("nginx") not in (None, master), 60, "supervisord to restart Nginx")
    wait_until(lambda: requests.get(f"{fleet.url}/health/ready", timeout=5).ok, 60, "Nginx to answer again")


def retrying_once(send: Send, retried: list[str]) -> Send:
    """A client as browsers are: a request on a kept-alive connection that the server closed at
    that moment (HTTP/1.1's keep-alive race, RFC 9112 section 9.3.1) is sent once more; each
    retry is noted in ``retried``."""

    def again(session: requests.Session) -> requests.Response:
        try:
            return send(session)
        except requests.ConnectionError as exc:
            retried.append(type(exc).__name__)
            return send(session)

    return again


def test_nginx_reload_under_load_drops_nothing(fleet: E2EFleet) -> None:
    """Old workers finish what they are serving and close idle kept-alive connections; a client
    that reuses one just as it closes gets no answer and sends again (as browsers do). Every
    request that reached Nginx is answered; CI once caught that race without the retry."""
    master = fleet.pids()["nginx"]
    old_workers = children(master)
    retried: list[str] = []
    shapes = retrying_once(predict(fleet, "model=shapes&top_k=1"), retried)
    with Load({"shapes": shapes}, threads_per_kind=3) as load:
        load.wait_for(20)
        os.kill(master, signal.SIGHUP)  # re-read the config: new workers, old ones drain
        wait_until(lambda: children(master) and not children(master) & old_workers, 30, "new Nginx workers")
        load.wait_for(20, since=len(load.outcomes))
    assert not failures(load.outcomes), failures(load.outcomes)
    # At most one per client connection (three): the moment its idle connection was closed.
    assert len(retried) <= 3, retried
    assert fleet.pids()["nginx"] == master


def test_a_model_killed_under_load(fleet: E2EFleet) -> None:
    """kill -9 of vgg16: resnet50 never notices, ensembles degrade (200), full again soon after."""
    kinds = {
        "resnet50": predict(fleet, "model=resnet50&top_k=1"),
        "ensemble": predict(fleet, "model=ensemble&top_k=1"),
    }
    with Load(kinds) as load:
        load.wait_for(2, "ensemble")
        before = fleet.pids()["vgg16"]
        os.killpg(before, signal.SIGKILL)  # the master and its worker, no warning
        wait_until(
            lambda: fleet.pids().get("vgg16") not in (None, before), 60, "supervisord to restart vgg16"
        )
        wait_until(
            lambda: requests.get(f"{fleet.service_url('vgg16')}/health/ready", timeout=2).ok,
            180,
            "vgg16 to load again",
        )
        mark = len(load.outcomes)
        wait_until(
            lambda: any(not o.degraded for o in load.of("ensemble", since=mark)),
            10,
            "a full ensemble answer within 10 s of vgg16 being ready",
        )
    assert not failures(load.outcomes), failures(load.outcomes)
    assert any(o.degraded for o in load.of("ensemble")), "no ensemble request saw vgg16 missing"
    assert len(load.of("resnet50")) >= 10


def test_a_slow_member_cannot_hold_an_ensemble_past_its_deadline(fleet: E2EFleet) -> None:
    with fault(fleet, "slow", delay_s=60):
        started = time.monotonic()
        response = post(fleet, "models=resnet50,inceptionv3,flaky&timeout_ms=3000", data=CAT, headers=JPEG)
        elapsed = time.monotonic() - started
        body = response.json()
        assert response.status_code == 200, body
        assert body["degraded"] is True and set(body["member_predictions"]) == {"resnet50", "inceptionv3"}
        [failed] = body["failed_members"]
        assert failed["model"] == "flaky" and failed["code"] in {"deadline_exceeded", "upstream_timeout"}
        assert elapsed < 5, f"answered after {elapsed:.1f}s; the deadline was 3 s, the member takes 60 s"
        assert_json_error(
            post(fleet, "model=flaky&timeout_ms=1000", data=CAT, headers=JPEG), 504, "deadline_exceeded"
        )


@pytest.mark.parametrize("kind", ["garbage", "nan", "short"])
def test_a_member_answering_garbage_counts_as_failed(fleet: E2EFleet, kind: str) -> None:
    with fault(fleet, kind):
        response = post(fleet, "models=resnet50,inceptionv3,flaky", data=CAT, headers=JPEG)
        body = response.json()
        assert response.status_code == 200, body
        assert body["degraded"] is True
        assert body["failed_members"][0]["model"] == "flaky"
        assert body["failed_members"][0]["code"] == "bad_upstream_response"
        if kind == "garbage":
            assert_json_error(
                post(fleet, "model=flaky", data=CAT, headers=JPEG), 502, "bad_upstream_response"
            )


def _mixed(fleet: E2EFleet, heavy: bool) -> Iterator[tuple[str, int, Send]]:
    """(kind, expected status, send) in a fixed cycle; ``heavy`` adds the big models."""
    coffee = photo("coffee.jpg")
    light: list[tuple[str, int, Send]] = [
        *[("shapes", 200, predict(fleet, "model=shapes&top_k=2", data=coffee, headers=JPEG))] * 8,
        ("flaky", 200, predict(fleet, "model=flaky")),
        (
            "batch",
            200,
            predict(fleet, "model=shapes", files=[("files", (f"{i}.jpg", CAT)) for i in range(4)]),
        ),
        (
            "not-an-image",
            415,
            predict(fleet, "model=shapes", data=b"hello", headers={"Content-Type": "text/plain"}),
        ),
        ("bad-base64", 400, predict(fleet, "model=shapes", json={"image": "not base64!"})),
        ("unknown-model", 404, predict(fleet, "model=alexnet")),
        ("models", 200, lambda session: session.get(f"{fleet.url}/v1/models", timeout=60)),
    ]
    heavy_kinds: list[tuple[str, int, Send]] = [
        ("resnet50", 200, predict(fleet, "model=resnet50&top_k=1")),
        ("ensemble", 200, predict(fleet, "model=ensemble&top_k=1")),
    ]
    return itertools.cycle(light * 4 + heavy_kinds if heavy else light)


def test_ten_thousand_mixed_requests_keep_memory_flat(fleet: E2EFleet) -> None:
    total, warm_up, threads = 10_000, 1_000, 4
    sent = itertools.count()
    wrong: list[tuple[str, int, int, str]] = []
    memory: dict[str, dict[str, float]] = {}
    warmed = threading.Event()

    def client(heavy: bool) -> None:
        plan = _mixed(fleet, heavy)
        with requests.Session() as session:
            while (n := next(sent)) < total:
                kind, expected, send = next(plan)
                response = send(session)
                if response.status_code != expected:
                    wrong.append((kind, expected, response.status_code, response.text[:300]))
                if n == warm_up:
                    warmed.set()

    with ThreadPoolExecutor(threads) as pool:
        # Only one thread sends the big models, so they never queue behind each other.
        running = [pool.submit(client, i == 0) for i in range(threads)]
        assert warmed.wait(600), "warm-up did not finish"
        memory["warm"] = fleet.memory_mb()
        for future in running:
            future.result()
    memory["end"] = fleet.memory_mb()
    assert not wrong, (Counter(wrong), [line for line in fleet.logs().splitlines() if "Error" in line][-20:])
    warm, end = sum(memory["warm"].values()), sum(memory["end"].values())
    assert end <= 1.10 * warm, memory
    for program, mb in memory["end"].items():
        assert mb <= 1.10 * memory["warm"][program] + 8, (program, memory)
