"""A Docker engine of our own for the compose tests and ``make bench``, and the base image its
builds start from where no registry is reachable.

``Engine`` runs Debian's ``dockerd`` (no systemd): its exec root (sockets, pid file, state) under
the checkout's ``run/``, its data root (images, layers, BuildKit's cache) in a cache folder outside
the checkout, so a clean clone on the same machine builds from cache. ``stop()`` ends the daemon
and removes what it left behind: mounts under its roots, the bridges and veths it made, the
iptables chains and rules it added, and ``ip_forward`` as it was. Needs root.

``base_image()`` makes the images' base from Debian's packages (``debootstrap``), with the host's
certificate authorities so pip and apt inside builds trust what the host trusts, and imports it
once per recipe (the tag names its hash).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("imagerec.docker")

ROOT = Path(__file__).resolve().parents[2]
# Debian's client (20.10) first: it builds with BuildKit without the buildx plugin a newer one wants.
DEBIAN_BIN = "/usr/bin"
DOCKERD = "/usr/sbin/dockerd"
DEBOOTSTRAP = "/usr/sbin/debootstrap"
SUITE = "bookworm"  # Python 3.11, as the official image's
MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
HOST_EXTRA_CAS = Path("/usr/local/share/ca-certificates")
SOURCES = (
    f"deb {MIRROR} {SUITE} main\n"
    f"deb {MIRROR} {SUITE}-updates main\n"
    f"deb {MIRROR}-security {SUITE}-security main\n"
)
# pip in Debian's venv carries its own CA list: point it at the system's, which has the host's.
PIP_CONF = "[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n"


def default_data_root() -> Path:
    """Outside any checkout, so clean clones on one machine share image layers and build cache."""
    configured = os.environ.get("IMAGEREC_DOCKER_DATA_ROOT")
    if configured:
        return Path(configured)
    return Path("/var/cache/imagerec/docker") if os.geteuid() == 0 else Path.home() / ".cache/imagerec/docker"


def why_not() -> str | None:
    """Why this machine cannot run the engine, or None when it can."""
    if os.geteuid() != 0:
        return "dockerd needs root here (no rootless setup)"
    for tool in (DOCKERD, f"{DEBIAN_BIN}/docker", f"{DEBIAN_BIN}/docker-compose", DEBOOTSTRAP):
        if not Path(tool).exists():
            return f"{tool} is missing (apt-get install docker.io docker-compose debootstrap)"
    return None


def _lines(command: list[str]) -> list[str]:
    result = subprocess.run(command, capture_output=True, text=True)
    return result.stdout.splitlines() if result.returncode == 0 else []


def _mtu() -> int:
    """The MTU of the interface the default route leaves by: a bridge with a larger one stalls TLS
    downloads in builds where no one answers with 'fragmentation needed'."""
    for line in _lines(["ip", "-o", "route", "show", "default"]):
        words = line.split()
        if "dev" in words:
            device = words[words.index("dev") + 1]
            try:
                return int(Path(f"/sys/class/net/{device}/mtu").read_text())
            except (OSError, ValueError):
                break
    return 1500


@dataclass
class HostState:
    """What dockerd changes on the host, as it was before it started."""

    ip_forward: str
    links: set[str]
    rules: dict[tuple[str, str], set[str]] = field(default_factory=dict)  # (tool, table) -> -S lines

    TABLES = (("iptables", "filter"), ("iptables", "nat"), ("ip6tables", "filter"), ("ip6tables", "nat"))

    @classmethod
    def now(cls) -> HostState:
        return cls(
            ip_forward=Path("/proc/sys/net/ipv4/ip_forward").read_text().strip(),
            links=_links(),
            rules={(tool, table): set(_lines([tool, "-t", table, "-S"])) for tool, table in cls.TABLES},
        )

    def differences(self, other: HostState) -> list[str]:
        """What ``other`` (a later look) has that this state had not: links, rules, ip_forward.
        (What went missing since is not counted: a kept run's leftovers, cleaned by dockerd.)"""
        found = (
            [f"ip_forward {self.ip_forward} -> {other.ip_forward}"]
            if self.ip_forward != other.ip_forward
            else []
        )
        found += [f"link {link}" for link in sorted(other.links - self.links)]
        for key, after in other.rules.items():
            found += [f"{' '.join(key)}: {rule}" for rule in sorted(after - self.rules.get(key, set()))]
        return found

    def restore(self) -> None:
        """Undo what appeared since: rules first, then their chains, then links and ip_forward."""
        for (tool, table), before in self.rules.items():
            added = [line for line in _lines([tool, "-t", table, "-S"]) if line not in before]
            for line in added:
                if line.startswith("-A "):
                    subprocess.run([tool, "-t", table, "-D", *line.split()[1:]], capture_output=True)
            chains = [line.split()[1] for line in added if line.startswith("-N ")]
            for chain in chains:
                subprocess.run([tool, "-t", table, "-F", chain], capture_output=True)
            for chain in chains:
                subprocess.run([tool, "-t", table, "-X", chain], capture_output=True)
            for line in before:  # dockerd sets FORWARD's policy to DROP
                if line.startswith("-P "):
                    subprocess.run([tool, "-t", table, *line.split()], capture_output=True)
        for link in sorted(_links() - self.links):
            subprocess.run(["ip", "link", "delete", link], capture_output=True)
        Path("/proc/sys/net/ipv4/ip_forward").write_text(self.ip_forward + "\n")


def _links() -> set[str]:
    return {line.split(":")[1].strip().split("@")[0] for line in _lines(["ip", "-o", "link", "show"])}


def _unmount_under(*roots: Path) -> None:
    """Lazily unmount everything mounted below ``roots`` (overlays, netns, shm), deepest first."""
    prefixes = tuple(str(root.resolve()) + "/" for root in roots)
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point.startswith(prefixes) or point in {p.rstrip("/") for p in prefixes}:
            points.append(point)
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)


