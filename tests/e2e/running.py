"""The running fleet as the end-to-end tests see it (the ``fleet`` fixture in conftest.py starts
it), and the calls every test module makes of it."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from deploy.local.fleet import ExtraService, Fleet
from deploy.local.running import RunningFleet, free_port, on_free_ports, running, wait_until
from deploy.settings import NginxSettings
from tests.helpers import ADMIN_KEY, is_project_variable

ADMIN_TOKEN = "e2e-admin-token"


@dataclass
class E2EFleet(RunningFleet):
    """The running fleet plus a loopback image server it is allowed to fetch from, and the model
    repository the ``shapes`` replicas serve versions from (polled every second)."""

    image_server: str = ""
    repository: Path = Path()
    admin_key: str = ADMIN_KEY

    @property
    def admin(self) -> dict[str, str]:
        """Headers that call as the admin (jobs, training, keys need a key)."""
        return {"Authorization": f"Bearer {self.admin_key}"}


JPEG = {"Content-Type": "image/jpeg"}


@contextmanager
def stub_fleet(
    prefix: str, gateway_workers: int, nginx: NginxSettings | None = None, **env: str
) -> Iterator[RunningFleet]:
    """A small fleet of its own (Nginx, the gateway, Redis, one stub model, ``flaky``:
    ``tests.e2e.faulty_service``) with ``env`` over the test environment; removed afterwards."""
    run_dir = Path(tempfile.mkdtemp(prefix=prefix))
    run_dir.chmod(0o755)
    settings = on_free_ports(run_dir, models=(), gateway_workers=gateway_workers)
    stub = ExtraService("flaky", free_port(), "tests.e2e.faulty_service:create_app()")
    environment = {k: v for k, v in os.environ.items() if not is_project_variable(k)} | env
    try:
        with running(
            Fleet(settings, [stub], nginx=nginx or NginxSettings()), environment, timeout_s=120
        ) as handle:
            yield handle
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def post(fleet: E2EFleet, query: str, **kwargs) -> requests.Response:
    return requests.post(f"{fleet.url}/v1/predict?{query}", timeout=60, **kwargs)


def assert_json_error(response: requests.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code
    assert body["error"]["message"] and body["error"]["request_id"]
    return body


def publish(repository: Path, version: int, source: Path, logit_shift: float) -> None:
    """Write ``version`` as a complete folder, then rename it into place: the poller never sees
    half a version. Adding one constant to every logit leaves the softmax as it was, so the new
    version answers as well as the old while its weights (and hash) differ."""
    import keras

    model = keras.models.load_model(source)
    kernel, bias = model.layers[-1].get_weights()
    model.layers[-1].set_weights([kernel, bias + logit_shift])
    staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=repository / "shapes"))
    model.save(staging / "model.keras")
    os.rename(staging, repository / "shapes" / str(version))


def job(fleet: E2EFleet, job_id: str) -> dict[str, Any]:
    answer = requests.get(f"{fleet.url}/v1/jobs/{job_id}", headers=fleet.admin, timeout=10)
    assert answer.status_code == 200, answer.text
    return answer.json()  # type: ignore[no-any-return]


def wait_for(fleet: E2EFleet, job_id: str, states: tuple[str, ...], timeout_s: float) -> dict[str, Any]:
    found: dict[str, Any] = {}

    def reached() -> bool:
        found.update(job(fleet, job_id))
        return found["status"] in states

    try:
        wait_until(reached, timeout_s, f"job {job_id} to be {' or '.join(states)}")
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}; last seen: {found}") from None
    return found
