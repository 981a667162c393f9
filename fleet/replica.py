"""One model replica: where it is called, and what its last probe said about it."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import requests

from common import wire

log = logging.getLogger(__name__)
MISSED_PROBES_DOWN = 3  # consecutive probe time-outs before a replica counts as down


@dataclass
class Replica:
    url: str
    model: str = ""
    ready: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)
    checked_at: float = 0.0  # time.time() of the last probe; 0: never probed
    missed_probes: int = 0
    host: str = ""  # the Host header to send (the DNS name it was resolved from); empty: the URL's
    source: str = ""  # the configured URL it came from

    @property
    def headers(self) -> dict[str, str]:
        """Headers every request to this replica carries."""
        return {"Host": self.host} if self.host else {}

    def probe(self, session: requests.Session, timeout_s: float) -> bool:
        """Ask ``/v1/model`` and update ``ready`` and ``metadata``.

        Returns:
            True when the replica now serves other weights than it did before.
        """
        self.checked_at = time.time()
        try:
            response = session.get(f"{self.url}/v1/model", timeout=timeout_s, headers=self.headers)
            metadata = response.json() if response.ok else {}
        except requests.Timeout:
            # NOTE: a replica busy with a backlog answers probes late; that is not "down". Only
            # repeated silence is (a refused connection or a 503 says so at once).
            self.missed_probes += 1
            if self.missed_probes >= MISSED_PROBES_DOWN:
                self.ready = False
            return False
        except (requests.RequestException, ValueError):
            metadata = {}
        self.missed_probes = 0
        before = self.metadata.get("weights_hash")
        self.metadata = metadata if isinstance(metadata, dict) else {}
        self.ready = bool(self.metadata.get("ready"))
        after = self.metadata.get("weights_hash")
        if before and after and before != after:
            log.info("%s replica %s now serves weights %s (was %s)", self.model, self.url, after, before)
            return True
        return False

    def describe(self) -> dict[str, Any]:
        """This replica's entry in ``/v1/models``, as of ``checked_at`` (None: never probed)."""
        return {
            "url": self.url,
            **({"host": self.host} if self.host else {}),
            "ready": self.ready,
            "weights": self.metadata.get("weights"),
            "state": self.metadata.get("state", "unreachable"),
            "checked_at": wire.timestamp(self.checked_at),
        }
