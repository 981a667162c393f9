"""Gunicorn settings shared by the gateway and every model service (command-line flags override).

The fleet launcher and the Dockerfiles pass ``--bind``, ``--workers`` and ``--threads``.
"""

import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project, before --chdir applies
from common import logs  # noqa: E402

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


def child_exit(server: object, worker: object) -> None:
    """Retire a dead worker's live gauges (counters and histograms keep counting)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)  # type: ignore[attr-defined]
