"""Gunicorn settings shared by the gateway and every model service (command-line flags override).

The fleet launcher and the Dockerfiles pass ``--bind``, ``--workers`` and ``--threads``.
"""

import os
import re
import shutil
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project, before --chdir applies
from common import draining, logs  # noqa: E402

# NOTE: TensorFlow is not fork-safe (tensorflow/tensorflow#2448): models load in the worker.
preload_app = False
worker_class = "gthread"
threads = 4
# gthread workers heartbeat from their main loop, so a long inference does not trip this.
timeout = 120
graceful_timeout = 30
# Longer than Nginx's upstream keep-alive, so Gunicorn never closes a connection Nginx reuses.
keepalive = 75
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None
# Gunicorn's largest request line (its default is 4094): a line Nginx passes on (one 8k header
# buffer, CRLF included) always fits, so an over-long URL gets Nginx's JSON 414, never Gunicorn's
# HTML one (schemathesis found a 5.7 kB query string answered in HTML).
limit_request_line = 8190
# Gunicorn's control socket (gunicornc) is not used, and its default path (~/.gunicorn) would be
# shared by every Gunicorn of the local fleet and is read-only in the containers.
control_socket_disable = True

# One JSON line per log record (LOG_FORMAT=text for classic lines), Gunicorn's own included.
logconfig_dict = logs.gunicorn_config()


def on_starting(server: object) -> None:
    """Start with an empty Prometheus multiprocess folder: stale files would add old counts."""
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if folder:
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder, exist_ok=True)


def _drain_s(server: object) -> float:
    """``DRAIN_S`` of a model service (``services.<model>:...``); 0 for the gateway."""
    # NOTE: the app named on the command line (as every launcher does) is the application's
    # ``app_uri``; ``cfg.wsgi_app`` is only the config file's ``wsgi_app`` and stays None then.
    uri = getattr(server.app, "app_uri", None) or server.cfg.wsgi_app  # type: ignore[attr-defined]
    found = re.match(r"services\.(\w+):", str(uri or ""))
    if not found:
        return 0.0
    return draining.DrainSettings.from_env(found.group(1)).drain_s


def when_ready(server: object) -> None:
    """A model service drains on SIGTERM (common/draining.py): the first TERM marks the drain and
    asks for a second after ``DRAIN_S``; the second (or the operator's next) stops Gunicorn."""
    drain_s = _drain_s(server)
    marker = draining.marker(os.getpid())
    marker.unlink(missing_ok=True)
    if drain_s <= 0:
        return
    stop = server.handle_term  # type: ignore[attr-defined]

    def handle_term() -> None:
        if marker.exists():
            stop()
            return
        marker.touch()
        server.log.info("draining for %.1f s before stopping", drain_s)  # type: ignore[attr-defined]
        threading.Timer(drain_s, os.kill, (os.getpid(), signal.SIGTERM)).start()

    server.handle_term = handle_term  # type: ignore[attr-defined]


def on_exit(server: object) -> None:
    draining.marker(os.getpid()).unlink(missing_ok=True)


def child_exit(server: object, worker: object) -> None:
    """Retire a dead worker's live gauges (counters and histograms keep counting)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)  # type: ignore[attr-defined]
