"""Nginx's limit for requests without a key (``FLEET_NGINX_ANONYMOUS_*``): what one address sends
above it is held or refused at the edge, so it never reaches a gateway thread, and no one else
pays for it - not another address, not a request with a key from the same address.

Its own small fleet (Nginx, one gateway worker, Redis, one stub model) with a low edge limit and
the gateway's own rate limit off, so every 429 here is the edge's.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import tritonclient.grpc as triton_grpc

from deploy.local.running import RunningFleet
from deploy.settings import NginxSettings
from tests.e2e.running import stub_fleet
from tests.helpers import ADMIN_KEY, photo
from tests.http_fixtures import from_address

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
EDGE = NginxSettings(anonymous_rate="2r/s", anonymous_burst=4, anonymous_no_delay=0)
CAT = photo("chelsea.jpg")


@pytest.fixture(scope="module")
def edge_fleet() -> Iterator[RunningFleet]:
    env = {"GATEWAY_RATE_LIMIT": "", "GATEWAY_CACHE_SIZE": "0", "IMAGEREC_ADMIN_KEY": ADMIN_KEY}
    with stub_fleet("imagerec-edge-", 1, EDGE, **env) as handle:
        yield handle


def received(fleet: RunningFleet) -> int:
    """Predictions the stub model has been sent so far."""
    return int(requests.get(f"{fleet.service_url('flaky')}/chaos", timeout=5).json()["received"])


def burst(fleet: RunningFleet, source: str, n: int, headers: dict[str, str] | None = None) -> Counter[str]:
    """``n`` predictions sent at once from ``source``, each on its own connection: outcomes by
    "<status> <code>", with the refusals' Retry-After."""
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()

    def one(_: int) -> None:
        with from_address(source) as session:
            session.headers.update(headers or {})
            answer = session.post(
                f"{fleet.url}/v1/predict?model=flaky&top_k=1",
                data=CAT,
                headers={"Content-Type": "image/jpeg"},
                timeout=60,
            )
        code = answer.json().get("error", {}).get("code", "")
        outcome = f"{answer.status_code} {code}".strip()
        if answer.status_code == 429:
            outcome += f" retry-after={answer.headers.get('Retry-After')}"
        with lock:
            outcomes[outcome] += 1

    with ThreadPoolExecutor(n) as pool:
        list(pool.map(one, range(n)))
    return outcomes


def test_an_address_over_the_edge_limit_is_held_then_refused_before_the_gateway(
    edge_fleet: RunningFleet,
) -> None:
    before = received(edge_fleet)
    started = time.monotonic()
    outcomes = burst(edge_fleet, "127.0.0.31", 30)
    elapsed = time.monotonic() - started
    # one at the rate, four more held in Nginx until the rate lets them through, the rest refused
    assert outcomes == {"200": 5, "429 too_many_requests retry-after=1": 25}, outcomes
    assert elapsed >= 4 * 0.5 - 0.2, "the burst above the rate is held, not passed at once"
    # the refused requests never reached the gateway, so never the model either
    assert received(edge_fleet) - before == 5


def test_another_address_and_a_key_from_the_same_address_are_not_held(edge_fleet: RunningFleet) -> None:
    made = requests.post(
        f"{edge_fleet.url}/v1/keys",
        json={"name": "edge-test", "scopes": ["predict"]},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        timeout=10,
    )
    made.raise_for_status()
    key = {"Authorization": f"Bearer {made.json()['key']}"}
    flooded = "127.0.0.32"
    flood = threading.Thread(target=burst, args=(edge_fleet, flooded, 30))
    flood.start()
    try:
        # the key's requests are counted per key by the gateway (its limit is off here), not by address
        assert burst(edge_fleet, flooded, 12, key) == {"200": 12}
        # another address without a key has a count of its own
        with from_address("127.0.0.33") as other:
            started = time.monotonic()
            answer = other.post(
                f"{edge_fleet.url}/v1/predict?model=flaky",
                data=CAT,
                headers={"Content-Type": "image/jpeg"},
                timeout=10,
            )
        assert answer.status_code == 200 and time.monotonic() - started < 0.5  # not held behind the flood
    finally:
        flood.join()


def test_grpc_calls_without_a_key_share_the_address_count(edge_fleet: RunningFleet) -> None:
    client = triton_grpc.InferenceServerClient(url=edge_fleet.fleet.grpc_address)
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()

    def one(_: int) -> None:
        try:
            client.is_server_live()
            outcome = "ok"
        except triton_grpc.InferenceServerException as exc:
            outcome = str(exc.status())
        with lock:
            outcomes[outcome] += 1

    with ThreadPoolExecutor(30) as pool:
        list(pool.map(one, range(30)))
    refused = outcomes.pop("StatusCode.RESOURCE_EXHAUSTED", 0)
    assert refused >= 20 and set(outcomes) <= {"ok"}, outcomes
