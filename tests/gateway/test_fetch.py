"""The URL fetcher refuses private targets and misbehaving servers, and fetches real images."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from common.errors import ImageTooLarge, ServiceError, UnsupportedMediaType
from gateway.fetch import UrlFetcher, UrlFetchFailed, UrlFetchTimeout, UrlNotAllowed
from tests.conftest import photo

CAT = photo("chelsea.jpg")


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:  # keep test output clean
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if "Transfer-Encoding" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path, _, query = self.path.partition("?")
        if path == "/cat.jpg":
            assert self.headers["Host"].startswith("127.0.0.1")
            self._send(200, CAT, {"Content-Type": "image/jpeg"})
        elif path == "/redirect":
            self._send(302, headers={"Location": query})
        elif path.startswith("/loop"):
            self._send(302, headers={"Location": "/loop"})
        elif path == "/text":
            self._send(200, b"<html>hi</html>", {"Content-Type": "text/html"})
        elif path == "/missing":
            self._send(404, b"nope", {"Content-Type": "text/plain"})
        elif path == "/declared-huge":
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(10**9))
            self.end_headers()
        elif path == "/endless":  # chunked, no Content-Length: the cap must hold while streaming
            self._send(200, headers={"Content-Type": "image/jpeg", "Transfer-Encoding": "chunked"})
            chunk = b"\xff" * 65536
            try:
                for _ in range(200):
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except (BrokenPipeError, ConnectionResetError):
                pass
        elif path == "/drip":  # a byte every 0.2 s: each read is quick, the whole is too slow
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", "1000")
            self.end_headers()
            try:
                for _ in range(1000):
                    self.wfile.write(b"\xff")
                    self.wfile.flush()
                    time.sleep(0.2)
            except (BrokenPipeError, ConnectionResetError):
                pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


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
