"""Reading a request's images: URL items of one request are fetched together, by its deadline."""

from __future__ import annotations

import base64
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from flask import Flask, request

from deploy.local.running import wait_until
from fleet.fetch import UrlFetcher
from gateway.app import create_app
from gateway.inputs import InputReader
from tests.gateway.fakes import FakeModelClient
from tests.helpers import gateway_settings, photo
from tests.http_fixtures import silent_host

CAT, COFFEE = photo("chelsea.jpg"), photo("coffee.jpg")


@pytest.fixture
def reader() -> InputReader:
    fetcher = UrlFetcher(allow_networks=("127.0.0.0/8",), allow_ports=(), max_parallel=4)
    return InputReader(max_images=8, max_image_bytes=1_000_000, fetch_all=fetcher.fetch_all)


def test_a_batch_keeps_its_order_and_a_late_url_fails_alone(reader: InputReader, slow_server: str) -> None:
    images = [
        {"url": f"{slow_server}/slow?0.2"},
        {"url": f"{slow_server}/slow?3"},
        base64.b64encode(COFFEE).decode(),
        "!!!",
        {"url": f"{slow_server}/slow?0.2"},
    ]
    started = time.monotonic()
    with Flask(__name__).test_request_context(json={"images": images}, headers={"X-Deadline-Ms": "700"}):
        items, batch = reader.read(request)
    assert time.monotonic() - started < 1.3  # the 3 s URL is cut off at the client's 0.7 s
    assert batch and [i.name for i in items] == [f"images[{i}]" for i in range(5)]
    assert [i.data for i in items] == [CAT, b"", COFFEE, b"", CAT]
    late, bad = items[1].error, items[3].error
    assert late is not None and (late.status, late.code) == (504, "url_fetch_timeout")
    assert bad is not None and bad.code == "invalid_base64"


@pytest.mark.parametrize(("form", "name"), [(False, "image"), (True, "url")])
def test_a_single_url_is_cut_off_at_the_clients_deadline(
    reader: InputReader, slow_server: str, form: bool, name: str
) -> None:
    body = {"url": f"{slow_server}/slow?3"}
    started = time.monotonic()
    with Flask(__name__).test_request_context(
        method="POST", query_string={"timeout_ms": "300"}, **({"data": body} if form else {"json": body})
    ):
        items, batch = reader.read(request)
    assert time.monotonic() - started < 1
    assert not batch and items[0].name == name
    assert items[0].error is not None and items[0].error.status == 504


def test_the_gateway_answers_a_batch_of_slow_urls_within_the_clients_deadline(slow_server: str) -> None:
    settings = gateway_settings()
    fetcher = UrlFetcher(allow_networks=("127.0.0.0/8",), allow_ports=())
    app = create_app(settings, client=FakeModelClient(settings), fetcher=fetcher, poll_health=False)  # type: ignore[arg-type]
    images = [{"url": f"{slow_server}/slow?0.4"}] * 6 + [{"url": f"{slow_server}/slow?5"}]
    started = time.monotonic()
    response = app.test_client().post("/v1/predict?model=resnet50&timeout_ms=1000", json={"images": images})
    assert time.monotonic() - started < 2  # one after another: 2.4 s, then the 5 s one
    results = response.get_json()["results"]
    assert ["predictions" in r for r in results] == [True] * 6 + [False]
    assert results[6]["error"]["code"] == "url_fetch_timeout"


@pytest.fixture
def silent() -> Iterator[tuple[str, list[socket.socket]]]:
    with silent_host() as (url, taken):
        yield f"{url}/photo.jpg", taken


def test_a_host_that_never_answers_holds_only_the_url_share_of_the_threads(
    silent: tuple[str, list[socket.socket]],
) -> None:
    """Requests that fetch are admitted up to GATEWAY_URL_REQUESTS (2 here) and one client's up
    to GATEWAY_URL_REQUESTS_PER_CLIENT (1): the next is refused at once, not parked on a thread,
    and a photo sent as bytes is answered meanwhile."""
    url, taken = silent
    settings = gateway_settings(url_requests=2, url_requests_per_client=1, rate_limit="")
    fetcher = UrlFetcher(allow_networks=("127.0.0.0/8",), allow_ports=(), timeout_s=30)
    app = create_app(settings, client=FakeModelClient(settings), fetcher=fetcher, poll_health=False)  # type: ignore[arg-type]

    def ask(address: str, **body: Any) -> Any:
        return app.test_client().post(
            "/v1/predict?model=resnet50", environ_base={"REMOTE_ADDR": address}, **body
        )

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(ask, "10.0.0.1", json={"url": url})
        wait_until(lambda: len(taken) >= 1, 10, "the first fetch to reach the silent host")
        started = time.monotonic()
        again = ask("10.0.0.1", json={"url": url})  # the same client: its share is taken
        assert (again.status_code, again.json["error"]["code"]) == (503, "fetch_busy")
        assert again.headers["Retry-After"] == "1"
        second = pool.submit(ask, "10.0.0.2", json={"url": url})
        wait_until(lambda: len(taken) >= 2, 10, "the second fetch to reach the silent host")
        third = ask("10.0.0.3", json={"url": url})  # every URL slot is taken
        assert (third.status_code, third.json["error"]["code"]) == (503, "fetch_busy")
        photo_sent = ask("10.0.0.3", data=CAT, content_type="image/jpeg")
        assert photo_sent.status_code == 200
        assert time.monotonic() - started < 5  # nothing above waited for the silent host
        for connection in taken:
            connection.close()
        assert {first.result().status_code, second.result().status_code} <= {200, 400, 502}
