"""The URL fetcher refuses private targets and misbehaving servers, and fetches real images."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from common.errors import ImageTooLarge, ServiceError, UnsupportedMediaType
from fleet.fetch import UrlFetcher, UrlFetchFailed, UrlFetchTimeout, UrlNotAllowed
from tests.http_fixtures import CAT, serve_images


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with serve_images() as url:
        yield url


@pytest.fixture
def fetcher() -> UrlFetcher:
    """An operator who allows loopback (where the test server lives), and nothing else private."""
    return UrlFetcher(
        timeout_s=2, max_bytes=1_000_000, max_redirects=3, allow_networks=("127.0.0.0/8",), allow_ports=()
    )


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/",
        "http://127.1/",
        "http://2130706433/",
        "http://0177.0.0.1/",
        "http://0x7f.0.0.1/",
        "http://localhost/",
        "http://[::1]/",
        "http://[::ffff:127.0.0.1]/",
        "http://0.0.0.0/",
        "http://[::]/",
        "http://10.0.0.1/",
        "http://172.16.0.1/",
        "http://192.168.1.1/",
        "http://169.254.169.254/latest/",
        "http://100.64.0.1/",
        "http://224.0.0.1/",
        "http://[fe80::1]/",
        "http://[fc00::1]/",
        "http://240.0.0.1/",
    ],
)
def test_private_and_special_addresses_are_refused_by_default(url: str) -> None:
    with pytest.raises(UrlNotAllowed):
        UrlFetcher().fetch(url)


@pytest.mark.parametrize(
    "address",
    [
        "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
        "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
        "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254 (cloud metadata)
        "64:ff9b:1:a00:0:100::",  # local-use NAT64 (/48) of 10.0.0.1
        "2002:a00:1::",  # 6to4 of 10.0.0.1
        "2002:a9fe:a9fe::1",  # 6to4 of 169.254.169.254
        "::a00:1",  # IPv4-compatible 10.0.0.1
        "::c0a8:101",  # IPv4-compatible 192.168.1.1
    ],
)
def test_ipv6_forms_that_carry_a_private_ipv4_address_are_refused(address: str) -> None:
    """Python calls each of these global: the IPv4 address inside is what the packets reach."""
    with pytest.raises(UrlNotAllowed, match="non-public"):
        UrlFetcher(resolver=lambda host, port: [address]).fetch("http://images.example/cat.jpg")


@pytest.mark.parametrize("address", ["64:ff9b::808:808", "2002:808:808::", "64:ff9b:1:808:8:800::"])
def test_ipv6_forms_of_a_public_ipv4_address_pass_the_address_check(address: str) -> None:
    fetcher = UrlFetcher(resolver=lambda host, port: [address])
    assert fetcher.is_allowed(ipaddress.ip_address(address))


def test_only_ports_80_and_443_are_fetched_by_default() -> None:
    for url in (
        "http://images.example:8080/a.jpg",
        "https://images.example:6379/",
        "http://images.example:22/",
    ):
        with pytest.raises(UrlNotAllowed, match="port"):
            UrlFetcher(resolver=lambda host, port: ["93.184.215.14"]).fetch(url)


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://example.com/a.jpg",
        "gopher://example.com/",
        "javascript:alert(1)",
        "data:image/png;base64,AAAA",
        "http:///nohost",
        "http://user:secret@example.com/a.jpg",
    ],
)
def test_other_schemes_and_credentials_are_refused(url: str) -> None:
    with pytest.raises(UrlNotAllowed):
        UrlFetcher().fetch(url)


def test_malformed_url_is_400() -> None:
    with pytest.raises(ServiceError) as info:
        UrlFetcher().fetch("http://example.com:99999/")
    assert info.value.status == 400


def test_allowed_fetch_returns_the_image(server: str, fetcher: UrlFetcher) -> None:
    assert fetcher.fetch(f"{server}/cat.jpg") == CAT


def test_redirects_are_followed_and_each_hop_rechecked(server: str, fetcher: UrlFetcher) -> None:
    assert fetcher.fetch(f"{server}/redirect?/cat.jpg") == CAT
    with pytest.raises(UrlNotAllowed):  # allowed server redirecting to the metadata service
        fetcher.fetch(f"{server}/redirect?http://169.254.169.254/latest/meta-data")
    with pytest.raises(UrlFetchFailed, match="redirects"):
        fetcher.fetch(f"{server}/loop")


@pytest.mark.parametrize(
    ("path", "error"),
    [
        ("/text", UnsupportedMediaType),
        ("/missing", UrlFetchFailed),
        ("/declared-huge", ImageTooLarge),
        ("/endless", ImageTooLarge),
    ],
)
def test_bad_responses_are_refused(server: str, fetcher: UrlFetcher, path: str, error: type) -> None:
    with pytest.raises(error):
        fetcher.fetch(server + path)


def test_a_length_in_superscript_digits_is_no_length(server: str, fetcher: UrlFetcher) -> None:
    """A hostile host's ``Content-Length: ¹²`` is read as absent (the body until close), not a 500."""
    assert fetcher.fetch(f"{server}/superscript-length") == CAT


def test_slow_drip_hits_the_total_deadline(server: str) -> None:
    fetcher = UrlFetcher(timeout_s=1, allow_networks=("127.0.0.0/8",), allow_ports=())
    started = time.monotonic()
    with pytest.raises(UrlFetchTimeout):
        fetcher.fetch(f"{server}/drip")
    assert time.monotonic() - started < 3


def test_unresolvable_host_is_400() -> None:
    with pytest.raises(UrlFetchFailed, match="resolve"):
        UrlFetcher().fetch("http://no-such-host.invalid/cat.jpg")


def loopback_fetcher(**options: Any) -> UrlFetcher:
    return UrlFetcher(allow_networks=("127.0.0.0/8",), allow_ports=(), **options)


