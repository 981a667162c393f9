"""The replica registry: health from probes, and replicas from DNS (one per address of a name)."""

from __future__ import annotations

import socket
import threading
from datetime import UTC, datetime

import pytest
import requests
import responses
from responses import matchers

from fleet.client import ModelClient, new_session
from fleet.registry import Registry
from tests.fleet.fakes import reply

PODS = "http://imagerec-resnet50-pods:8502"


class FakeDns:
    """A resolver answering from a table; an exception in the table is raised."""

    def __init__(self, **answers: list[str] | Exception) -> None:
        self.answers = answers
        self.asked: list[str] = []
        self.called = threading.Event()

    def __call__(self, name: str) -> list[str]:
        self.asked.append(name)
        self.called.set()
        answer = self.answers[name.replace("-", "_")]
        if isinstance(answer, Exception):
            raise answer
        return list(answer)


def pods(*addresses: str) -> FakeDns:
    return FakeDns(imagerec_resnet50_pods=list(addresses))


def registry_for(dns: FakeDns, *urls: str, refresh_s: float = 10.0) -> Registry:
    return Registry({"resnet50": urls or (PODS,)}, new_session(2), resolver=dns, dns_refresh_s=refresh_s)


def urls(registry: Registry) -> list[str]:
    return [r.url for r in registry.replicas("resnet50")]


def test_a_name_resolving_to_three_addresses_becomes_three_replicas_that_keep_the_name_as_host() -> None:
    dns = pods("10.0.0.2", "10.0.0.1", "10.0.0.3")
    registry = registry_for(dns)
    registry.candidates("resnet50")
    assert dns.asked == [] and urls(registry) == [PODS]  # as given until the poller resolves it
    registry.resolve()
    assert urls(registry) == ["http://10.0.0.1:8502", "http://10.0.0.2:8502", "http://10.0.0.3:8502"]
    assert {r.host for r in registry.replicas("resnet50")} == {"imagerec-resnet50-pods:8502"}


def test_a_new_address_joins_at_the_next_refresh_and_a_vanished_one_leaves() -> None:
    dns = pods("10.0.0.1", "10.0.0.2", "10.0.0.3")
    registry = registry_for(dns)
    registry.resolve()
    before = {r.url: r for r in registry.replicas("resnet50")}
    before["http://10.0.0.1:8502"].ready = True
    dns.answers["imagerec_resnet50_pods"] = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]
    registry.resolve()
    assert "http://10.0.0.4:8502" in [r.url for r in registry.candidates("resnet50")]
    survivors = {r.url: r for r in registry.replicas("resnet50")}
    assert all(survivors[url] is replica for url, replica in before.items())  # health kept
    assert survivors["http://10.0.0.1:8502"].ready
    dns.answers["imagerec_resnet50_pods"] = ["10.0.0.2", "10.0.0.3", "10.0.0.4"]
    registry.resolve()
    assert "http://10.0.0.1:8502" not in urls(registry)
    assert all(r.url != "http://10.0.0.1:8502" for _ in range(4) for r in registry.candidates("resnet50"))


@pytest.mark.parametrize(
    "failure", [socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"), []]
)
def test_a_failed_lookup_keeps_the_last_known_replicas(failure: Exception | list[str]) -> None:
    dns = pods("10.0.0.1", "10.0.0.2")
    registry = registry_for(dns)
    registry.resolve()
    known = registry.replicas("resnet50")
    dns.answers["imagerec_resnet50_pods"] = failure
    registry.resolve()
    assert registry.replicas("resnet50") == known and len(known) == 2


def test_ip_literals_and_localhost_are_used_as_given() -> None:
    given = ("http://127.0.0.1:8501", "http://[::1]:8501", "http://localhost:8501")
    dns = FakeDns()
    registry = registry_for(dns, *given)
    registry.resolve()
    assert urls(registry) == list(given) and dns.asked == []
    assert all(r.host == "" for r in registry.replicas("resnet50"))


def test_ipv6_addresses_are_bracketed_and_a_missing_port_stays_missing() -> None:
    registry = registry_for(
        FakeDns(pods_v6=["fd00::7"], web=["10.1.0.9"]), "http://pods_v6:8502", "http://web"
    )
    registry.resolve()
    assert urls(registry) == ["http://[fd00::7]:8502", "http://10.1.0.9"]
    assert [r.host for r in registry.replicas("resnet50")] == ["pods_v6:8502", "web"]


def test_a_zero_refresh_period_never_resolves() -> None:
    dns = pods("10.0.0.1")
    registry = registry_for(dns, refresh_s=0)
    registry.resolve()
    assert dns.asked == [] and urls(registry) == [PODS]


@responses.activate
def test_probes_and_predictions_reach_each_address_with_the_name_as_host() -> None:
    registry = registry_for(pods("10.0.0.1"))
    registry.resolve()
    named = matchers.header_matcher({"Host": "imagerec-resnet50-pods:8502"})
    responses.get("http://10.0.0.1:8502/v1/model", json={"ready": True}, match=[named])
    call = responses.post("http://10.0.0.1:8502/v1/predict", json=reply(), match=[named])
    registry.refresh()
    assert registry.replicas("resnet50")[0].ready
    client = ModelClient(registry, new_session(2), connect_retries=0)
    assert client.predict("resnet50", [b"a"], top_k=1).results and call.call_count == 1


@responses.activate
def test_polling_resolves_once_at_start_then_probes_what_it_found() -> None:
    dns = pods("10.0.0.1")
    probe = responses.get("http://10.0.0.1:8502/v1/model", json={"ready": True})
    registry = registry_for(dns)
    registry.start_polling(60)
    try:
        assert dns.called.wait(5)
    finally:
        registry.stop()
    assert dns.asked == ["imagerec-resnet50-pods"]
    assert probe.call_count == 1 and registry.replicas("resnet50")[0].ready


@responses.activate
def test_the_listing_says_when_each_replica_was_last_probed() -> None:
    registry = Registry({"resnet50": ["http://r1:8502", "http://r2:8502"]}, new_session(2))
    assert registry.describe("resnet50")["replicas"][0]["checked_at"] is None  # never probed
    responses.get("http://r1:8502/v1/model", json={"ready": True})
    responses.get("http://r2:8502/v1/model", body=requests.ConnectionError("refused"))
    registry.refresh()
    for entry in registry.describe("resnet50")["replicas"]:
        checked = datetime.fromisoformat(entry["checked_at"])
        assert abs((datetime.now(UTC) - checked).total_seconds()) < 60
