"""The loopback image server of ``tests/http_fixtures.py``, plus ``/slow?<seconds>``."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import ThreadingHTTPServer

from tests.http_fixtures import CAT, Handler, serve


class SlowHandler(Handler):
    """:class:`Handler`, plus ``/slow?<seconds>``: the cat after that long, whatever the Host."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path, _, query = self.path.partition("?")
        if path != "/slow":
            return super().do_GET()
        time.sleep(float(query))
        try:
            self._send(200, CAT, {"Content-Type": "image/jpeg"})
        except (BrokenPipeError, ConnectionResetError):  # the fetcher gave up first, as it should
            pass


class _Server(ThreadingHTTPServer):
    # NOTE: socketserver's default backlog is 5; more simultaneous connections than that have their
    # SYN dropped and retried a second later, which would time the server, not the fetcher.
    request_queue_size = 64


@contextmanager
def serve_slow_images() -> Iterator[str]:
    """Serve :class:`SlowHandler` on a free loopback port; yields its base URL."""
    with serve(SlowHandler, _Server) as url:
        yield url
