"""The model-service tests' shared fixtures: a fake runtime and a service app on it."""

from __future__ import annotations

import pytest
from flask.testing import FlaskClient

from services import resnet50
from serving.app import create_app
from tests.serving.fakes import SETTINGS, EchoRuntime


@pytest.fixture
def runtime() -> EchoRuntime:
    return EchoRuntime()


@pytest.fixture
def service(runtime: EchoRuntime) -> FlaskClient:
    """ResNet50's service app on ``runtime`` (``SETTINGS``), loaded, its warm-up calls forgotten."""
    app = create_app(resnet50.SPEC, SETTINGS, runtime, background_load=False)
    runtime.batches.clear()  # the warm-up's timing calls
    return app.test_client()
