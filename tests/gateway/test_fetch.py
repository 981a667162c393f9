"""The URL fetcher refuses private targets and misbehaving servers, and fetches real images."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from common.errors import ImageTooLarge, ServiceError, UnsupportedMediaType
from gateway.fetch import UrlFetcher, UrlFetchFailed, UrlFetchTimeout, UrlNotAllowed
from tests.http_fixtures import CAT, serve_images


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with serve_images() as url:
        yield url


@pytest.fixture
def fetcher() -> UrlFetcher:
    """An operator who allows loopback (where the test server lives), and nothing else private."""
    return UrlFetcher(timeout_s=2, max_bytes=1_000_000, max_redirects=3, allow_networks=("127.0.0.0/8",))


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


def test_slow_drip_hits_the_total_deadline(server: str) -> None:
    fetcher = UrlFetcher(timeout_s=1, allow_networks=("127.0.0.0/8",))
    started = time.monotonic()
    with pytest.raises(UrlFetchTimeout):
        fetcher.fetch(f"{server}/drip")
    assert time.monotonic() - started < 3


def test_unresolvable_host_is_400() -> None:
    with pytest.raises(UrlFetchFailed, match="resolve"):
        UrlFetcher().fetch("http://no-such-host.invalid/cat.jpg")
