"""Model replicas and their health: who may be called, in what order.

One thread (``start_polling``) keeps the picture fresh: it resolves replica host names (``dns.py``)
at start and every ``dns_refresh_s``, and probes every replica's ``/v1/model``. Requests only read
the picture (and report connect failures with ``mark_down``): nothing here runs inside a request.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests

from common.errors import UnknownModel
from gateway import dns
from gateway.replica import Replica

log = logging.getLogger(__name__)
DEFAULT_BODY_LIMIT = 16 * 1024 * 1024  # a model service's default max_body_bytes


class Registry:
    """Replicas per model; a poller keeps ``ready`` fresh, callers report failures in between."""

    def __init__(
        self,
        replicas: Mapping[str, Sequence[str]],
        session: requests.Session,
        probe_timeout_s: float = 1.0,
        *,
        resolver: dns.Resolver = dns.system_resolver,
        dns_refresh_s: float = 0.0,
    ) -> None:
        """Replicas as configured; host names are resolved only by ``resolve`` (the poller's job).

        Args:
            replicas: base URLs per model.
            session: for the probes.
            probe_timeout_s: how long a probe waits for an answer.
            resolver: looks up host names (tests hand in a fake).
            dns_refresh_s: seconds between lookups while polling; 0 uses the URLs as given.
        """
        self._sources = {name: tuple(urls) for name, urls in replicas.items()}
        self._replicas = {
            name: [Replica(url, name, source=url) for url in urls] for name, urls in replicas.items()
        }
        self.on_weights_change: Callable[[str], object] | None = None  # e.g. the response cache's drop
        self._session = session
        self._probe_timeout_s = probe_timeout_s
        self._resolver = resolver
        self._dns_refresh_s = dns_refresh_s
        self._turns = {name: itertools.count() for name in replicas}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    @property
    def models(self) -> list[str]:
        return list(self._replicas)

    def replicas(self, model: str) -> list[Replica]:
        try:
            return self._replicas[model]
        except KeyError:
            raise UnknownModel(
                f"unknown model {model!r}; available: {', '.join(self._replicas)}, ensemble"
            ) from None

    def candidates(self, model: str) -> list[Replica]:
        """Ready replicas in round-robin order, then the rest (their state may be stale)."""
        replicas = self.replicas(model)
        if not replicas:
            return []
        with self._lock:
            turn = next(self._turns[model])
        rotated = replicas[turn % len(replicas) :] + replicas[: turn % len(replicas)]
        return [r for r in rotated if r.ready] + [r for r in rotated if not r.ready]

    def mark_down(self, replica: Replica) -> None:
        replica.ready = False

    def resolve(self) -> None:
        """Look every named replica URL up anew: each address one replica, health kept by address.

        New addresses join (not ready until probed, so last in ``candidates``), vanished ones
        leave; a failed lookup keeps the replicas that URL had.
        """
        if self._dns_refresh_s <= 0:
            return
        for model, sources in self._sources.items():
            current = self._replicas[model]
            known = {r.url: r for r in current}
            fresh: dict[str, Replica] = {}
            for url in sources:
                targets = dns.expand(url, self._resolver)
                if targets is None:
                    fresh.update((r.url, r) for r in current if r.source == url)
                    continue
                for target in targets:
                    replica = known.get(target.url) or Replica(
                        target.url, model, host=target.host, source=url
                    )
                    fresh.setdefault(target.url, replica)
            if fresh.keys() != known.keys():
                log.info("%s replicas: %s (were %s)", model, ", ".join(fresh), ", ".join(known))
            self._replicas[model] = list(fresh.values())  # one assignment: readers see old or new

    def _probe(self, replica: Replica) -> None:
        if replica.probe(self._session, self._probe_timeout_s) and self.on_weights_change:
            self.on_weights_change(replica.model)

    def refresh(self) -> None:
        """Probe every replica now, in parallel."""
        everyone = [r for replicas in list(self._replicas.values()) for r in replicas]
        with ThreadPoolExecutor(max_workers=min(16, len(everyone)) or 1) as pool:
            list(pool.map(self._probe, everyone))

    def start_polling(self, interval_s: float) -> None:
        """Resolve names now and every ``dns_refresh_s`` (at most as often), probe every ``interval_s``."""

        def loop() -> None:
            next_lookup = 0.0
            while not self._stop.is_set():
                if self._dns_refresh_s > 0 and time.monotonic() >= next_lookup:
                    self.resolve()
                    next_lookup = time.monotonic() + self._dns_refresh_s
                self.refresh()
                self._stop.wait(interval_s)

        self._poller = threading.Thread(target=loop, name="replica-health", daemon=True)
        self._poller.start()

    def stop(self) -> None:
        """Stop polling, and wait for a round under way to finish."""
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=10)

    def body_limit(self, model: str) -> int:
        """The largest request body every replica of ``model`` accepts (what it reports, else 16 MiB)."""
        limits = [r.metadata.get("max_body_bytes") for r in self.replicas(model)]
        return min((n for n in limits if isinstance(n, int) and n > 0), default=DEFAULT_BODY_LIMIT)

    def metadata(self, model: str) -> dict[str, Any]:
        """What a ready replica of ``model`` says about itself (empty when none is ready)."""
        return next((r.metadata for r in self.replicas(model) if r.ready), {})

    def describe(self, model: str) -> dict[str, Any]:
        """The ``/v1/models`` entry for one model."""
        replicas = self.replicas(model)
        first = self.metadata(model)
        return {
            "name": model,
            "status": "ready" if first else "unavailable",
            **{
                key: first.get(key)
                for key in (
                    "input_size",
                    "preprocessing",
                    "weights",
                    "weights_hash",
                    "backend",
                    "precision",
                    "version",
                    "classes",
                )
            },
            "replicas": [r.describe() for r in replicas],
        }
