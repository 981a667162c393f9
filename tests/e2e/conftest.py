"""A real fleet for the end-to-end tests: supervisord, Nginx, Gunicorn, four model services.

Started once per session on free ports in a fresh run folder, polled until every model is ready,
and torn down in ``finally`` whatever happened.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from deploy.local.fleet import ExtraService, Fleet, FleetSettings
from tests.conftest import _is_project_variable
from tests.e2e import shapes
from tests.http_fixtures import serve_images

STARTUP_TIMEOUT_S = 300
pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``check`` until it is true; fail with ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except requests.RequestException:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")


@dataclass
class RunningFleet:
    fleet: Fleet
    process: subprocess.Popen[bytes]
    image_server: str

    @property
    def url(self) -> str:
        return self.fleet.url

    def service_url(self, name: str) -> str:
        return f"http://{self.fleet.settings.host}:{self.fleet.service_ports()[name]}"

    def ctl(self, *args: str) -> str:
        command = [
            sys.executable,
            "-m",
            "supervisor.supervisorctl",
            "-c",
            str(self.fleet.run_dir / "supervisord.conf"),
            *args,
        ]
        return subprocess.run(command, capture_output=True, text=True, timeout=60).stdout

    def pids(self) -> dict[str, int]:
        pids = {}
        for line in self.ctl("status").splitlines():
            parts = line.split()
            if "pid" in parts:
                pids[parts[0]] = int(parts[parts.index("pid") + 1].rstrip(","))
        return pids

    def statuses(self) -> dict[str, str]:
        response = requests.get(f"{self.url}/v1/models", timeout=10)
        if response.status_code != 200:  # e.g. Nginx's 502 while the gateway starts
            return {}
        body = response.json()
        return {model["name"]: model["status"] for model in body["models"]}

    def wait_ready(self, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        names = set(self.fleet.service_ports())
        wait_until(
            lambda: self.statuses() == dict.fromkeys(names, "ready"),
            timeout_s,
            f"models {sorted(names)} to be ready",
        )

    def logs(self) -> str:
        folder = self.fleet.run_dir / "logs"
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(folder.glob("*.log"))
        )


@pytest.fixture(scope="session")
def trained_shapes(tmp_path_factory: pytest.TempPathFactory) -> shapes.TrainedModel:
    return shapes.train(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="session")
def fleet(trained_shapes: shapes.TrainedModel) -> Iterator[RunningFleet]:
    run_dir = Path(tempfile.mkdtemp(prefix="imagerec-e2e-"))
    run_dir.chmod(0o755)
    settings = FleetSettings(
        run_dir=str(run_dir),
        nginx_port=free_port(),
        gateway_port=free_port(),
        vgg16_port=free_port(),
        resnet50_port=free_port(),
        inceptionv3_port=free_port(),
        logs_to_console=False,
        gateway_workers=2,
    )
    extra = ExtraService(
        "shapes",
        free_port(),
        str(trained_shapes.model_path),
        str(trained_shapes.labels_path),
        shapes.INPUT_SIZE,
        shapes.MODE,
    )
    fleet = Fleet(settings, [extra])
    env = {k: v for k, v in os.environ.items() if not _is_project_variable(k)}
    env.update(fleet.environment())
    env.update(
        WEIGHTS="random",
        KERAS_HOME=str(run_dir / "keras"),
        TF_CPP_MIN_LOG_LEVEL="2",
        GATEWAY_FETCH_ALLOW_NETWORKS="127.0.0.0/8",
        GATEWAY_FETCH_TIMEOUT_S="5",
    )
    with serve_images() as image_server:
        process = subprocess.Popen(
            fleet.command(),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        running = RunningFleet(fleet, process, image_server)
        try:
            try:
                running.wait_ready()
            except TimeoutError:
                print(running.logs(), file=sys.stderr)
                raise
            yield running
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            shutil.rmtree(fleet.nginx_temp_dir, ignore_errors=True)
            shutil.rmtree(run_dir, ignore_errors=True)
