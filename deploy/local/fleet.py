"""The local fleet: Nginx, the gateway and the model services as processes under supervisord.

``python -m deploy.local.fleet`` renders every config into the run folder and runs supervisord in
the foreground (Ctrl-C stops everything). supervisord restarts a crashed process without touching
the others. Nothing needs root: pid files, sockets, temp files and logs all live in the run folder.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from common.jobs.settings import JobSettings
from common.models import BASE_MODELS
from common.settings import load, secret, setting, with_password
from common.tenancy.keys import admin_key
from common.tenancy.settings import AuthSettings
from common.training.settings import TrainingSettings
from deploy.nginx import render as nginx_config
from deploy.settings import (
    GATEWAY_THREADS,
    GATEWAY_WORKERS,
    SERVICE_THREADS,
    NginxSettings,
    model_stop_grace_s,
)

ROOT = Path(__file__).resolve().parents[2]
MODEL_SERVICES = BASE_MODELS


@dataclass(frozen=True)
class LocalFleetSettings:
    """Local fleet layout (``FLEET_<FIELD>``); model and gateway settings pass through unchanged.
    Nginx's limits are the shared ``deploy.settings.NginxSettings`` (``FLEET_NGINX_<FIELD>``)."""

    run_dir: str = setting(str(ROOT / "run"), "folder for configs, pid files, sockets and logs")
    host: str = setting("127.0.0.1", "address every process binds to")
    nginx_port: int = setting(8080, "public port (Nginx)")
    gateway_port: int = setting(8000, "gateway port")
    nginx_grpc_port: int = setting(8081, "public port of the v2 gRPC service (Nginx)")
    gateway_grpc_port: int = setting(8001, "the gateway workers' v2 gRPC port (GATEWAY_GRPC_BIND)")
    vgg16_port: int = setting(8501, "VGG16 service port")
    resnet50_port: int = setting(8502, "ResNet50 service port")
    inceptionv3_port: int = setting(8503, "InceptionV3 service port")
    models: tuple[str, ...] = setting(MODEL_SERVICES, "model services to start")
    replicas: tuple[str, ...] = setting((), "replicas per model as name=count, e.g. resnet50=2 (others: 1)")
    replica_port_stride: int = setting(100, "replica k (from 0) of a model listens on its port + k x this")
    service_threads: int = setting(
        SERVICE_THREADS, "Gunicorn threads per model service: they decode, feed its batcher and wait"
    )
    gateway_workers: int = setting(GATEWAY_WORKERS, "gateway Gunicorn workers")
    gateway_threads: int = setting(GATEWAY_THREADS, "threads per gateway worker")
    redis: bool = setting(
        True, "run redis-server and set REDIS_URL: one rate-limit count and cache for every gateway worker"
    )
    redis_port: int = setting(6380, "Redis port (not 6379, so a system Redis is left alone)")
    redis_maxmemory: str = setting(
        "1gb",
        "Redis memory for the queue, job records, keys and rate limits; never evicted: past it, writes "
        "fail and the fleet answers 503 (jobs_unavailable) instead of the machine running out",
    )
    cache_redis_port: int = setting(6381, "the response cache's own Redis (evicts, keeps nothing on disk)")
    cache_maxmemory: str = setting("256mb", "the response cache's Redis memory: least recently used go first")
    workers: bool = setting(
        True, "run a job worker (Celery, JOBS_WORKER_PROCESSES processes) for POST /v1/jobs; needs redis"
    )
    nginx_workers: int = setting(1, "Nginx worker processes")
    logs_to_console: bool = setting(True, "stream every process's log to the terminal")


@dataclass(frozen=True)
class ExtraService:
    """Another model service started beside the ImageNet ones: any WSGI factory, its own settings."""

    name: str
    port: int
    app: str
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def custom(
        cls,
        name: str,
        port: int,
        model_path: str,
        labels_path: str,
        input_size: int,
        preprocessing: str = "tf",
    ) -> ExtraService:
        """A ``.keras`` model with a labels file, served by ``services.keras_file``."""
        return cls(
            name,
            port,
            "services.keras_file:create_app()",
            {
                "KERAS_FILE_NAME": name,
                "KERAS_FILE_LABELS": labels_path,
                "KERAS_FILE_INPUT_SIZE": str(input_size),
                "KERAS_FILE_PREPROCESSING": preprocessing,
                f"{name.upper()}_WEIGHTS": model_path,
            },
        )


