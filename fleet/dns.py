"""Replicas from DNS: a replica URL whose host is a name stands for every address the name has now.

A headless Kubernetes Service (``http://imagerec-resnet50-pods:8502``) or a Compose service scaled
with ``--scale`` answers its name with one address per pod or container. Each address becomes its own
replica, called as ``http://<address>:<port>`` with the name kept in the ``Host`` header. IP literals
and ``localhost`` are used as given. A lookup that fails or finds nothing says nothing about the
replicas: the caller keeps the ones it knew.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger(__name__)

Resolver = Callable[[str], list[str]]
"""A host name -> its addresses (IPv4 or IPv6 literals); raises ``OSError`` when the lookup fails."""


@dataclass(frozen=True)
class Target:
    """Where one replica is called: its URL, and the ``Host`` header to send (empty: the URL's own)."""

    url: str
    host: str = ""


def system_resolver(name: str) -> list[str]:
    """Every address the system's resolver has for ``name`` (TCP), deduplicated and sorted."""
    return sorted({str(info[4][0]) for info in socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)})


def named_host(url: str) -> str | None:
    """The DNS name in ``url``; None when its host is an IP literal or ``localhost``."""
    host = urlsplit(url).hostname or ""
    if not host or host == "localhost":
        return None
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host
    return None


def expand(url: str, resolve: Resolver) -> list[Target] | None:
    """The replicas ``url`` stands for now; None when its name could not be resolved to any address.

    Args:
        url: a configured replica base URL, e.g. ``http://imagerec-resnet50-pods:8502``.
        resolve: looks a host name up.

    Returns:
        ``[Target(url)]`` for a literal host; one target per address (sorted) for a name, each with
        the same scheme, port and path and the name (with its port) as ``Host``; None on failure.
    """
    name = named_host(url)
    if name is None:
        return [Target(url)]
    try:
        addresses = resolve(name)
    except (OSError, UnicodeError) as exc:
        log.warning("cannot resolve %s (%s); keeping its last known replicas", name, exc)
        return None
    if not addresses:
        log.warning("%s resolved to no address; keeping its last known replicas", name)
        return None
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return [
        Target(urlunsplit(parts._replace(netloc=f"[{a}]{port}" if ":" in a else f"{a}{port}")), name + port)
        for a in sorted(set(addresses))
    ]
