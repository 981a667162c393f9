"""Answers given before the body is read reach the client whole: no reset, no 502.

Real multi-MB photos over keep-alive connections, at a high rate, to every early-refusal path:
unknown model (404), bad parameter (400), over the rate limit (429), and a model service's own
early 400. Through Nginx and straight to the gateway's Gunicorn. Gunicorn drains at most 64 KiB of
an unread body before it resets the connection (../shared/REFERENCE.md); photos under that size,
or Flask's test client, cannot see the bug these tests guard against.

Its own small fleet (Nginx, two gateway workers, Redis, one stub model) with a low rate limit, so
the limit is reached without thousands of requests; the model service path uses the main fleet.
"""

from __future__ import annotations

import io
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image

from deploy.local.running import RunningFleet
from tests.e2e.running import E2EFleet, stub_fleet
from tests.http_fixtures import from_address

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
LIMIT_PER_MINUTE = 40


def big_photo(seed: int) -> bytes:
    """A noisy JPEG of 1-3 MB: noise does not compress."""
    rng = np.random.default_rng(seed)
    side = int(rng.integers(1100, 1600))
    pixels = rng.integers(0, 256, (side, side, 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


PHOTOS = [big_photo(seed) for seed in range(4)]


@pytest.fixture(scope="module")
def small_fleet() -> Iterator[RunningFleet]:
    env = {"GATEWAY_RATE_LIMIT": f"{LIMIT_PER_MINUTE}/minute", "GATEWAY_CACHE_SIZE": "0"}
    with stub_fleet("imagerec-refusals-", 2, GATEWAY_LEGACY_MODEL="flaky", **env) as handle:
        yield handle


_sources = (f"127.0.0.{n}" for n in range(10, 250))


def hammer(
    url: str, query: str, *, clients: int = 8, each: int = 12, source: str = "", path: str = "/v1/predict"
) -> Counter[str]:
    """``clients`` keep-alive sessions each posting ``each`` big photos; outcome counts by
    "<status> <code>", or the exception's name when no HTTP answer came back."""
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()

    def client(number: int) -> None:
        with from_address(source) if source else requests.Session() as session:
            for i in range(each):
                photo = PHOTOS[(number + i) % len(PHOTOS)]
                try:
                    response = session.post(
                        f"{url}{path}?{query}", data=photo, headers={"Content-Type": "image/jpeg"}, timeout=60
                    )
                except requests.RequestException as exc:
                    outcome = type(exc).__name__
                else:
                    is_json = response.headers.get("Content-Type", "").startswith("application/json")
                    code = response.json().get("error", {}).get("code", "") if is_json else "not-json"
                    outcome = f"{response.status_code} {code}".strip()
                with lock:
                    outcomes[outcome] += 1

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return outcomes


def test_the_photos_are_far_bigger_than_what_gunicorn_drains() -> None:
    assert all(len(photo) > 1_000_000 for photo in PHOTOS), [len(p) for p in PHOTOS]


@pytest.mark.parametrize(
    ("query", "expected"),
    [("model=nosuchmodel", "404 unknown_model"), ("model=flaky&top_k=many", "400 bad_request")],
)
@pytest.mark.parametrize("edge", ["nginx", "gateway"])
def test_early_refusals_of_big_photos_arrive_whole(
    small_fleet: RunningFleet, query: str, expected: str, edge: str
) -> None:
    s = small_fleet.fleet.settings
    url = small_fleet.url if edge == "nginx" else f"http://{s.host}:{s.gateway_port}"
    outcomes = hammer(url, query, source=next(_sources), each=4)  # a client of its own: no 429 here
    assert outcomes == {expected: 32}, outcomes


def test_a_client_over_its_rate_limit_gets_its_429s_whole_counted_once_across_routes_and_workers(
    small_fleet: RunningFleet,
) -> None:
    client = next(_sources)
    outcomes = hammer(small_fleet.url, "model=flaky&top_k=1", clients=8, each=10, source=client)
    # one count per client in Redis, whichever of the two gateway workers answered
    assert outcomes == {"200": LIMIT_PER_MINUTE, "429 too_many_requests": 80 - LIMIT_PER_MINUTE}, outcomes
    # the seed article's route shares the count: this client is over it there too
    seed = hammer(small_fleet.url, "", clients=1, each=2, source=client, path="/predict")
    assert seed == {"429 too_many_requests": 2}, seed
    # another client has a count of its own
    assert hammer(small_fleet.url, "", clients=1, each=1, source=next(_sources), path="/predict") == {
        "200": 1
    }


def test_a_model_services_own_early_refusals_arrive_whole(fleet: E2EFleet) -> None:
    """Straight to a model service (as the gateway's pooled connections reach it)."""
    outcomes = hammer(fleet.service_url("shapes"), "top_k=many", clients=4, each=6)
    assert outcomes == {"400 bad_request": 24}, outcomes