@dataclass
class Fleet:
    settings: LocalFleetSettings
    extra: list[ExtraService] = field(default_factory=list)
    nginx: NginxSettings = field(default_factory=NginxSettings)

    @property
    def run_dir(self) -> Path:
        return Path(self.settings.run_dir)

    @property
    def url(self) -> str:
        return f"http://{self.settings.host}:{self.settings.nginx_port}"

    @property
    def grpc_address(self) -> str:
        """host:port of the v2 gRPC service, through Nginx."""
        return f"{self.settings.host}:{self.settings.nginx_grpc_port}"

    @property
    def nginx_temp_dir(self) -> Path:
        """Nginx's temp files. As root its workers run as nobody, who may not be able to traverse
        the run folder, so they get a world-traversable folder of their own under /tmp."""
        if os.geteuid() != 0:
            return self.run_dir / "nginx" / "tmp"
        digest = hashlib.sha1(str(self.run_dir.resolve()).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"imagerec-nginx-{digest}"

    def service_ports(self) -> dict[str, int]:
        """Each model's first replica's port."""
        ports = {name: getattr(self.settings, f"{name}_port") for name in self.settings.models}
        return ports | {extra.name: extra.port for extra in self.extra}

    def replica_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(self.service_ports(), 1)
        for pair in self.settings.replicas:
            name, _, count = pair.partition("=")
            if name.strip() not in counts or not count.strip().isdigit() or int(count) < 1:
                raise ValueError(
                    f"FLEET_REPLICAS: expected <model>=<count> for one of {sorted(counts)}, got {pair!r}"
                )
            counts[name.strip()] = int(count)
        return counts

    def replicas(self) -> dict[str, list[tuple[str, int]]]:
        """Per model: (supervisord program, port) of every replica - ``resnet50``, ``resnet50-2``..."""
        stride, counts = self.settings.replica_port_stride, self.replica_counts()
        return {
            name: [(name if k == 0 else f"{name}-{k + 1}", port + k * stride) for k in range(counts[name])]
            for name, port in self.service_ports().items()
        }

    def environment(self) -> dict[str, str]:
        """What every process sees on top of the caller's environment: where the replicas are."""
        host = self.settings.host
        env = {
            f"{name.upper()}_URLS": ",".join(f"http://{host}:{port}" for _, port in replicas)
            for name, replicas in self.replicas().items()
        }
        env["GATEWAY_MODELS"] = ",".join(self.service_ports())
        env.setdefault("GATEWAY_ENSEMBLE_MODELS", ",".join(self.settings.models))
        env["GATEWAY_REQUEST_THREADS"] = str(self.settings.gateway_threads)  # sizes its fan-out pool
        if self.settings.redis:
            env["REDIS_URL"] = self.redis_url
            # The cache may evict and the queue must not: one Redis each (a policy is per server).
            env["GATEWAY_CACHE_REDIS_URL"] = os.environ.get("GATEWAY_CACHE_REDIS_URL") or self.cache_redis_url
        env["JOBS_DIR"] = os.environ.get("JOBS_DIR") or str(self.run_dir / "jobs")
        # The admin key: IMAGEREC_ADMIN_KEY when set, else generated once into the run folder.
        env["AUTH_ADMIN_KEY_FILE"] = os.environ.get("AUTH_ADMIN_KEY_FILE") or str(self.run_dir / "admin.key")
        # Custom models trained here: published by the trainer, served by the base models' services.
        env["CUSTOM_MODELS_DIR"] = os.environ.get("CUSTOM_MODELS_DIR") or str(self.run_dir / "custom-models")
        return env | self.secret_env()

    def secret_env(self) -> dict[str, str]:
        """The Redis password and the callbacks' signing key, as compose has them: the caller's
        (``REDIS_PASSWORD``, ``JOBS_CALLBACK_SECRET`` or their ``_FILE``), else files made once in
        the run folder. Files, not values: the environment shows in ``ps e``."""
        env = {}
        for name, file_name in (
            ("REDIS_PASSWORD", "redis_password"),
            ("JOBS_CALLBACK_SECRET", "callback_secret"),
        ):
            if not (os.environ.get(name) or os.environ.get(f"{name}_FILE")):
                env[f"{name}_FILE"] = str(self._secret(file_name))
        return env

    def _secret(self, name: str) -> Path:
        """``run/secrets/<name>``: random, written once (0600, in a 0700 folder), never replaced."""
        folder = self.run_dir / "secrets"
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o700)
        path = folder / name
        if not path.exists() or not path.read_text().strip():
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(descriptor, "w") as file:
                file.write(secrets.token_urlsafe(32) + "\n")
        return path

    @property
    def redis_password(self) -> str:
        return secret({**os.environ, **self.secret_env()}, "REDIS_PASSWORD")

    def authenticated(self, url: str) -> str:
        """``url`` (one of this fleet's Redis URLs) with its password, for a client of our own."""
        return with_password(url, {"REDIS_PASSWORD": self.redis_password})

    @property
    def redis_url(self) -> str:
        return f"redis://{self.settings.host}:{self.settings.redis_port}/0"

    @property
    def cache_redis_url(self) -> str:
        return f"redis://{self.settings.host}:{self.settings.cache_redis_port}/0"

    def _gunicorn(self, app: str, port: int, workers: int, threads: int) -> str:
        return (
            f"{sys.executable} -m gunicorn --config {ROOT}/deploy/gunicorn.conf.py --chdir {ROOT} "
            f"--bind {self.settings.host}:{port} --workers {workers} --threads {threads} '{app}'"
        )

    def _metrics_env(self, program: str) -> dict[str, str]:
        """Each Gunicorn process group counts in its own folder (prometheus-client multiprocess)."""
        return {"PROMETHEUS_MULTIPROC_DIR": str(self.run_dir / "metrics" / program)}

    def programs(self) -> dict[str, tuple[str, dict[str, str]]]:
        """supervisord programs: name -> (command, extra environment)."""
        s = self.settings
        programs: dict[str, tuple[str, dict[str, str]]] = {}
        apps: dict[str, tuple[str, dict[str, str]]] = {
            name: (f"services.{name}:create_app()", {}) for name in s.models
        }
        apps |= {extra.name: (extra.app, extra.env) for extra in self.extra}
        for name, replicas in self.replicas().items():
            app, env = apps[name]
            for program, port in replicas:
                # One worker per replica: one model copy per process; threads feed it.
                programs[program] = (
                    self._gunicorn(app, port, 1, s.service_threads),
                    {**env, **self._metrics_env(program)},
                )
        programs["gateway"] = (
            self._gunicorn("gateway.app:serve()", s.gateway_port, s.gateway_workers, s.gateway_threads),
            {**self._metrics_env("gateway"), "GATEWAY_GRPC_BIND": f"{s.host}:{s.gateway_grpc_port}"},
        )
        if s.redis:
            # Persistence on (append-only file under the run folder): counts and cached answers,
            # and later the job queue, survive a restart of Redis.
            (self.run_dir / "redis").mkdir(parents=True, exist_ok=True)
            redis = shutil.which("redis-server") or "/usr/bin/redis-server"
            # A password, as compose's Redis has: any local user could otherwise write a key record.
            # In a config file of the owner's alone, not on the command line that `ps` shows.
            conf = self.run_dir / "redis" / "auth.conf"
            descriptor = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(descriptor, "w") as file:
                quoted = self.redis_password.replace("\\", "\\\\").replace('"', '\\"')
                file.write(f'requirepass "{quoted}"\n')
            programs["redis"] = (
                f"{redis} {conf} --bind {s.host} --port {s.redis_port} --dir {self.run_dir}/redis "
                f"--appendonly yes --save '' --maxmemory {s.redis_maxmemory} "
                "--maxmemory-policy noeviction",
                {},
            )
            programs["redis-cache"] = (
                f"{redis} {conf} --bind {s.host} --port {s.cache_redis_port} --dir {self.run_dir}/redis "
                f"--appendonly no --save '' --maxmemory {s.cache_maxmemory} "
                "--maxmemory-policy allkeys-lru",
                {},
            )
        if s.redis and s.workers:
            # The job worker: Celery's prefork pool, one task per process at a time.
            jobs = load(JobSettings, ("JOBS_",))
            programs["worker"] = (
                f"{sys.executable} -m celery -A workers.app worker -Q {jobs.queue} "
                f"--concurrency {jobs.worker_processes} --hostname worker@{s.host}-{s.nginx_port} "
                "--without-gossip --without-mingle --loglevel INFO",
                {},
            )
            # The trainer: training jobs on a queue of their own, one at a time, each in a fresh
            # process (TensorFlow's memory goes back when a training ends).
            training = load(TrainingSettings, ("TRAINING_",))
            programs["trainer"] = (
                f"{sys.executable} -m celery -A workers.app worker -Q {training.queue} "
                f"--concurrency 1 --max-tasks-per-child 1 --hostname trainer@{s.host}-{s.nginx_port} "
                "--without-gossip --without-mingle --loglevel INFO",
                {},
            )
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        programs["nginx"] = (
            f"{nginx} -p {self.run_dir}/nginx -c {self.run_dir}/nginx/nginx.conf -g 'daemon off;'",
            {},
        )
        return programs

    def render(self) -> Path:
        """Write the Nginx and supervisord configs; returns the supervisord config's path."""
        s = self.settings
        nginx_dir, log_dir = self.run_dir / "nginx", self.run_dir / "logs"
        for folder in (nginx_dir, log_dir):
            folder.mkdir(parents=True, exist_ok=True)
        temp_dir = self.nginx_temp_dir
        temp_dir.mkdir(parents=True, exist_ok=True)
        user = ""
        if os.geteuid() == 0:
            temp_dir.chmod(0o755)
            user = "user nobody nogroup;"
        values = {
            "NGINX_PORT": f"{s.host}:{s.nginx_port}",
            "GATEWAY_UPSTREAM": f"{s.host}:{s.gateway_port}",
            "NGINX_GRPC_PORT": f"{s.host}:{s.nginx_grpc_port}",
            "GATEWAY_GRPC_UPSTREAM": f"{s.host}:{s.gateway_grpc_port}",
            **self.nginx.template_values(),
            "NGINX_WORKERS": str(s.nginx_workers),
            "NGINX_DIR": str(nginx_dir),
            "NGINX_ERROR_LOG": str(log_dir / "nginx-error.log"),
            "NGINX_TEMP_DIR": str(temp_dir),
            "NGINX_USER_DIRECTIVE": user,
        }
        nginx_config.render(values, nginx_dir)
        conf = self.run_dir / "supervisord.conf"
        conf.write_text(self._supervisord_conf(log_dir))
        return conf

    def _supervisord_conf(self, log_dir: Path) -> str:
        run = self.run_dir
        lines = [
            "[supervisord]",
            "nodaemon=true",
            f"logfile={log_dir}/supervisord.log",
            f"pidfile={run}/supervisord.pid",
            f"childlogdir={log_dir}",
            "",
            "[unix_http_server]",
            f"file={run}/supervisor.sock",
            "chmod=0700",
            "",
            "[rpcinterface:supervisor]",
            "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
            "",
            "[supervisorctl]",
            f"serverurl=unix://{run}/supervisor.sock",
            "",
        ]
        for name, (command, env) in self.programs().items():
            lines += [
                f"[program:{name}]",
                f"command={command.replace('%', '%%')}",
                f"directory={ROOT}",
                "autostart=true",
                "autorestart=true",
                "startsecs=1",
                "startretries=10",
                "stopsignal=" + ("QUIT" if name == "nginx" else "TERM"),
                f"stopwaitsecs={model_stop_grace_s()}",
                # A Gunicorn master alone gets the TERM: it stops its workers itself, after a model
                # service's drain (common/draining.py); a worker signalled directly stops at once.
                "stopasgroup=" + ("false" if "gunicorn" in command else "true"),
                "killasgroup=true",
                "redirect_stderr=true",
            ]
            if env:
                quoted = ",".join(f'{k}="{v}"'.replace("%", "%%") for k, v in env.items())
                lines.append(f"environment={quoted}")
            if self.settings.logs_to_console:
                lines += ["stdout_logfile=/dev/stdout", "stdout_logfile_maxbytes=0"]
            else:
                lines += [f"stdout_logfile={log_dir}/{name}.log", "stdout_logfile_maxbytes=20MB"]
            lines.append("")
        return "\n".join(lines)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "supervisor.supervisord", "-n", "-c", str(self.render())]


def main() -> None:
    settings = load(LocalFleetSettings, ("FLEET_",))
    fleet = Fleet(settings, nginx=load(NginxSettings, ("FLEET_NGINX_",)))
    command = fleet.command()
    os.environ.update(fleet.environment())
    auth = AuthSettings.from_env()
    admin_key(auth)  # generated now (0600) unless IMAGEREC_ADMIN_KEY is set, so it can be named
    where = "IMAGEREC_ADMIN_KEY" if auth.admin_key else auth.admin_key_file
    print(
        f"imagerec fleet: {fleet.url}  (models load in ~30-60 s; watch {fleet.url}/v1/models)\n"
        f"  try: curl -F file=@tests/fixtures/chelsea.jpg '{fleet.url}/v1/predict?model=resnet50'\n"
        f"  admin key: {where} (python -m client finds it; jobs, training and keys need a key)\n"
        f"  configs and logs: {fleet.run_dir}   stop: Ctrl-C",
        flush=True,
    )
    os.execv(command[0], command)


if __name__ == "__main__":
    main()
