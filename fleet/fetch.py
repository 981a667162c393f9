"""Fetch image URLs for a client without letting the client reach our private network (SSRF).

Every hop: http/https only, on an allowed port (80 and 443 by default); resolve the host and refuse
it unless *every* address is public (or in the operator's allow-list) - an IPv6 address that carries
an IPv4 one (IPv4-mapped, IPv4-compatible, NAT64 ``64:ff9b::/96`` and ``64:ff9b:1::/48``, 6to4
``2002::/16``) is judged by the IPv4 address it reaches; connect to the address that was checked,
never resolving again (no DNS rebinding), with Host/SNI/certificate still bound to the name;
redirects re-checked and capped; bytes capped while streaming.

Bounds: at most ``max_per_host`` fetches from one host at once in a process (a slow host cannot
take every fetch thread), and at most ``max_total_bytes`` fetched for one request in all.

Time: the URLs of one request are fetched together, at most ``max_parallel`` at once, and all by one
deadline: the fetch timeout from when the request asked, or the client's deadline if sooner. Name
resolution counts: ``getaddrinfo`` cannot be cancelled, so it runs on a small pool of its own and
the fetch stops waiting for it at the deadline. A URL still unfinished then fails alone (504).
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from urllib.parse import urljoin, urlsplit

import certifi
import urllib3

from common.errors import BadRequest, ImageTooLarge, ServiceError, UnsupportedMediaType
from common.wire import whole_number
from fleet.settings import FleetSettings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
REDIRECTS = (301, 302, 303, 307, 308)
NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: the IPv4 address is the last 32 bits
NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215: bits 48-63 and 72-87 (RFC 6052 /48)
COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated IPv4-compatible ::a.b.c.d
Resolver = Callable[[str, int], Sequence[str]]
"""A host and port -> its addresses (IP literals); raises ``OSError`` when the lookup fails."""


def system_resolver(host: str, port: int) -> list[str]:
    """The addresses the system's resolver (``getaddrinfo``) has for ``host``, for TCP."""
    return [str(info[4][0]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


def embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries, by every form that routes to one; None if none."""
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    value = int(address)
    if address in NAT64 or address in COMPATIBLE:
        return ipaddress.IPv4Address(value & 0xFFFFFFFF)
    if address in NAT64_LOCAL:
        return ipaddress.IPv4Address(((value >> 64) & 0xFFFF) << 16 | (value >> 40) & 0xFFFF)
    return None


def _host(url: str) -> str:
    """The host a fetch's slot is counted on (malformed URLs are refused later, by ``_request``)."""
    try:
        return (urlsplit(url).hostname or "").lower()
    except ValueError:
        return ""


class UrlNotAllowed(ServiceError):
    status, code = 400, "url_not_allowed"


class UrlFetchFailed(ServiceError):
    status, code = 400, "url_fetch_failed"


class UrlFetchTimeout(ServiceError):
    status, code = 504, "url_fetch_timeout"


def _late() -> UrlFetchTimeout:
    return UrlFetchTimeout("fetching the image did not finish by the deadline")


class _Budget:
    """Bytes one request may still fetch, shared by its parallel fetches."""

    def __init__(self, total: int) -> None:
        self.total, self.left = total, total
        self._lock = threading.Lock()

    def take(self, size: int) -> None:
        with self._lock:
            self.left -= size
            if self.left < 0:
                raise ImageTooLarge(f"the images fetched for this request exceed {self.total} bytes in all")


class _HostSlots:
    """At most ``per_host`` fetches from one host at once; a fetch waits for a slot until its deadline."""

    def __init__(self, per_host: int) -> None:
        self.per_host = per_host
        self.busy: dict[str, int] = {}  # only hosts being fetched from: it does not grow with history
        self._changed = threading.Condition()

    @contextmanager
    def hold(self, host: str, deadline: float) -> Iterator[None]:
        with self._changed:
            while self.busy.get(host, 0) >= self.per_host:
                left = deadline - time.monotonic()
                if left <= 0 or not self._changed.wait(left):
                    raise UrlFetchTimeout(
                        f"{host} already has {self.per_host} fetches in flight (GATEWAY_FETCH_MAX_PER_HOST) "
                        "and none ended by the deadline"
                    )
            self.busy[host] = self.busy.get(host, 0) + 1
        try:
            yield
        finally:
            with self._changed:
                self.busy[host] -= 1
                if not self.busy[host]:
                    del self.busy[host]
                self._changed.notify_all()


class UrlFetcher:
    def __init__(
        self,
        *,
        timeout_s: float = 10.0,
        max_bytes: int = 10 * 1024 * 1024,
        max_redirects: int = 3,
        allow_networks: tuple[str, ...] = (),
        allow_ports: tuple[int, ...] = (80, 443),
        max_parallel: int = 8,
        max_per_host: int = 4,
        max_total_bytes: int = 64 * 1024 * 1024,
        resolver: Resolver = system_resolver,
        resolver_threads: int = 16,
    ) -> None:
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self.max_redirects = max_redirects
        self.allow_networks = tuple(ipaddress.ip_network(n, strict=False) for n in allow_networks)
        self.allow_ports = frozenset(allow_ports)  # empty: any port
        self.max_parallel = max_parallel
        self.max_total_bytes = max_total_bytes
        self._hosts = _HostSlots(max_per_host)
        self.resolver = resolver
        # NOTE: bounded and shared by every request of the process: lookups stuck on a name server
        # that never answers (any client can name one) tie up these threads, not unbounded new ones.
        self._lookups = ThreadPoolExecutor(resolver_threads, thread_name_prefix="url-resolve")

    @classmethod
    def from_settings(cls, settings: FleetSettings) -> UrlFetcher:
        """The fetcher the gateway and the job workers use: every bound from ``GATEWAY_FETCH_*``."""
        return cls(
            timeout_s=settings.fetch_timeout_s,
            max_bytes=settings.fetch_max_bytes,
            max_redirects=settings.fetch_max_redirects,
            allow_networks=settings.fetch_allow_networks,
            allow_ports=settings.fetch_ports,
            max_per_host=settings.fetch_max_per_host,
            max_total_bytes=settings.fetch_max_total_bytes,
            max_parallel=settings.fetch_threads,
        )

    def is_allowed(self, address: IPAddress) -> bool:
        """Public unicast addresses, plus whatever the operator allowed explicitly; an address that
        carries an IPv4 one is judged by it."""
        inner = embedded_ipv4(address)
        if any(a in network for a in (address, inner) if a is not None for network in self.allow_networks):
            return True
        reached = inner or address
        return reached.is_global and not reached.is_multicast

    def fetch_all(self, urls: Sequence[str], deadline: float | None = None) -> list[bytes | ServiceError]:
        """Fetch ``urls`` in parallel, each answering its image bytes or its own error, in order.

        Args:
            urls: the image URLs of one request.
            deadline: the client's deadline (``time.monotonic()``), if it gave one; the fetch
                timeout from now applies when it is later or absent.

        Returns:
            One entry per URL: its bytes, or the ``ServiceError`` that says why not (a
            ``UrlFetchTimeout`` for one still unfinished at the deadline).
        """
        if not urls:
            return []
        deadline = self._deadline(deadline)
        budget = _Budget(self.max_total_bytes)
        pool = ThreadPoolExecutor(min(len(urls), self.max_parallel), thread_name_prefix="url-fetch")
        try:
            futures = [pool.submit(self._outcome, url, deadline, budget) for url in urls]
            wait(futures, timeout=max(0.0, deadline - time.monotonic()))
        finally:  # a straggler ends at its own deadline-bound timeouts; nobody waits for it
            pool.shutdown(wait=False, cancel_futures=True)
        return [f.result() if f.done() and not f.cancelled() else _late() for f in futures]

    def fetch(self, url: str, deadline: float | None = None, budget: _Budget | None = None) -> bytes:
        """The image bytes at ``url``, or a ``ServiceError`` saying why not (``deadline`` as for
        :meth:`fetch_all`; ``budget``: the request's bytes, shared with its other fetches)."""
        deadline = self._deadline(deadline)
        budget = budget or _Budget(self.max_total_bytes)
        with self._hosts.hold(_host(url), deadline):
            for _hop in range(self.max_redirects + 1):
                response = self._request(url, deadline)
                try:
                    if response.status in REDIRECTS and response.headers.get("Location"):
                        url = urljoin(url, response.headers["Location"])
                        continue
                    return self._read_image(response, deadline, budget)
                finally:  # each hop has a connection pool of its own: nothing is kept for later
                    response.close()
        raise UrlFetchFailed(f"more than {self.max_redirects} redirects")

    def _deadline(self, client_deadline: float | None) -> float:
        own = time.monotonic() + self.timeout_s
        return own if client_deadline is None else min(own, client_deadline)

    def _outcome(self, url: str, deadline: float, budget: _Budget) -> bytes | ServiceError:
        try:
            return self.fetch(url, deadline, budget)
        except ServiceError as exc:
            return exc

    def _resolve(self, host: str, port: int, deadline: float) -> IPAddress:
        lookup = self._lookups.submit(self.resolver, host, port)
        try:
            found = lookup.result(timeout=max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            lookup.cancel()  # frees its place if it had not started; a running lookup cannot stop
            raise UrlFetchTimeout(f"resolving {host!r} did not finish by the deadline") from None
        except (OSError, UnicodeError):
            raise UrlFetchFailed(f"cannot resolve host {host!r}") from None
        addresses = [ipaddress.ip_address(str(a).split("%")[0]) for a in found]
        refused = [str(a) for a in addresses if not self.is_allowed(a)]
        if not addresses or refused:
            raise UrlNotAllowed(f"{host!r} resolves to a non-public address ({', '.join(refused)})")
        return addresses[0]

    def post(self, url: str, body: bytes, headers: dict[str, str], timeout_s: float) -> int:
        """POST ``body`` to ``url`` by the same address rules (no redirects followed); returns the
        status. Raises ``ServiceError`` when the URL is not allowed or cannot be reached."""
        response = self._request(url, time.monotonic() + timeout_s, "POST", body, headers)
        try:
            return response.status
        finally:
            response.close()

    def _request(
        self,
        url: str,
        deadline: float,
        method: str = "GET",
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> urllib3.BaseHTTPResponse:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise BadRequest(f"malformed URL {url[:200]!r}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UrlNotAllowed("only http:// and https:// URLs with a host can be fetched")
        if parts.username or parts.password:
            raise UrlNotAllowed("URLs with credentials are not fetched")
        host = parts.hostname
        port = port or (443 if parts.scheme == "https" else 80)
        if self.allow_ports and port not in self.allow_ports:
            allowed = ", ".join(str(p) for p in sorted(self.allow_ports))
            raise UrlNotAllowed(f"port {port} is not fetched (allowed: {allowed}; GATEWAY_FETCH_ALLOW_PORTS)")
        address = str(self._resolve(host, port, deadline))
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _late()
        timeout = urllib3.Timeout(connect=min(remaining, 5.0), read=remaining)
        pool: urllib3.HTTPConnectionPool
        if parts.scheme == "https":
            pool = urllib3.HTTPSConnectionPool(
                address,
                port,
                server_hostname=host,
                assert_hostname=host,
                cert_reqs="CERT_REQUIRED",
                ca_certs=certifi.where(),
                maxsize=1,
                retries=False,
            )
        else:
            pool = urllib3.HTTPConnectionPool(address, port, maxsize=1, retries=False)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host_header = parts.netloc.rsplit("@", 1)[-1]
        try:
            return pool.urlopen(
                method,
                path,
                body=body,
                headers={
                    "Host": host_header,
                    "Accept": "image/*",
                    "User-Agent": "imagerec-gateway/1",
                    **(headers or {}),
                },
                redirect=False,
                retries=False,
                preload_content=False,
                timeout=timeout,
            )
        except urllib3.exceptions.TimeoutError:
            raise UrlFetchTimeout(f"{host} did not answer by the deadline") from None
        except urllib3.exceptions.HTTPError as exc:
            raise UrlFetchFailed(f"cannot fetch from {host}: {type(exc).__name__}") from None

    def _read_image(self, response: urllib3.BaseHTTPResponse, deadline: float, budget: _Budget) -> bytes:
        if response.status != 200:
            raise UrlFetchFailed(f"the image URL answered HTTP {response.status}")
        content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if not content_type.startswith("image/"):
            raise UnsupportedMediaType(f"the URL's content type is {content_type or 'missing'}, not image/*")
        declared = whole_number(response.headers.get("Content-Length", ""))
        if declared is not None and declared > self.max_bytes:
            raise ImageTooLarge(f"the image at the URL is {declared} bytes; the limit is {self.max_bytes}")
        chunks, total = [], 0
        try:
            while chunk := response.read1(64 * 1024):
                total += len(chunk)
                if total > self.max_bytes:
                    raise ImageTooLarge(f"the image at the URL exceeds {self.max_bytes} bytes")
                budget.take(len(chunk))
                if time.monotonic() > deadline:
                    raise _late()
                chunks.append(chunk)
        except urllib3.exceptions.TimeoutError:
            raise _late() from None
        except urllib3.exceptions.HTTPError as exc:
            raise UrlFetchFailed(f"the image download failed: {type(exc).__name__}") from None
        return b"".join(chunks)
