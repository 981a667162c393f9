"""A real fleet for the end-to-end tests: supervisord, Nginx, Gunicorn and the model services -
the three ImageNet models, a small model trained in the run (two replicas) and a member whose
faults the tests switch on (``faulty_service``).

Started once per session on free ports in a fresh run folder, polled until every model is ready,
and torn down in ``finally`` whatever happened (``deploy.local.running``).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.local.fleet import ExtraService, Fleet
from deploy.local.running import free_port, on_free_ports, running
from deploy.settings import NginxSettings
from tests.e2e import shapes
from tests.e2e.running import ADMIN_TOKEN, E2EFleet
from tests.helpers import ADMIN_KEY, is_project_variable
from tests.http_fixtures import serve_images

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="session")
def fleet(trained_shapes: shapes.TrainedModel) -> Iterator[E2EFleet]:
    run_dir = Path(tempfile.mkdtemp(prefix="imagerec-e2e-"))
    run_dir.chmod(0o755)
    settings = on_free_ports(run_dir, gateway_workers=2, replicas=("shapes=2",))
    repository = run_dir / "repository"
    (repository / "shapes" / "1").mkdir(parents=True)
    shutil.copy(trained_shapes.model_path, repository / "shapes" / "1" / "model.keras")
    custom = ExtraService.custom(
        "shapes",
        free_port(),
        str(trained_shapes.model_path),
        str(trained_shapes.labels_path),
        shapes.INPUT_SIZE,
        shapes.MODE,
    )
    versioned = {
        "SHAPES_MODEL_REPOSITORY": str(repository),
        "SHAPES_REPOSITORY_POLL_S": "1",
        "SHAPES_ADMIN_TOKEN": ADMIN_TOKEN,
    }
    extra = [
        dataclasses.replace(custom, env={**custom.env, **versioned}),
        ExtraService("flaky", free_port(), "tests.e2e.faulty_service:create_app()"),
    ]
    env = {k: v for k, v in os.environ.items() if not is_project_variable(k)}
    env.update(
        WEIGHTS="random",
        IMAGEREC_ADMIN_KEY=ADMIN_KEY,
        KERAS_HOME=str(run_dir / "keras"),
        MODEL_CACHE=str(run_dir / "converted"),
        TF_CPP_MIN_LOG_LEVEL="2",
        GATEWAY_FETCH_ALLOW_NETWORKS="127.0.0.0/8",
        GATEWAY_FETCH_ALLOW_PORTS="",  # the loopback image and callback servers listen on free ports
        GATEWAY_FETCH_TIMEOUT_S="5",
        # Load tests send hundreds of requests a second from one address; the limiter itself is
        # tested in tests/gateway (memory and a real Redis), the edge's in tests/e2e/test_edge.py.
        GATEWAY_RATE_LIMIT="1000/second",
        # The fault tests make one member fail several times in a row on purpose; each gateway
        # worker keeps its own circuits, so a low threshold would leave one open for later tests.
        # The circuit itself is tested in tests/gateway/test_client.py.
        GATEWAY_BREAKER_FAIL_MAX="10",
        # Fault and load tests send one photo again and again and must reach the models: no
        # response cache here (it is tested in tests/gateway/test_cache.py, Redis included).
        GATEWAY_CACHE_SIZE="0",
        # A killed trainer's job is failed after this long without progress (default 120 s);
        # the watchdog itself is tested in tests/workers/test_training.py.
        TRAINING_STALL_S="20",
    )
    try:
        with (
            serve_images() as image_server,
            running(Fleet(settings, extra, nginx=NginxSettings(anonymous_rate="1000r/s")), env) as handle,
        ):
            yield E2EFleet(handle.fleet, handle.process, image_server, repository)
    finally:
        if os.environ.get("E2E_KEEP_LOGS"):  # a folder to copy every process's log into
            shutil.copytree(run_dir / "logs", os.environ["E2E_KEEP_LOGS"], dirs_exist_ok=True)
        shutil.rmtree(run_dir, ignore_errors=True)
