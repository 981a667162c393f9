"""A small HTTP server on loopback that serves images and misbehaves on purpose."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests

from tests.helpers import photo

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
        elif path == "/superscript-length":  # '¹²' is digits to str.isdigit, not to HTTP
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", "¹²")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(CAT)
            self.close_connection = True
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


@contextmanager
def serve_images() -> Iterator[str]:
    """Serve :class:`Handler` on a free loopback port; yields its base URL."""
    with serve(Handler) as url:
        yield url


@contextmanager
def serve(
    handler: type[BaseHTTPRequestHandler], server: type[ThreadingHTTPServer] = ThreadingHTTPServer
) -> Iterator[str]:
    """Serve ``handler`` with ``server`` on a free loopback port, in a thread; yields its base URL."""
    httpd = server(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@contextmanager
def silent_host() -> Iterator[tuple[str, list[socket.socket]]]:
    """A loopback host that accepts connections and never answers: its base URL, and the
    connections it took (closed on the way out, so fetches still waiting fail at once)."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
    taken: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                taken.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", taken
    finally:
        stop.set()
        thread.join()
        for connection in taken:
            connection.close()
        listener.close()


def from_address(source: str) -> requests.Session:
    """A client with an address of its own: ``source`` may be any 127.x.y.z, all of it loopback."""
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter()
    adapter.init_poolmanager(1, 1, source_address=(source, 0))
    session.mount("http://", adapter)
    return session
