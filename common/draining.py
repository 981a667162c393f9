"""A stopping model service drains before it stops: for ``DRAIN_S`` after SIGTERM it answers every
prediction and probe "not ready" (503 ``model_not_ready``, ``"ready": false``), so every gateway
moves its traffic to the other replicas, and only then does Gunicorn stop.

Without it a replica leaving (a compose scale-in, a rolling restart) loses requests: its worker
stops accepting at once, but the listening socket it inherited stays open until it exits, so the
kernel still completes connections that are then reset, and pooled keep-alive connections are
closed under requests written onto them.

The Gunicorn master (deploy/gunicorn.conf.py) marks the drain with a file named by its pid; its
workers look for their parent's.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from common.settings import load, setting


@dataclass(frozen=True)
class DrainSettings:
    """How a model service stops: ``DRAIN_S``, or ``<MODEL>_DRAIN_S`` for one."""

    drain_s: float = setting(
        5.0,
        "seconds a stopping model service answers not-ready (predictions and probes) before Gunicorn "
        "stops, so gateways (probing every GATEWAY_HEALTH_INTERVAL_S) move its traffic elsewhere; 0: at once",
    )

    @classmethod
    def from_env(cls, model: str) -> DrainSettings:
        return load(cls, ("", f"{model.upper()}_"))


def marker(master_pid: int) -> Path:
    return Path(tempfile.gettempdir()) / f"imagerec-draining-{master_pid}"


def draining() -> bool:
    """True in a worker whose Gunicorn master is draining."""
    return marker(os.getppid()).exists()
