"""The gateway's route table: every route is either scoped or named as needing no scope."""

from __future__ import annotations

from gateway import auth
from gateway.app import create_app
from gateway.settings import GatewaySettings


def test_every_route_needs_a_scope_or_is_named_public() -> None:
    app = create_app(GatewaySettings(), poll_health=False)
    endpoints = {rule.endpoint for rule in app.url_map.iter_rules()}
    unnamed = {
        endpoint
        for endpoint in endpoints
        if endpoint not in auth.SCOPES
        and endpoint not in auth.PUBLIC
        and endpoint not in auth.OPEN
        and not endpoint.startswith(("docs.", "static"))
    }
    assert not unnamed, f"routes whose scope nobody decided: {sorted(unnamed)}"
    assert set(auth.SCOPES) <= endpoints, "a scope names a route that does not exist"


def test_one_url_one_module() -> None:
    """Every method of a URL is handled by one blueprint (``/v1/models/<name>``: GET, DELETE, PATCH)."""
    app = create_app(GatewaySettings(), poll_health=False)
    owners: dict[str, set[str]] = {}
    for rule in app.url_map.iter_rules():
        owners.setdefault(rule.rule, set()).add(rule.endpoint.split(".")[0])
    assert owners["/v1/models/<name>"] == {"models"}
    assert {rule: found for rule, found in owners.items() if len(found) > 1} == {}
