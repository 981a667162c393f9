"""Gunicorn settings shared by the gateway and every model service (command-line flags override).

The fleet launcher and the Dockerfiles pass ``--bind``, ``--workers`` and ``--threads``.
"""

import logging
import os

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

logging.basicConfig(
    level=os.environ.get("LOG_LEVEL", "INFO"),
    format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s",
)
