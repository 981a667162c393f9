"""Custom models in the registry: routed from the first request that names one, and confirmed as
served by every ready replica of its base (what the trainer waits for)."""

from __future__ import annotations

from typing import Any

import pytest
import responses

from common.errors import UnknownModel
from fleet.client import new_session
from fleet.registry import Registry

R1, R2 = "http://replica-1:8502", "http://replica-2:8502"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def listing(*custom: tuple[str, int, str]) -> dict[str, Any]:
    models = [{"name": n, "version": str(v), "base": "resnet50", "state": s} for n, v, s in custom]
    return {"name": "resnet50", "state": "ready", "ready": True, "custom_models": models}


def serve(url: str, *custom: tuple[str, int, str]) -> None:
    """What ``url``'s ``/v1/model`` answers from now on."""
    responses.upsert(responses.GET, f"{url}/v1/model", json=listing(*custom))


def registry(*urls: str, probe_s: float = 1.0, clock: Clock | None = None) -> Registry:
    return Registry({"resnet50": urls}, new_session(2), unknown_probe_s=probe_s, clock=clock or Clock())


def probes(url: str) -> int:
    return sum(1 for call in responses.calls if call.request.url == f"{url}/v1/model")


@responses.activate
def test_a_model_published_since_the_last_round_is_routed_from_its_first_request() -> None:
    serve(R1)
    found = registry(R1)
    found.refresh()
    serve(R1, ("pets", 1, "ready"))  # the service loaded it after the last round
    assert found.base_of("pets") == "resnet50"


@responses.activate
def test_unknown_names_probe_at_most_once_per_interval() -> None:
    serve(R1)
    clock = Clock()
    found = registry(R1, clock=clock)
    for name in ("nope", "nada", "nichts"):  # a client guessing names
        with pytest.raises(UnknownModel):
            found.base_of(name)
    assert probes(R1) == 1
    clock.now += 1.0
    with pytest.raises(UnknownModel):
        found.base_of("nope")
    assert probes(R1) == 2
    for name in ("../etc", "resnet50x" * 20):  # never a model name: no probe at all
        with pytest.raises(UnknownModel):
            found.base_of(name)
    assert probes(R1) == 2


@responses.activate
def test_off_an_unknown_name_never_probes() -> None:
    serve(R1, ("pets", 1, "ready"))
    found = registry(R1, probe_s=0)
    with pytest.raises(UnknownModel):
        found.base_of("pets")
    assert probes(R1) == 0


@responses.activate
def test_a_version_is_served_once_every_ready_replica_serves_it() -> None:
    serve(R1, ("pets", 2, "ready"))
    serve(R2, ("pets", 1, "ready"))
    found = registry(R1, R2)
    assert not found.serving("resnet50", "pets", 2)  # replica 2 still serves version 1
    serve(R2, ("pets", 2, "stale"))
    assert not found.serving("resnet50", "pets", 2)  # listed, but not servable
    serve(R2, ("pets", 3, "ready"))
    assert found.serving("resnet50", "pets", 2)  # a later version counts
    assert not found.serving("resnet50", "other", 1)
    responses.upsert(responses.GET, f"{R1}/v1/model", status=503)
    responses.upsert(responses.GET, f"{R2}/v1/model", status=503)
    assert not found.serving("resnet50", "pets", 2)  # no ready replica: nothing confirms it