def test_slow_urls_of_one_request_take_about_as_long_as_one(slow_server: str) -> None:
    started = time.monotonic()
    results = loopback_fetcher(max_parallel=8).fetch_all([f"{slow_server}/slow?0.5"] * 8)
    assert results == [CAT] * 8
    assert time.monotonic() - started < 1.5  # one after another: 4 s


def test_no_more_urls_than_the_pool_size_are_fetched_at_once(slow_server: str) -> None:
    started = time.monotonic()
    assert loopback_fetcher(max_parallel=2).fetch_all([f"{slow_server}/slow?0.3"] * 4) == [CAT] * 4
    assert time.monotonic() - started >= 0.6  # two rounds of two


def test_no_more_than_max_per_host_fetches_reach_one_host_at_once(slow_server: str) -> None:
    """Eight threads, but two at a time for one host: a slow host cannot hold them all."""
    port = slow_server.rsplit(":", 1)[1]
    fetcher = loopback_fetcher(max_parallel=8, max_per_host=2, resolver=lambda host, p: ["127.0.0.1"])
    started = time.monotonic()
    assert fetcher.fetch_all([f"http://one.example:{port}/slow?0.3"] * 4) == [CAT] * 4
    assert time.monotonic() - started >= 0.6  # two rounds of two
    started = time.monotonic()
    urls = [f"http://{host}.example:{port}/slow?0.3" for host in ("one", "two", "one", "two")]
    assert fetcher.fetch_all(urls) == [CAT] * 4
    assert time.monotonic() - started < 0.55  # two hosts, two each: one round


def test_the_bytes_fetched_for_one_request_are_capped_in_all(server: str) -> None:
    fetcher = loopback_fetcher(max_parallel=1, max_total_bytes=len(CAT) * 3 // 2)
    first, second = fetcher.fetch_all([f"{server}/cat.jpg", f"{server}/cat.jpg"])
    assert first == CAT
    assert isinstance(second, ImageTooLarge) and "in all" in second.message


def test_the_fetch_timeout_bounds_all_of_a_request_not_each_url(slow_server: str) -> None:
    """One at a time, 1.3 s in all: the third URL gets what the first two left of it."""
    urls = [f"{slow_server}/slow?0.5", f"{slow_server}/slow?0.5", f"{slow_server}/slow?2"]
    started = time.monotonic()
    results = loopback_fetcher(max_parallel=1, timeout_s=1.3).fetch_all(urls)
    assert results[:2] == [CAT, CAT] and isinstance(results[2], UrlFetchTimeout)
    assert time.monotonic() - started < 1.9  # a fresh 1.3 s for the third: 2.3 s


def test_a_url_that_misses_the_deadline_fails_alone_and_the_order_is_kept(slow_server: str) -> None:
    urls = [
        f"{slow_server}/slow?0",
        f"{slow_server}/slow?3",
        f"{slow_server}/missing",
        f"{slow_server}/slow?0.1",
    ]
    started = time.monotonic()
    results = loopback_fetcher().fetch_all(urls, deadline=started + 0.6)
    assert time.monotonic() - started < 1.2
    assert results[0] == CAT and results[3] == CAT
    assert isinstance(results[1], UrlFetchTimeout) and results[1].status == 504
    assert isinstance(results[2], UrlFetchFailed)


@pytest.fixture
def hanging_resolver() -> Iterator[Callable[[str, int], list[str]]]:
    """A resolver that never answers (until the test ends), like a name server that drops queries."""
    released = threading.Event()

    def resolve(host: str, port: int) -> list[str]:
        released.wait(30)
        return ["127.0.0.1"]

    yield resolve
    released.set()


def test_a_resolver_that_hangs_is_cut_off_at_the_fetch_timeout(
    hanging_resolver: Callable[[str, int], list[str]],
) -> None:
    started = time.monotonic()
    with pytest.raises(UrlFetchTimeout, match="resolv"):
        UrlFetcher(timeout_s=0.3, resolver=hanging_resolver).fetch("http://images.example/cat.jpg")
    assert time.monotonic() - started < 1


def test_a_resolver_that_hangs_is_cut_off_at_the_clients_deadline(
    hanging_resolver: Callable[[str, int], list[str]],
) -> None:
    fetcher = UrlFetcher(timeout_s=10, resolver=hanging_resolver)
    started = time.monotonic()
    results = fetcher.fetch_all([f"http://host{i}.example/cat.jpg" for i in range(3)], deadline=started + 0.3)
    assert all(isinstance(r, UrlFetchTimeout) for r in results)
    assert time.monotonic() - started < 1


def test_every_address_a_name_resolves_to_is_checked() -> None:
    def public_then_private(host: str, port: int) -> list[str]:
        return ["93.184.215.14", "10.0.0.7"]  # one public address does not excuse a private one

    with pytest.raises(UrlNotAllowed, match="10.0.0.7"):
        UrlFetcher(resolver=public_then_private).fetch("http://images.example/cat.jpg")


def test_the_fetch_connects_to_the_address_the_resolver_found(slow_server: str) -> None:
    port = int(slow_server.rsplit(":", 1)[1])
    asked: list[tuple[str, int]] = []

    def resolve(host: str, port: int) -> list[str]:
        asked.append((host, port))
        return ["127.0.0.1"]

    fetcher = loopback_fetcher(resolver=resolve)
    assert fetcher.fetch(f"http://images.example:{port}/slow?0") == CAT
    assert asked == [("images.example", port)]


def test_a_failed_lookup_is_a_400() -> None:
    def fail(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    with pytest.raises(UrlFetchFailed, match="resolve"):
        UrlFetcher(resolver=fail).fetch("http://images.example/cat.jpg")
