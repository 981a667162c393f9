"""Model replicas and their health: who may be called, in what order."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import requests

from common.errors import UnknownModel

log = logging.getLogger(__name__)
MISSED_PROBES_DOWN = 3  # consecutive probe time-outs before a replica counts as down


@dataclass
class Replica:
    url: str
    model: str = ""
    ready: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)
    checked_at: float = 0.0
    missed_probes: int = 0


class Registry:
    """Replicas per model; a poller keeps ``ready`` fresh, callers report failures in between."""

    def __init__(
        self, replicas: Mapping[str, Sequence[str]], session: requests.Session, probe_timeout_s: float = 1.0
    ) -> None:
        self._replicas = {name: [Replica(url, name) for url in urls] for name, urls in replicas.items()}
        self.on_weights_change: Callable[[str], object] | None = None  # e.g. the response cache's drop
        self._session = session
        self._probe_timeout_s = probe_timeout_s
        self._turns = {name: itertools.count() for name in replicas}
        self._lock = threading.Lock()
        self._stop = threading.Event()

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
        with self._lock:
            turn = next(self._turns[model])
        rotated = replicas[turn % len(replicas) :] + replicas[: turn % len(replicas)]
        return [r for r in rotated if r.ready] + [r for r in rotated if not r.ready]

    def mark_down(self, replica: Replica) -> None:
        replica.ready = False

    def _probe(self, replica: Replica) -> None:
        try:
            response = self._session.get(f"{replica.url}/v1/model", timeout=self._probe_timeout_s)
            metadata = response.json() if response.ok else {}
        except requests.Timeout:
            # NOTE: a replica busy with a backlog answers probes late; that is not "down". Only
            # repeated silence is (a refused connection or a 503 says so at once).
            replica.missed_probes += 1
            if replica.missed_probes >= MISSED_PROBES_DOWN:
                replica.ready = False
            return
        except (requests.RequestException, ValueError):
            metadata = {}
        replica.missed_probes = 0
        before = replica.metadata.get("weights_hash")
        replica.metadata = metadata if isinstance(metadata, dict) else {}
        after = replica.metadata.get("weights_hash")
        if before and after and before != after and self.on_weights_change:
            log.info("%s now serves weights %s (was %s)", replica.model, after, before)
            self.on_weights_change(replica.model)
        replica.ready = bool(replica.metadata.get("ready"))
        replica.checked_at = time.time()

    def refresh(self) -> None:
        """Probe every replica now, in parallel."""
        everyone = [r for replicas in self._replicas.values() for r in replicas]
        with ThreadPoolExecutor(max_workers=min(16, len(everyone)) or 1) as pool:
            list(pool.map(self._probe, everyone))

    def start_polling(self, interval_s: float) -> None:
        def loop() -> None:
            while not self._stop.is_set():
                self.refresh()
                self._stop.wait(interval_s)

        threading.Thread(target=loop, name="replica-health", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

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
                    "version",
                    "classes",
                )
            },
            "replicas": [
                {
                    "url": r.url,
                    "ready": r.ready,
                    "weights": r.metadata.get("weights"),
                    "state": r.metadata.get("state", "unreachable"),
                }
                for r in replicas
            ],
        }
