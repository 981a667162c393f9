"""Fixtures of the gateway tests (the Redis server and the trainer's removal loop are in
tests/conftest.py; gateways over a real Redis are built by ``tests.gateway.fakes.redis_gateway``)."""

from __future__ import annotations

import pytest
from flask.testing import FlaskClient

from gateway.app import create_app
from tests.gateway.fakes import FakeModelClient, StubFetcher
from tests.helpers import gateway_settings


@pytest.fixture
def fake() -> FakeModelClient:
    """A fake fleet for the default test settings: no replica is ever called."""
    return FakeModelClient(gateway_settings())


@pytest.fixture
def stub_fetcher() -> StubFetcher:
    return StubFetcher()


@pytest.fixture
def gateway(fake: FakeModelClient, stub_fetcher: StubFetcher) -> FlaskClient:
    """A test client of the gateway on the ``fake`` fleet: no Redis, URLs answered by
    ``stub_fetcher``, at most 4 images a request."""
    app = create_app(
        gateway_settings(max_request_images=4),
        client=fake,  # type: ignore[arg-type]
        fetcher=stub_fetcher,  # type: ignore[arg-type]
        poll_health=False,
    )
    return app.test_client()
