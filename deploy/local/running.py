"""Start a local fleet in the background, poll it until ready, and stop it: for tests and benchmarks."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests

from common.models import BASE_MODELS
from deploy.local.fleet import Fleet, LocalFleetSettings


class PortReservations:
    """Free ports held from when they are chosen to the end of the process, after BentoML's
    ``reserve_free_port``: each is a socket bound (never listening), then marked ``SO_REUSEADDR``.
    No other chooser - in this process or another, binding port 0 or probing a sibling - is
    handed a held port, so two fleets, or two services of one, never race for one between
    choosing and binding; and the fleet's servers (Nginx, Gunicorn, Redis and Python's HTTP
    servers all set ``SO_REUSEADDR``) still bind and listen on it, and bind it again after a
    restart. A port handed out once is never handed out again by the same reservations."""

    def __init__(self) -> None:
        self._held: dict[int, socket.socket] = {}
        self._given: set[int] = set()  # every port handed out, held or released since
        self._lock = threading.Lock()

    def take(self, replicas: int = 3, stride: int = LocalFleetSettings.replica_port_stride) -> int:
        """A port whose replica siblings (port + k x stride) are free too; all of them held."""
        with self._lock:
            while True:
                first = self._hold(0)
                if first is None:
                    raise OSError("no free port to bind on 127.0.0.1")
                port = int(first.getsockname()[1])
                wanted = [port + k * stride for k in range(1, replicas)]
                siblings = [None if p in self._given else self._hold(p) for p in wanted]
                if port not in self._given and all(siblings):
                    for sock in (first, *siblings):
                        assert sock is not None
                        self._held[int(sock.getsockname()[1])] = sock
                    self._given.update((port, *wanted))
                    return port
                for sock in (first, *siblings):
                    if sock is not None:
                        sock.close()

    def release(self) -> None:
        """Let every held port go (the module's own reservations last as long as the process); none
        is handed out again."""
        with self._lock:
            for sock in self._held.values():
                sock.close()
            self._held.clear()

    @staticmethod
    def _hold(port: int) -> socket.socket | None:
        """A socket bound to ``port`` (0: any free one), or None when something holds it. It binds
        without ``SO_REUSEADDR`` - so a port another reservation holds, here or in another process,
        is refused - and sets it after, so the server the port is for can still bind it."""
        if port > 65535:
            return None
        sock = socket.socket()
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            sock.close()
            return None
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        return sock


RESERVED = PortReservations()
atexit.register(RESERVED.release)


def free_port(replicas: int = 3, stride: int = LocalFleetSettings.replica_port_stride) -> int:
    """A free port whose replica siblings (port + k x stride) are free too, held for this process
    (``PortReservations``): no later call, here or elsewhere, is given it."""
    return RESERVED.take(replicas, stride)


def on_free_ports(run_dir: Path, **overrides: object) -> LocalFleetSettings:
    """Fleet settings for a throw-away fleet: every port free, logs to files in ``run_dir``."""
    ports = {
        f"{name}_port": free_port()
        for name in ("nginx", "gateway", "nginx_grpc", "gateway_grpc", *BASE_MODELS, "redis", "cache_redis")
    }
    return LocalFleetSettings(**{"run_dir": str(run_dir), "logs_to_console": False, **ports, **overrides})  # type: ignore[arg-type]


def wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``check`` until it is true; raise ``TimeoutError`` naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except requests.RequestException:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    return children


def children(pid: int) -> set[int]:
    """The direct children of a process (e.g. an Nginx master's workers)."""
    return set(_children().get(pid, []))


def rss_mb(pid: int) -> float:
    """Resident memory of one process and all its descendants, in MB."""
    tree = _children()
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        stack += tree.get(current, [])
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return round(total / 1024, 1)


@dataclass
class RunningFleet:
    fleet: Fleet
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return self.fleet.url

    def service_url(self, name: str, replica: int = 0) -> str:
        """Base URL of one replica (0: the first) of a model service."""
        return f"http://{self.fleet.settings.host}:{self.fleet.replicas()[name][replica][1]}"

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

    def memory_mb(self) -> dict[str, float]:
        """Resident memory per supervised program (workers included)."""
        return {name: rss_mb(pid) for name, pid in self.pids().items()}

    def statuses(self) -> dict[str, str]:
        response = requests.get(f"{self.url}/v1/models", timeout=10)
        if response.status_code != 200:  # e.g. Nginx's 502 while the gateway starts
            return {}
        return {model["name"]: model["status"] for model in response.json()["models"]}

    def wait_ready(self, timeout_s: float = 300, held_s: float = 2.5) -> None:
        """Until every model is ready to every gateway worker. /v1/models is answered by one worker,
        and each worker probes on its own, every GATEWAY_HEALTH_INTERVAL_S (2 s): a model seen ready
        without a break for longer than that (``held_s``) has been probed ready by all of them."""
        names = set(self.fleet.service_ports())
        since: list[float] = []

        def held() -> bool:
            try:
                ready = self.statuses() == dict.fromkeys(names, "ready")
            except requests.RequestException:
                ready = False  # no answer is a break too
            if not ready:
                since.clear()
                return False
            since[:] = since or [time.monotonic()]
            return time.monotonic() - since[0] >= held_s

        wait_until(held, timeout_s, f"models {sorted(names)} to be ready to every gateway worker")

    def logs(self) -> str:
        folder = self.fleet.run_dir / "logs"
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(folder.glob("*.log"))
        )


@contextmanager
def running(fleet: Fleet, env: Mapping[str, str], timeout_s: float = 300) -> Iterator[RunningFleet]:
    """Run ``fleet`` under supervisord with ``env``; yields once every model is ready; always stops it."""
    process = subprocess.Popen(
        fleet.command(),
        env={**env, **fleet.environment()},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    handle = RunningFleet(fleet, process)
    try:
        try:
            handle.wait_ready(timeout_s)
        except TimeoutError:
            print(handle.logs(), file=sys.stderr)
            raise
        yield handle
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        shutil.rmtree(fleet.nginx_temp_dir, ignore_errors=True)
