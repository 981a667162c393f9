"""What the benchmarks share about a running fleet: the default environment, its processes and
their CPU, each model's batching figures, and waiting until the queues are empty."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import requests

from deploy.local.running import children, wait_until
from deploy.settings import NginxSettings

MODELS = ("resnet50", "inceptionv3", "vgg16")
STUBBED = ("vgg16", "resnet50", "inceptionv3")  # the programs bench.stub_service stands in for
TICK = os.sysconf("SC_CLK_TCK")
# wrk's connections are one client without a key: the parts that measure past one client's limits
# lift both, the gateway's (GATEWAY_RATE_LIMIT, in the environment) and the edge's (Nginx's, here).
NO_EDGE_LIMIT = NginxSettings(anonymous_rate="")


def admin_session(fleet: Any) -> requests.Session:
    """Calls as the fleet's admin, with the key the fleet generated in its run folder: jobs,
    training and custom models need a key."""
    key = Path(fleet.fleet.environment()["AUTH_ADMIN_KEY_FILE"]).read_text().strip()
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {key}"
    return session


def base_env(cache: Path) -> dict[str, str]:
    """The default settings (``make run``'s): only the weights are random, as they must be here."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("GATEWAY_", "FLEET_", "REDIS_URL")) and k not in ("BACKEND", "WEIGHTS")
    }
    env.update(WEIGHTS="random", MODEL_CACHE=str(cache), TF_CPP_MIN_LOG_LEVEL="2")
    return env


def settle(fleet: Any, models: tuple[str, ...] = MODELS) -> None:
    """Wait out what a load run left queued (wrk leaves its last requests behind), so runs do not
    overlap: until every model's queue is empty. NOTE: not by sending one more request and waiting
    for it - the same bytes again would be a cache hit, answered at once."""

    def idle() -> bool:
        return all(
            not (stats := batching(fleet, model))["queued_images"] and not stats["running_images"]
            for model in models
        )

    wait_until(idle, 300, "the models' queues to empty")


def batching(fleet: Any, model: str) -> dict[str, Any]:
    return requests.get(f"{fleet.service_url(model)}/v1/model", timeout=10).json()["batching"]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def processes(fleet: Any, stubs: bool = True) -> dict[str, list[int]]:
    """The fleet's processes by program (``stubs``: the model programs together, as "stubs"),
    each with its children: Nginx's workers, Gunicorn's; the program's own process first."""
    found: dict[str, list[int]] = {}
    for program, pid in fleet.pids().items():
        role = "stubs" if stubs and program in STUBBED else program
        found.setdefault(role, []).extend([pid, *sorted(children(pid))])
    return found


def cpu_name() -> str:
    """The CPU every figure is named with (the AMD EPYC and the Intel Xeon differ ~5x at int8)."""
    if platform.processor():
        return platform.processor()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()