@dataclass
class Engine:
    """One ``dockerd`` of our own, reachable through ``env()``."""

    exec_root: Path = ROOT / "run" / "docker"
    data_root: Path = field(default_factory=default_data_root)
    process: subprocess.Popen[bytes] | None = None
    state: HostState | None = None

    @property
    def socket(self) -> Path:
        return self.exec_root / "docker.sock"

    @property
    def pidfile(self) -> Path:
        return self.exec_root / "dockerd.pid"

    @property
    def log_path(self) -> Path:
        return self.exec_root / "dockerd.log"

    def env(self) -> dict[str, str]:
        """The environment for ``docker`` and ``docker-compose`` against this engine, BuildKit on."""
        return {
            **os.environ,
            "PATH": f"{DEBIAN_BIN}:{os.environ.get('PATH', '')}",
            "DOCKER_HOST": f"unix://{self.socket}",
            "DOCKER_BUILDKIT": "1",
            "COMPOSE_DOCKER_CLI_BUILD": "1",
        }

    def docker(
        self, *args: str, check: bool = True, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [f"{DEBIAN_BIN}/docker", *args],
            env=self.env(),
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
        )

    def _stop_leftover(self) -> None:
        """A daemon a killed run left on these roots would hold them: end it first."""
        try:
            pid = int(self.pidfile.read_text())
            os.kill(pid, signal.SIGTERM)
        except (OSError, ValueError):
            return
        for _ in range(300):
            try:
                os.kill(pid, 0)
            except OSError:
                return
            time.sleep(0.1)

    def start(self, timeout_s: float = 60) -> None:
        reason = why_not()
        if reason:
            raise RuntimeError(reason)
        self._stop_leftover()
        _unmount_under(self.exec_root)
        shutil.rmtree(self.exec_root, ignore_errors=True)
        self.exec_root.mkdir(parents=True)
        self.data_root.mkdir(parents=True, exist_ok=True)
        self.state = HostState.now()
        command = [
            DOCKERD,
            *("--data-root", str(self.data_root), "--exec-root", str(self.exec_root)),
            *("--pidfile", str(self.pidfile), "--host", f"unix://{self.socket}"),
            *("--storage-driver", "overlay2", "--mtu", str(_mtu())),
        ]
        with self.log_path.open("ab") as out:
            self.process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"dockerd exited ({self.process.returncode}): {self.log_tail()}")
            if self.docker("version", check=False, timeout=10).returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError(f"dockerd did not answer within {timeout_s:.0f} s: {self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop the daemon (its containers with it) and leave the host as it found it."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        _unmount_under(self.exec_root, self.data_root)
        if self.state:
            self.state.restore()

    def leftovers(self) -> list[str]:
        """After ``stop()``: what is still changed on the host (links, rules, ip_forward, mounts)."""
        found = self.state.differences(HostState.now()) if self.state else []
        roots = (str(self.exec_root.resolve()), str(self.data_root.resolve()))
        mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
        return found + [f"mount {point}" for point in mounts if point.startswith(roots)]

    # -- the base image ----------------------------------------------------------------------

    def base_image(self) -> str:
        """The tag of a Debian base image for deploy/docker/Dockerfile's BASE_IMAGE, made once."""
        recipe = hashlib.sha256()
        for part in (SUITE, MIRROR, *BASE_PACKAGES, SOURCES, PIP_CONF):
            recipe.update(part.encode() + b"\0")
        for ca in [HOST_CA_BUNDLE, *sorted(HOST_EXTRA_CAS.glob("*.crt"))]:
            if ca.is_file():
                recipe.update(ca.read_bytes())
        tag = f"imagerec-base:{SUITE}-{recipe.hexdigest()[:12]}"
        if self.docker("image", "inspect", tag, check=False).returncode == 0:
            return tag
        with tempfile.TemporaryDirectory(dir=self.data_root.parent) as scratch:
            root = Path(scratch) / "root"
            log.info("making %s with debootstrap (about a minute)", tag)
            subprocess.run(
                [
                    DEBOOTSTRAP,
                    "--variant=minbase",
                    f"--include={','.join(BASE_PACKAGES)}",
                    SUITE,
                    str(root),
                    MIRROR,
                ],
                check=True,
                capture_output=True,
                timeout=900,
            )
            self._trust_host(root)
            (root / "etc/apt/sources.list").write_text(SOURCES)
            (root / "etc/pip.conf").write_text(PIP_CONF)
            for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for item in (root / cache).glob("*"):
                    if item.is_file():
                        item.unlink()
            tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
            subprocess.run(
                [f"{DEBIAN_BIN}/docker", "import", "--change", 'CMD ["/bin/bash"]', "-", tag],
                stdin=tar.stdout,
                env=self.env(),
                check=True,
                capture_output=True,
                timeout=600,
            )
            if tar.wait() != 0:
                raise RuntimeError(f"tar of the base image's root failed ({tar.returncode})")
        return tag

    @staticmethod
    def _trust_host(root: Path) -> None:
        """The host's certificate authorities, in the image's bundle and its extra folder."""
        target = root / "usr/local/share/ca-certificates"
        target.mkdir(parents=True, exist_ok=True)
        for ca in HOST_EXTRA_CAS.glob("*.crt"):
            shutil.copy(ca, target / ca.name)
        if HOST_CA_BUNDLE.is_file():
            shutil.copy(HOST_CA_BUNDLE, root / "etc/ssl/certs/ca-certificates.crt")
