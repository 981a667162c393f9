"""Structured logs: one JSON line per request with the request id, in every Flask process."""

from __future__ import annotations

import json
import logging

import pytest

from common import logs
from services import resnet50
from serving.app import ServiceSettings, create_app
from tests.helpers import photo
from tests.serving.fakes import EchoRuntime


def test_one_json_line_per_request(caplog: pytest.LogCaptureFixture) -> None:
    client = create_app(resnet50.SPEC, ServiceSettings(), EchoRuntime(), background_load=False).test_client()
    with caplog.at_level(logging.DEBUG, logger="imagerec.request"):
        client.post(
            "/v1/predict",
            data=photo("chelsea.jpg"),
            content_type="image/jpeg",
            headers={"X-Request-ID": "rid-9"},
        )
        client.get("/health/ready")
    lines = [r for r in caplog.records if r.name == "imagerec.request"]
    assert [(r.levelno, r.route) for r in lines] == [  # type: ignore[attr-defined]
        (logging.INFO, "/v1/predict"),
        (logging.DEBUG, "/health/ready"),  # probes come every few seconds: not at INFO
    ]
    line = json.loads(logs.formatter().format(lines[0]))
    assert {
        k: line[k] for k in ("level", "logger", "message", "component", "request_id", "status", "method")
    } == {
        "level": "INFO",
        "logger": "imagerec.request",
        "message": "request",
        "component": "resnet50",
        "request_id": "rid-9",
        "status": 200,
        "method": "POST",
    }
    assert line["duration_ms"] > 0 and line["time"] and line["pid"]


def test_text_format_for_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOG_FORMAT", "text")
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello", None, None)
    assert logs.formatter().format(record).endswith("x: hello")


def test_gunicorn_config_is_a_valid_logging_config() -> None:
    config = logs.gunicorn_config()
    assert config["formatters"]["structured"]["()"] is logs.formatter
    assert set(config["loggers"]) == {"gunicorn.error", "gunicorn.access"}
