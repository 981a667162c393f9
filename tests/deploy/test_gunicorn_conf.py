"""deploy/gunicorn.conf.py read by Gunicorn itself, with the command lines the launchers use: a
model service's master drains on SIGTERM (common/draining.py), the gateway's stops at once."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gunicorn.app.wsgiapp import WSGIApplication
from gunicorn.arbiter import Arbiter

from common import draining
from deploy.settings import GUNICORN_GRACEFUL_S

CONFIG = str(Path(__file__).resolve().parents[2] / "deploy" / "gunicorn.conf.py")


class Timers:
    """Stands in for threading.Timer: records what would run when, runs nothing."""

    def __init__(self) -> None:
        self.started: list[tuple[float, Any, tuple[Any, ...]]] = []

    def __call__(self, interval: float, function: Any, args: tuple[Any, ...]) -> Timers:
        self.started.append((interval, function, args))
        return self

    def start(self) -> None:
        pass


def arbiter(app: str, monkeypatch: pytest.MonkeyPatch) -> Arbiter:
    """A master as ``gunicorn --config deploy/gunicorn.conf.py ... APP`` sets it up (not started)."""
    monkeypatch.setattr(sys, "argv", ["gunicorn", "--config", CONFIG, "--bind", "127.0.0.1:0", app])
    # Gunicorn applies the config's logging to the root logger: this test's process keeps its own.
    monkeypatch.setattr(logging.root, "handlers", list(logging.root.handlers))
    monkeypatch.setattr(logging.root, "level", logging.root.level)
    return Arbiter(WSGIApplication("%(prog)s [OPTIONS] [APP_MODULE]"))


@pytest.fixture
def timers(monkeypatch: pytest.MonkeyPatch) -> Iterator[Timers]:
    started = Timers()
    monkeypatch.setattr(threading, "Timer", started)
    yield started
    draining.marker(os.getpid()).unlink(missing_ok=True)


def test_a_model_services_first_sigterm_drains_and_asks_for_a_second(
    monkeypatch: pytest.MonkeyPatch, timers: Timers
) -> None:
    monkeypatch.setenv("RESNET50_DRAIN_S", "7")
    master = arbiter("services.resnet50:create_app()", monkeypatch)
    master.cfg.when_ready(master)

    master.handle_term()  # what Gunicorn's main loop calls on SIGTERM

    assert draining.marker(os.getpid()).exists()  # its workers now answer not-ready
    assert master.cfg.graceful_timeout == GUNICORN_GRACEFUL_S  # what the stop grace periods count on
    assert timers.started == [(7.0, os.kill, (os.getpid(), signal.SIGTERM))]
    master.cfg.on_exit(master)
    assert not draining.marker(os.getpid()).exists()


def test_the_gateway_stops_on_its_first_sigterm(monkeypatch: pytest.MonkeyPatch, timers: Timers) -> None:
    master = arbiter("gateway.app:create_app()", monkeypatch)
    master.cfg.when_ready(master)

    assert "handle_term" not in vars(master)  # Gunicorn's own: a graceful stop at once
    assert timers.started == [] and not draining.marker(os.getpid()).exists()
