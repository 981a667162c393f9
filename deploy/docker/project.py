"""The compose project driven from Python, as the end-to-end tests and ``make bench`` run it: our
own ``dockerd`` (``deploy.docker.engine``), the images built from deploy/docker/Dockerfile on a base
made from Debian's packages, and ``docker-compose`` (Debian's v1) with the published ports chosen
free and bound to 127.0.0.1.

Everything waits on what Docker reports (healthchecks, container states), never on sleeps.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import yaml

from deploy.docker.engine import DEBIAN_BIN, ROOT, Engine
from deploy.local.running import free_port, wait_until

PROJECT = "imagerec-e2e"  # never the folder's default, so a user's own project is left alone
SECRETS = ROOT / "run" / "secrets"
SERVICES = (
    "vgg16",
    "resnet50",
    "inceptionv3",
    "gateway",
    "worker",
    "trainer",
    "redis",
    "redis-cache",
    "nginx",
)

_FILE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
MODEL_PORTS = {
    model: int(_FILE[model]["environment"]["PORT"]) for model in ("vgg16", "resnet50", "inceptionv3")
}
# Nginx's fixed address on the project's network and its port there (not the published one).
NGINX_ADDRESS = _FILE["nginx"]["networks"]["default"]["ipv4_address"]
NGINX_PORT = int(_FILE["nginx"]["environment"]["NGINX_PORT"])


@dataclass
class ComposeFleet:
    """One compose project on ``engine``: its URLs, its containers, and the calls that change it."""

    engine: Engine
    base_image: str
    port: int = field(default_factory=free_port)
    grpc_port: int = field(default_factory=free_port)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def admin_key(self) -> str:
        return (SECRETS / "admin_key").read_text().strip()

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_key}"}

    def env(self) -> dict[str, str]:
        return {
            **self.engine.env(),
            "COMPOSE_PROJECT_NAME": PROJECT,
            "BASE_IMAGE": self.base_image,
            # No ImageNet files here and no download at run time: seeded random weights, labelled so.
            "WEIGHTS": "random",
            "NGINX_PUBLISHED_ADDRESS": "127.0.0.1",
            "NGINX_PUBLISHED_PORT": str(self.port),
            "NGINX_PUBLISHED_GRPC_PORT": str(self.grpc_port),
        }

    def compose(
        self, *args: str, timeout: float = 900, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [f"{DEBIAN_BIN}/docker-compose", "--no-ansi", "-f", str(ROOT / "docker-compose.yml"), *args],
            cwd=ROOT,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode:
            raise RuntimeError(
                f"docker-compose {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-4000:]}"
            )
        return result

    def docker(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.engine.docker(*args, check=check)

    def build(self) -> float:
        """``docker-compose build`` (BuildKit through Debian's docker client); seconds taken."""
        started = time.monotonic()
        self.compose("build", timeout=1800)
        return time.monotonic() - started

    def containers(self, service: str) -> list[str]:
        return self.compose("ps", "-q", service).stdout.split()

    def inspect(self, container: str) -> dict[str, Any]:
        return json.loads(self.docker("inspect", container).stdout)[0]

    def state(self, container: str) -> str:
        """``healthy`` once its healthcheck passes (``running`` for one without a healthcheck)."""
        found = self.inspect(container)["State"]
        health = found.get("Health")
        return str(health["Status"] if health and found["Running"] else found["Status"])

    def green(self, container: str) -> bool:
        """Healthy, or running when it has no healthcheck (``state`` says ``running`` only then)."""
        return self.state(container) in ("healthy", "running")

    def wait_green(self, services: tuple[str, ...] = SERVICES, timeout_s: float = 600) -> float:
        """Until every container of ``services`` is healthy (or running, without a healthcheck);
        seconds waited."""
        started = time.monotonic()

        def green() -> bool:
            return all(
                (ids := self.containers(service)) and all(self.green(c) for c in ids) for service in services
            )

        try:
            wait_until(green, timeout_s, "every compose container healthy")
        except TimeoutError:
            raise TimeoutError(f"not green in {timeout_s:.0f} s:\n{self.describe()}") from None
        return time.monotonic() - started

    def describe(self) -> str:
        """Each container's state and the last lines of its log, for a failure's message."""
        lines = []
        for service in SERVICES:
            for container in self.containers(service):
                lines.append(f"--- {service} {container[:12]}: {self.state(container)}")
                logs = self.docker("logs", "--tail", "15", container, check=False)
                lines.append((logs.stdout + logs.stderr)[-2500:])
        return "\n".join(lines)

    def up(self, *args: str) -> float:
        """``up -d`` (no build: the images are built) and every healthcheck green; seconds taken."""
        started = time.monotonic()
        self.compose("up", "-d", "--no-build", *args)
        self.wait_green()
        return time.monotonic() - started

    def replica_images(self, service: str = "resnet50", model: str = "resnet50") -> dict[str, float]:
        """Images each container of ``service`` has run through its model (its own /metrics)."""
        port = MODEL_PORTS[model]
        code = (
            "import urllib.request;"
            f"print(urllib.request.urlopen('http://127.0.0.1:{port}/metrics', timeout=5).read().decode())"
        )
        counts = {}
        for container in self.containers(service):
            text = self.docker("exec", container, "python", "-c", code).stdout
            counts[container[:12]] = sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith(f'imagerec_inference_images_total{{model="{model}"}}')
            )
        return counts

    def ready_replicas(self, model: str = "resnet50") -> int:
        """Replicas of ``model`` the gateway lists as ready (the admin sees every one)."""
        answer = requests.get(f"{self.url}/v1/models/{model}", headers=self.admin, timeout=10)
        answer.raise_for_status()
        return sum(bool(replica["ready"]) for replica in answer.json()["replicas"])

    def crash(self, container: str) -> None:
        """SIGKILL to the container's init from the host, as a crash would: unlike ``docker kill``
        (a manual stop), it leaves the restart policy to act."""
        pid = self.inspect(container)["State"]["Pid"]
        subprocess.run(["kill", "-9", str(pid)], check=True)

    def restarted(self, container: str, before: int, timeout_s: float = 300) -> None:
        """Until Docker has restarted ``container`` (RestartCount past ``before``) and it is green."""
        wait_until(
            lambda: self.inspect(container)["RestartCount"] > before and self.green(container),
            timeout_s,
            f"{container[:12]} restarted and green",
        )


def project_volumes(fleet: ComposeFleet) -> list[str]:
    return fleet.docker(
        "volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}"
    ).stdout.split()


def secrets(root: Path = ROOT) -> None:
    """``make secrets``, as the README says."""
    subprocess.run(["make", "-s", "secrets"], cwd=root, check=True, capture_output=True)
