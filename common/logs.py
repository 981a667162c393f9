"""Structured logs: every process writes JSON lines (python-json-logger), one line per request.

``LOG_FORMAT=text`` gives classic lines for a terminal; ``LOG_LEVEL`` sets the level. Gunicorn
installs this through ``logconfig_dict`` (deploy/gunicorn.conf.py); the request line comes from
``common.web`` (logger ``imagerec.request``), with the request id, route, model, status and time.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from pythonjsonlogger.json import JsonFormatter

TEXT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"


def formatter() -> logging.Formatter:
    if os.environ.get("LOG_FORMAT", "json") == "text":
        return logging.Formatter(TEXT)
    return JsonFormatter(
        "%(asctime)s %(levelname)s %(name)s %(process)d %(message)s",
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger", "process": "pid"},
    )


def level() -> str:
    return os.environ.get("LOG_LEVEL", "INFO")


def gunicorn_config() -> dict[str, Any]:
    """A ``logconfig_dict`` for Gunicorn: its own messages and the app's share one JSON stream."""
    level_name = level()
    handler = {"class": "logging.StreamHandler", "formatter": "structured", "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"structured": {"()": formatter}},
        "handlers": {"console": handler},
        "root": {"level": level_name, "handlers": ["console"]},
        "loggers": {
            "gunicorn.error": {"level": level_name, "handlers": ["console"], "propagate": False},
            "gunicorn.access": {"level": "WARNING", "handlers": ["console"], "propagate": False},
        },
    }
