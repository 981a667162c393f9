"""The gateway describes itself: a valid OpenAPI 3 document that names every route it serves."""

from __future__ import annotations

import re

import pytest
from flask import Flask
from openapi_spec_validator import validate

from gateway import docs
from gateway.app import create_app
from tests.gateway.fakes import FakeModelClient
from tests.helpers import gateway_settings


@pytest.fixture
def app() -> Flask:
    settings = gateway_settings()
    return create_app(settings, client=FakeModelClient(settings), poll_health=False)  # type: ignore[arg-type]


def test_the_description_is_valid_openapi() -> None:
    validate(docs.spec())


def test_every_public_route_is_described_and_nothing_else(app: Flask) -> None:
    internal = {
        "/metrics",
        "/openapi.json",
        "/docs",
        "/docs/static/<path:name>",
        "/static/<path:filename>",
        "/v2",
    }
    served = {
        re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        for rule in app.url_map.iter_rules()
        if rule.rule not in internal
    }
    assert served == set(docs.spec()["paths"])


def test_spec_and_docs_page_are_served(app: Flask) -> None:
    client = app.test_client()
    assert client.get("/openapi.json").get_json()["info"]["title"] == "imagerec"
    page = client.get("/docs")
    assert page.status_code == 200 and b"swagger-ui-bundle.js" in page.data
    asset = client.get("/docs/static/swagger-ui.css")
    assert asset.status_code == 200 and asset.content_type.startswith("text/css")
    asset.close()
