"""Fetch an image URL for a client without letting the client reach our private network (SSRF).

Every hop: http/https only; resolve the host and refuse it unless *every* address is public (or in
the operator's allow-list); connect to the address that was checked, never resolving again (no DNS
rebinding), with Host/SNI/certificate still bound to the name; redirects re-checked and capped;
bytes capped while streaming; one deadline for the whole fetch.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from urllib.parse import urljoin, urlsplit

import certifi
import urllib3

from common.errors import BadRequest, ImageTooLarge, ServiceError, UnsupportedMediaType

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
REDIRECTS = (301, 302, 303, 307, 308)


class UrlNotAllowed(ServiceError):
    status, code = 400, "url_not_allowed"


class UrlFetchFailed(ServiceError):
    status, code = 400, "url_fetch_failed"


class UrlFetchTimeout(ServiceError):
    status, code = 504, "url_fetch_timeout"


class UrlFetcher:
    def __init__(
        self,
        *,
        timeout_s: float = 10.0,
        max_bytes: int = 10 * 1024 * 1024,
        max_redirects: int = 3,
        allow_networks: tuple[str, ...] = (),
    ) -> None:
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self.max_redirects = max_redirects
        self.allow_networks = tuple(ipaddress.ip_network(n, strict=False) for n in allow_networks)

    def is_allowed(self, address: IPAddress) -> bool:
        """Public unicast addresses, plus whatever the operator allowed explicitly."""
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        if any(address in network for network in self.allow_networks):
            return True
        return address.is_global and not address.is_multicast

    def _resolve(self, host: str, port: int) -> IPAddress:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError):
            raise UrlFetchFailed(f"cannot resolve host {host!r}") from None
        addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
        refused = [str(a) for a in addresses if not self.is_allowed(a)]
        if not addresses or refused:
            raise UrlNotAllowed(f"{host!r} resolves to a non-public address ({', '.join(refused)})")
        return addresses[0]

    def fetch(self, url: str) -> bytes:
        """The image bytes at ``url``, or a ``ServiceError`` saying why not."""
        deadline = time.monotonic() + self.timeout_s
        for _hop in range(self.max_redirects + 1):
            response = self._request(url, deadline)
            try:
                if response.status in REDIRECTS and response.headers.get("Location"):
                    url = urljoin(url, response.headers["Location"])
                    continue
                return self._read_image(response, deadline)
            finally:
                response.release_conn()
        raise UrlFetchFailed(f"more than {self.max_redirects} redirects")

    def _request(self, url: str, deadline: float) -> urllib3.BaseHTTPResponse:
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
        address = str(self._resolve(host, port))
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise UrlFetchTimeout(f"fetching the image took longer than {self.timeout_s:g}s")
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
                "GET",
                path,
                headers={"Host": host_header, "Accept": "image/*", "User-Agent": "imagerec-gateway/1"},
                redirect=False,
                retries=False,
                preload_content=False,
                timeout=timeout,
            )
        except urllib3.exceptions.TimeoutError:
            raise UrlFetchTimeout(f"{host} did not answer within {self.timeout_s:g}s") from None
        except urllib3.exceptions.HTTPError as exc:
            raise UrlFetchFailed(f"cannot fetch from {host}: {type(exc).__name__}") from None

    def _read_image(self, response: urllib3.BaseHTTPResponse, deadline: float) -> bytes:
        if response.status != 200:
            raise UrlFetchFailed(f"the image URL answered HTTP {response.status}")
        content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if not content_type.startswith("image/"):
            raise UnsupportedMediaType(f"the URL's content type is {content_type or 'missing'}, not image/*")
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise ImageTooLarge(f"the image at the URL is {declared} bytes; the limit is {self.max_bytes}")
        chunks, total = [], 0
        try:
            while chunk := response.read1(64 * 1024):
                total += len(chunk)
                if total > self.max_bytes:
                    raise ImageTooLarge(f"the image at the URL exceeds {self.max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise UrlFetchTimeout(f"fetching the image took longer than {self.timeout_s:g}s")
                chunks.append(chunk)
        except urllib3.exceptions.TimeoutError:
            raise UrlFetchTimeout(f"fetching the image took longer than {self.timeout_s:g}s") from None
        except urllib3.exceptions.HTTPError as exc:
            raise UrlFetchFailed(f"the image download failed: {type(exc).__name__}") from None
        return b"".join(chunks)
