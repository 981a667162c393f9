"""Deployment files: the rendered Nginx config passes `nginx -t`; compose (and Kubernetes, for the
trainer and the custom models' folder) match the topology."""

from __future__ import annotations

import ipaddress
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from common.draining import DrainSettings
from common.jobs.settings import JobSettings
from common.training.settings import TrainingSettings
from deploy.k8s import render
from deploy.local.fleet import ROOT, ExtraService, Fleet, LocalFleetSettings
from deploy.nginx import render as nginx_config
from deploy.settings import (
    CUSTOM_MODELS_DIR,
    GATEWAY_THREADS,
    GATEWAY_WORKERS,
    JOBS_DIR,
    SERVICE_THREADS,
    NginxSettings,
    model_stop_grace_s,
    trainer_command,
    trainer_stop_grace_s,
    worker_command,
    worker_stop_grace_s,
)
from gateway.settings import GatewaySettings
from serving.settings import ServiceSettings

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
DOCKERFILE = (ROOT / "deploy" / "docker" / "Dockerfile").read_text()
GATEWAY_STAGE = DOCKERFILE.split("AS gateway", 1)[1].split("\nFROM ", 1)[0]
BASE_STAGE = DOCKERFILE.split("AS os", 1)[1].split("\nFROM ", 1)[0]
[(TRAINER_FROM, TRAINER_STAGE)] = re.findall(
    r"^FROM (\S+) AS trainer\n(.*?)(?=^FROM |\Z)", DOCKERFILE, re.M | re.S
)
MODEL_PORTS = {"vgg16": 8501, "resnet50": 8502, "inceptionv3": 8503}


@pytest.fixture
def shapes_fleet(tmp_path: Path) -> Fleet:
    extra = ExtraService.custom("shapes", 9600, "/m/shapes.keras", "/m/labels.json", 64)
    return Fleet(LocalFleetSettings(run_dir=str(tmp_path / "run"), nginx_port=18080), [extra])


@pytest.mark.skipif(not (shutil.which("nginx") or Path("/usr/sbin/nginx").exists()), reason="needs nginx")
def test_rendered_nginx_config_is_valid(shapes_fleet: Fleet) -> None:
    shapes_fleet.render()
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    conf = shapes_fleet.run_dir / "nginx" / "nginx.conf"
    result = subprocess.run(
        [nginx, "-t", "-p", str(conf.parent), "-c", str(conf)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    rendered = (shapes_fleet.run_dir / "nginx" / "imagerec.conf").read_text()
    assert "${" not in rendered and "client_max_body_size 10m;" in rendered


def test_the_local_nginx_takes_its_limits_from_the_shared_settings(tmp_path: Path) -> None:
    limits = NginxSettings(max_body_size="3m", proxy_read_timeout="90s")
    fleet = Fleet(LocalFleetSettings(run_dir=str(tmp_path)), nginx=limits)
    fleet.render()
    rendered = (fleet.run_dir / "nginx" / "imagerec.conf").read_text()
    assert "client_max_body_size 3m;" in rendered and "proxy_read_timeout 90s;" in rendered


@pytest.mark.skipif(not (shutil.which("nginx") or Path("/usr/sbin/nginx").exists()), reason="needs nginx")
@pytest.mark.parametrize(
    ("edge", "directive"),
    [
        (NginxSettings(), "limit_req zone=imagerec_anonymous burst=500 delay=100;"),
        (
            NginxSettings(anonymous_rate="5r/m", anonymous_no_delay=0),
            "limit_req zone=imagerec_anonymous burst=500;",
        ),
        (NginxSettings(anonymous_rate=""), "# no limit for requests without a key"),
    ],
)
def test_the_edge_limit_for_requests_without_a_key_renders_valid_or_off(
    tmp_path: Path, edge: NginxSettings, directive: str
) -> None:
    fleet = Fleet(LocalFleetSettings(run_dir=str(tmp_path)), nginx=edge)
    fleet.render()
    conf = fleet.run_dir / "nginx" / "nginx.conf"
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    result = subprocess.run(
        [nginx, "-t", "-p", str(conf.parent), "-c", str(conf)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    rendered = (fleet.run_dir / "nginx" / "imagerec.conf").read_text()
    assert rendered.count(directive) == 2  # REST and gRPC
    assert ("limit_req zone=" in rendered) == bool(edge.anonymous_rate)


@pytest.mark.parametrize("rate", ["100", "100r/h", "fast", "100 r/s"])
def test_a_malformed_edge_rate_is_refused_with_the_variable_named(rate: str) -> None:
    with pytest.raises(ValueError, match="FLEET_NGINX_ANONYMOUS_RATE"):
        NginxSettings(anonymous_rate=rate).template_values()


def test_the_local_redis_has_a_password_and_callbacks_are_signed(
    shapes_fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As compose has them: made once in the run folder, the owner's alone, passed as files (never
    on a command line or in the environment, which ``ps`` shows)."""
    for name in (
        "REDIS_PASSWORD",
        "REDIS_PASSWORD_FILE",
        "JOBS_CALLBACK_SECRET",
        "JOBS_CALLBACK_SECRET_FILE",
    ):
        monkeypatch.delenv(name, raising=False)
    text = shapes_fleet.render().read_text()
    env = shapes_fleet.environment()
    password = Path(env["REDIS_PASSWORD_FILE"]).read_text().strip()
    signing = Path(env["JOBS_CALLBACK_SECRET_FILE"]).read_text().strip()
    assert len(password) >= 32 and len(signing) >= 32 and password != signing
    for path in (
        env["REDIS_PASSWORD_FILE"],
        env["JOBS_CALLBACK_SECRET_FILE"],
        shapes_fleet.run_dir / "redis" / "auth.conf",
    ):
        assert Path(path).stat().st_mode & 0o077 == 0, path
    assert (shapes_fleet.run_dir / "redis" / "auth.conf").read_text() == f'requirepass "{password}"\n'
    assert password not in text and signing not in text and password not in " ".join(env.values())
    assert "protected-mode no" not in text and text.count("redis/auth.conf --bind") == 2
    assert JobSettings.from_env(env).callback_secret == signing  # what the workers sign with
    assert shapes_fleet.environment() == env  # made once: the same files again
    assert shapes_fleet.authenticated(shapes_fleet.redis_url) == f"redis://:{password}@127.0.0.1:6380/0"


def test_supervisord_runs_every_process_with_restarts(shapes_fleet: Fleet) -> None:
    text = shapes_fleet.render().read_text()
    programs = re.findall(r"^\[program:([\w-]+)\]", text, re.MULTILINE)
    assert programs == [
        *("vgg16", "resnet50", "inceptionv3", "shapes", "gateway", "redis", "redis-cache", "worker"),
        *("trainer", "nginx"),
    ]
    assert text.count("autorestart=true") == len(programs)
    assert "--appendonly yes" in text and f"--dir {shapes_fleet.run_dir}/redis" in text  # persistence on
    assert shapes_fleet.environment()["REDIS_URL"] == "redis://127.0.0.1:6380/0"
    # The queue is never evicted, the cache is, each in a Redis of its own with a memory bound.
    assert "--port 6380" in text and "--maxmemory 1gb --maxmemory-policy noeviction" in text
    assert "--port 6381" in text and "--maxmemory 256mb --maxmemory-policy allkeys-lru" in text
    assert shapes_fleet.environment()["GATEWAY_CACHE_REDIS_URL"] == "redis://127.0.0.1:6381/0"
    assert shapes_fleet.environment()["GATEWAY_REQUEST_THREADS"] == "64"
    assert "'services.resnet50:create_app()'" in text and "--workers 1" in text
    sections = dict(re.findall(r"^\[program:([\w-]+)\]\n(.*?)(?=^\[|\Z)", text, re.MULTILINE | re.DOTALL))
    for name in ("vgg16", "resnet50", "inceptionv3", "shapes", "gateway"):
        # The Gunicorn master alone is stopped: it drains, then stops its workers itself.
        assert (
            "stopasgroup=false" in sections[name] and f"stopwaitsecs={model_stop_grace_s()}" in sections[name]
        )
    assert "stopasgroup=true" in sections["worker"]
    assert 'SHAPES_WEIGHTS="/m/shapes.keras"' in text
    assert shapes_fleet.environment()["RESNET50_URLS"] == "http://127.0.0.1:8502"
    assert shapes_fleet.environment()["GATEWAY_MODELS"] == "vgg16,resnet50,inceptionv3,shapes"


def test_redis_can_be_left_out(tmp_path: Path) -> None:
    fleet = Fleet(LocalFleetSettings(run_dir=str(tmp_path), redis=False))
    assert "redis" not in fleet.programs() and "REDIS_URL" not in fleet.environment()
    assert "worker" not in fleet.programs() and "trainer" not in fleet.programs()  # queues are in Redis


def test_the_timeouts_nest_from_the_edge_inwards() -> None:
    """Nginx waits longer than the gateway's default deadline, which no service default exceeds:
    every request's deadline passes (504 from the fleet, in JSON) before a proxy gives up on it."""
    nginx_s = float(NginxSettings().proxy_read_timeout.removesuffix("s"))
    gateway = GatewaySettings()
    service = ServiceSettings()
    assert nginx_s * 1000 > gateway.default_deadline_ms >= service.default_deadline_ms
    assert gateway.member_timeout_s * 1000 >= gateway.default_deadline_ms


def test_gunicorn_threads_cover_the_queue_admission_can_see() -> None:
    """A request waiting for a thread is invisible to admission: every image the queue may hold
    (one per request at worst), plus the batches running - one per stream, two for int8 on 2
    cores - must have a thread of its own."""
    service = ServiceSettings()
    assert SERVICE_THREADS >= service.max_queue_images + 2 * service.max_batch_size
    assert LocalFleetSettings().service_threads == SERVICE_THREADS
    assert LocalFleetSettings().gateway_threads == GATEWAY_THREADS == GatewaySettings().request_threads
    assert GATEWAY_WORKERS * GATEWAY_THREADS >= SERVICE_THREADS  # the gateway can fill a model's queue


def test_the_images_run_the_same_threads_as_the_local_fleet() -> None:
    assert f'"--workers", "{GATEWAY_WORKERS}", "--threads", "{GATEWAY_THREADS}"' in DOCKERFILE
    assert f"THREADS={SERVICE_THREADS}" in DOCKERFILE
    assert f"GATEWAY_REQUEST_THREADS={GATEWAY_THREADS}" in DOCKERFILE


def test_the_gateway_image_can_run_the_job_worker() -> None:
    """The worker is the gateway's image with another command: it needs the workers package, the
    shared jobs folder writable by the image's user, and a Prometheus folder of its own (Gunicorn
    makes the gateway's; without it the worker's first model call raises)."""
    assert re.search(r"^COPY workers ./workers$", GATEWAY_STAGE, re.MULTILINE)
    assert re.search(rf"^ENV .*\bJOBS_DIR={JOBS_DIR}\b", GATEWAY_STAGE, re.MULTILINE)
    [metrics] = re.findall(r"PROMETHEUS_MULTIPROC_DIR=(\S+)", DOCKERFILE)
    [(made, owner, owned)] = re.findall(r"mkdir -p ([^&]+)&& chown (\w+):\w+ ([^\n]+)", GATEWAY_STAGE)
    assert {JOBS_DIR, metrics} <= set(made.split()) & set(owned.split())
    assert owner == re.findall(r"^USER (\w+)", GATEWAY_STAGE, re.MULTILINE)[-1]


def test_replicas_get_their_own_programs_ports_and_urls(tmp_path: Path) -> None:
    extra = ExtraService.custom("shapes", 9600, "/m/shapes.keras", "/m/labels.json", 64)
    settings = LocalFleetSettings(
        run_dir=str(tmp_path), models=("resnet50",), replicas=("resnet50=2", "shapes=3")
    )
    fleet = Fleet(settings, [extra])
    programs = fleet.programs()
    assert [p for p in programs if p.startswith(("resnet50", "shapes"))] == [
        "resnet50",
        "resnet50-2",
        "shapes",
        "shapes-2",
        "shapes-3",
    ]
    assert "--bind 127.0.0.1:8602" in programs["resnet50-2"][0]
    assert programs["shapes-3"][1]["SHAPES_WEIGHTS"] == "/m/shapes.keras"
    assert fleet.environment()["RESNET50_URLS"] == "http://127.0.0.1:8502,http://127.0.0.1:8602"
    assert fleet.environment()["SHAPES_URLS"].count(",") == 2


@pytest.mark.parametrize("pair", ["alexnet=2", "resnet50=0", "resnet50=two", "resnet50"])
def test_bad_replica_counts_are_refused(tmp_path: Path, pair: str) -> None:
    with pytest.raises(ValueError, match="FLEET_REPLICAS"):
        Fleet(LocalFleetSettings(run_dir=str(tmp_path), replicas=(pair,))).programs()


def test_compose_has_the_same_topology() -> None:
    services = COMPOSE["services"]
    assert set(services) == {*MODEL_PORTS, "gateway", "worker", "trainer", "redis", "redis-cache", "nginx"}
    assert [p for s in services.values() for p in s.get("ports", [])] == [  # Nginx's alone: REST, gRPC
        "${NGINX_PUBLISHED_ADDRESS:-0.0.0.0}:${NGINX_PUBLISHED_PORT:-8080}:8080",
        "${NGINX_PUBLISHED_ADDRESS:-0.0.0.0}:${NGINX_PUBLISHED_GRPC_PORT:-8081}:8081",
    ]
    nginx, gateway = services["nginx"]["environment"], services["gateway"]["environment"]
    assert nginx["GATEWAY_GRPC_UPSTREAM"] == "gateway:" + gateway["GATEWAY_GRPC_BIND"].rpartition(":")[2]
    for model, port in MODEL_PORTS.items():
        service = services[model]
        assert service["build"]["target"] == "model" and service["environment"]["MODEL"] == model
        assert service["environment"]["PORT"] == str(port)
        assert f"127.0.0.1:{port}/health/ready" in " ".join(service["healthcheck"]["test"])
        assert "keras-cache:/keras" in service["volumes"]
        assert "container_name" not in service  # would forbid --scale
    assert services["nginx"]["depends_on"]["gateway"]["condition"] == "service_healthy"
    assert "keras-cache" in COMPOSE["volumes"]


def test_compose_worker_is_the_gateway_image_with_its_environment_and_jobs_volume() -> None:
    services = COMPOSE["services"]
    gateway, worker = services["gateway"], services["worker"]
    assert (worker["build"], worker["image"]) == (gateway["build"], gateway["image"])
    assert worker["command"] == worker_command()
    assert worker["environment"] == gateway["environment"]
    assert "container_name" not in worker  # scale with --scale worker=N
    # One named volume at JOBS_DIR in both: the gateway writes a job's images, the worker reads them.
    assert gateway["environment"]["JOBS_DIR"] == JOBS_DIR
    for service in (gateway, worker):
        assert f"jobs:{JOBS_DIR}" in service["volumes"]
    assert "jobs" in COMPOSE["volumes"]
    assert {name: dep["condition"] for name, dep in worker["depends_on"].items()} == {
        "redis": "service_healthy",
        "gateway": "service_healthy",  # so are the models it calls
    }
    assert worker["stop_grace_period"] == f"{worker_stop_grace_s()}s"
    assert worker_stop_grace_s() >= JobSettings().chunk_budget_s + 15


def test_the_worker_command_follows_the_job_settings() -> None:
    jobs = JobSettings(queue="batch", worker_processes=3)
    command = worker_command(jobs)
    assert command[command.index("-Q") + 1] == "batch" and command[command.index("--concurrency") + 1] == "3"
    assert worker_stop_grace_s(JobSettings(chunk_budget_s=50, visibility_timeout_s=90)) == (
        worker_stop_grace_s() + 20
    )


def test_compose_redis_keeps_the_queue_across_restarts() -> None:
    services = COMPOSE["services"]
    redis = services["redis"]
    command = redis["command"][-1].split()  # sh -c "exec redis-server ...": the password is a secret
    assert redis["build"]["target"] == "redis" and command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction" and "--maxmemory" in command
    volume = redis["volumes"][0].split(":")
    assert volume[1] == "/data" and volume[0] in COMPOSE["volumes"]  # a named volume, not the container's
    assert urlsplit(services["gateway"]["environment"]["REDIS_URL"]).netloc == "redis:6379"
    assert "redis" in services["gateway"]["depends_on"]
    assert "ports" not in redis  # only Nginx is published


@pytest.mark.parametrize("model", MODEL_PORTS)
def test_compose_gateway_finds_every_container_of_a_model_by_its_service_name(model: str) -> None:
    """Docker's DNS answers a service name with every container of it: re-resolved every
    GATEWAY_DNS_REFRESH_S, ``--scale resnet50=3`` gives the gateway three replicas."""
    gateway_env = COMPOSE["services"]["gateway"]["environment"]
    variable = f"{model.upper()}_URLS"
    assert gateway_env[variable] == f"${{{variable}:-http://{model}:{MODEL_PORTS[model]}}}"
    assert re.fullmatch(r"\$\{GATEWAY_DNS_REFRESH_S:-[1-9]\d*\}", gateway_env["GATEWAY_DNS_REFRESH_S"])


@pytest.mark.parametrize("model", MODEL_PORTS)
def test_a_stopping_model_container_gets_its_drain_and_gunicorns_graceful_stop(model: str) -> None:
    assert COMPOSE["services"][model]["stop_grace_period"] == f"{model_stop_grace_s()}s"
    assert model_stop_grace_s() >= DrainSettings().drain_s + 30


def test_compose_nginx_has_the_shared_limits() -> None:
    assert NginxSettings().template_values().items() <= COMPOSE["services"]["nginx"]["environment"].items()


def test_compose_references_files_that_exist() -> None:
    dockerfile = ROOT / "deploy" / "docker" / "Dockerfile"
    stages = re.findall(r"^FROM \S+ AS (\w+)", DOCKERFILE, re.MULTILINE)
    for service in COMPOSE["services"].values():
        if "build" in service:
            assert (ROOT / service["build"]["dockerfile"]) == dockerfile
            assert service["build"]["target"] in stages
    # Nginx is the project's image: the templates the local fleet renders, rendered the same way.
    assert COMPOSE["services"]["nginx"]["build"]["target"] == "nginx"
    assert re.search(r"^COPY deploy/nginx ./deploy/nginx$", DOCKERFILE, re.MULTILINE)
    needed = nginx_config.names() - set(nginx_config.container_values({}))  # the image sets its paths
    assert needed <= set(COMPOSE["services"]["nginx"]["environment"])


def test_compose_is_valid_against_the_compose_specification() -> None:
    """The Compose Specification's JSON schema (tests/fixtures/ATTRIBUTION.md), with nothing only
    Compose v2 reads: Debian's docker-compose 1.29 refuses a top-level ``name``."""
    schema = jsonschema.Draft201909Validator(
        json.loads((ROOT / "tests" / "fixtures" / "compose-spec.json").read_text())
    )
    document = dict(COMPOSE)
    schema.validate(document)
    assert "name" not in document
    typo = {**document["services"]["gateway"], "healtcheck": {}}
    with pytest.raises(jsonschema.ValidationError, match="healtcheck"):  # strict enough to catch typos
        schema.validate({**document, "services": {**document["services"], "gateway": typo}})


# Custom classes: the trainer, and the custom models' folder (CUSTOM_MODELS_DIR) it shares.


def option(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def test_the_trainer_command_follows_the_training_settings() -> None:
    """One training at a time, each in a fresh process (TensorFlow's memory goes back after it),
    from the training queue - never the inference jobs' queue."""
    command = trainer_command(TrainingSettings(queue="custom"))
    assert command[:7] == ["python", "-m", "celery", "-A", "workers.app", "worker", "-Q"]
    assert option(command, "-Q") == "custom"
    assert option(command, "--concurrency") == option(command, "--max-tasks-per-child") == "1"
    assert option(trainer_command(), "-Q") == TrainingSettings().queue != option(worker_command(), "-Q")
    assert trainer_stop_grace_s() >= TrainingSettings().publish_wait_s + 15
    longer = TrainingSettings(publish_wait_s=TrainingSettings().publish_wait_s + 30)
    assert trainer_stop_grace_s(longer) == trainer_stop_grace_s() + 30


def test_the_local_trainer_consumes_what_the_containers_do(
    shapes_fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CUSTOM_MODELS_DIR", raising=False)
    local = shlex.split(shapes_fleet.programs()["trainer"][0])
    for flag in ("-Q", "--concurrency", "--max-tasks-per-child"):
        assert option(local, flag) == option(trainer_command(), flag)
    assert local[1:6] == trainer_command()[1:6]  # -m celery -A workers.app worker
    assert shapes_fleet.environment()["CUSTOM_MODELS_DIR"] == str(shapes_fleet.run_dir / "custom-models")


def test_the_trainer_image_is_the_model_image_with_the_workers() -> None:
    """TensorFlow (Keras fits the head) comes from the model image, Celery and redis with the
    project's core dependencies; the workers package is added and the image runs the trainer."""
    assert TRAINER_FROM == "model"
    assert re.search(r"^COPY workers ./workers$", TRAINER_STAGE, re.MULTILINE)
    [cmd] = re.findall(r"^CMD (\[.*?\])\s*$", TRAINER_STAGE, re.MULTILINE | re.DOTALL)
    assert json.loads(cmd.replace("\\\n", "")) == trainer_command()
    assert re.search(rf"^ENV .*\bCUSTOM_MODELS_DIR={CUSTOM_MODELS_DIR}\b", TRAINER_STAGE, re.MULTILINE)
    assert re.search(rf"^ENV .*\bJOBS_DIR={JOBS_DIR}\b", TRAINER_STAGE, re.MULTILINE)
    core = re.search(r"^dependencies = \[(.*?)^\]", (ROOT / "pyproject.toml").read_text(), re.M | re.S)
    assert core and "celery[redis]" in core.group(1) and "redis" in core.group(1)
    # It runs as `app` (the model stage's last USER; none of its own). Its /tmp is an empty tmpfs
    # in compose, so the Celery app makes the Prometheus folder its model calls need itself.
    assert not re.search(r"^USER ", TRAINER_STAGE, re.MULTILINE)
    [metrics] = re.findall(r"PROMETHEUS_MULTIPROC_DIR=(\S+)", DOCKERFILE)
    assert metrics.startswith("/tmp/")
    assert (
        'os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)'
        in (ROOT / "workers" / "app.py").read_text()
    )


def test_every_image_has_the_custom_models_folder_owned_by_the_app_user() -> None:
    """Made in the base stage (as root), so compose copies `app`'s ownership into the empty volume
    whichever container mounts it first, and the gateway and the trainer can write there."""
    [user] = re.findall(r"useradd .* (\w+)$", BASE_STAGE, re.MULTILINE)
    [(made, owner, owned)] = re.findall(r"mkdir -p ([^&]+)&& chown (\w+):\w+ ([^\n]+)", BASE_STAGE)
    assert CUSTOM_MODELS_DIR in set(made.split()) & set(owned.split()) and owner == user


def test_compose_trainer_is_the_trainer_image_with_the_gateway_environment() -> None:
    services = COMPOSE["services"]
    gateway, worker, trainer = services["gateway"], services["worker"], services["trainer"]
    assert trainer["build"] == {**gateway["build"], "target": "trainer"}
    assert trainer["image"] not in {gateway["image"], services["resnet50"]["image"]}
    assert trainer["command"] == trainer_command()
    assert trainer["environment"] == gateway["environment"]
    assert trainer["restart"] == "unless-stopped"
    assert f"jobs:{JOBS_DIR}" in trainer["volumes"]  # it reads the training uploads
    assert trainer["depends_on"] == worker["depends_on"]
    assert trainer["stop_grace_period"] == f"{trainer_stop_grace_s()}s"


def test_compose_shares_one_custom_models_volume() -> None:
    """The trainer publishes and removes there (read-write, the repository's one writer); the model
    services, the gateway and the job worker read it. Same folder everywhere."""
    services = COMPOSE["services"]
    assert "custom-models" in COMPOSE["volumes"]
    users = {name for name, s in services.items() if "CUSTOM_MODELS_DIR" in s.get("environment", {})}
    assert users == {*MODEL_PORTS, "gateway", "worker", "trainer"}
    for name in users:
        service = services[name]
        assert service["environment"]["CUSTOM_MODELS_DIR"] == CUSTOM_MODELS_DIR
        [mount] = [v for v in service["volumes"] if v.split(":")[1] == CUSTOM_MODELS_DIR]
        read_only = "" if name == "trainer" else ":ro"
        assert mount == f"custom-models:{CUSTOM_MODELS_DIR}{read_only}", name


K8S = {(doc["kind"], doc["metadata"]["name"]): doc for doc in yaml.safe_load_all(render.OUTPUT.read_text())}


def k8s_pod(name: str) -> dict[str, Any]:
    return K8S["Deployment", name]["spec"]["template"]["spec"]


def k8s_env(name: str) -> dict[str, str]:
    return {
        e["name"]: e.get("value", e.get("valueFrom")) for e in k8s_pod(name)["containers"][0].get("env", [])
    }


def test_k8s_runs_one_trainer_with_the_gateway_environment() -> None:
    trainer = K8S["Deployment", "trainer"]
    [box] = k8s_pod("trainer")["containers"]
    assert trainer["spec"]["replicas"] == 1 and ("HorizontalPodAutoscaler", "trainer") not in K8S
    assert box["image"] == "imagerec-trainer:latest" and box["command"] == trainer_command()
    assert k8s_env("trainer") == k8s_env("gateway")
    assert "ports" not in box and not any(
        doc["kind"] == "Service" and doc["spec"]["selector"].get("app.kubernetes.io/name") == "trainer"
        for doc in K8S.values()
    )
    # TensorFlow training: a limit that holds it (bytes, from Kubernetes quantities like 2Gi).
    units = {"Mi": 2**20, "Gi": 2**30}
    memory = {kind: box["resources"][kind]["memory"] for kind in ("requests", "limits")}
    request, limit = (int(q[:-2]) * units[q[-2:]] for q in memory.values())
    assert 2**30 <= request <= limit and limit >= 2 * 2**30
    pod = k8s_pod("trainer")
    assert pod["terminationGracePeriodSeconds"] == trainer_stop_grace_s()
    assert pod["securityContext"]["fsGroup"] == k8s_pod("gateway")["securityContext"]["fsGroup"]  # writes
    assert {m["mountPath"] for m in box["volumeMounts"]} == {JOBS_DIR, CUSTOM_MODELS_DIR, render.KERAS_HOME}
    # fine-tuning copies the base from the weights file its model pods load, at the same path, read-only
    [keras] = [m for m in box["volumeMounts"] if m["mountPath"] == render.KERAS_HOME]
    served = [
        m for m in k8s_pod("resnet50")["containers"][0]["volumeMounts"] if m["mountPath"] == render.KERAS_HOME
    ]
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    }
    model_claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in k8s_pod("resnet50")["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert keras["readOnly"] and claims[keras["name"]] == model_claims[served[0]["name"]]


def test_k8s_shares_one_custom_models_claim() -> None:
    """Every pod with CUSTOM_MODELS_DIR mounts the one ReadWriteMany claim there: writable in the
    trainer alone, the repository's one writer; read-only everywhere else."""
    users = {name for kind, name in K8S if kind == "Deployment" and "CUSTOM_MODELS_DIR" in k8s_env(name)}
    assert users == {*render.MODELS, "gateway", "worker", "trainer"}
    claims = set()
    for name in users:
        assert k8s_env(name)["CUSTOM_MODELS_DIR"] == CUSTOM_MODELS_DIR
        spec = k8s_pod(name)
        [mount] = [m for m in spec["containers"][0]["volumeMounts"] if m["mountPath"] == CUSTOM_MODELS_DIR]
        assert bool(mount.get("readOnly")) == (name != "trainer"), name
        [volume] = [v for v in spec["volumes"] if v["name"] == mount["name"]]
        claims.add(volume["persistentVolumeClaim"]["claimName"])
    [claim] = claims
    assert K8S["PersistentVolumeClaim", claim]["spec"]["accessModes"] == ["ReadWriteMany"]


def test_compose_takes_every_secret_from_a_secret_file() -> None:
    services = COMPOSE["services"]
    environment = services["gateway"]["environment"]
    assert {"IMAGEREC_ADMIN_KEY", "REDIS_PASSWORD", "JOBS_CALLBACK_SECRET"}.isdisjoint(environment)
    for variable, name in (
        ("IMAGEREC_ADMIN_KEY_FILE", "admin_key"),
        ("REDIS_PASSWORD_FILE", "redis_password"),
        ("JOBS_CALLBACK_SECRET_FILE", "callback_secret"),
    ):
        assert environment[variable] == f"/run/secrets/{name}"
        assert COMPOSE["secrets"][name]["file"] == f"./run/secrets/{name}"  # what `make secrets` writes
        for service in ("gateway", "worker", "trainer"):
            assert name in services[service]["secrets"]
    for name in ("redis", "redis-cache"):
        assert "--requirepass" in services[name]["command"][-1] and services[name]["secrets"] == [
            "redis_password"
        ]
    cache = services["redis-cache"]["command"][-1].split()
    assert cache[cache.index("--maxmemory-policy") + 1] == "allkeys-lru"
    assert urlsplit(environment["GATEWAY_CACHE_REDIS_URL"]).hostname == "redis-cache"


def test_compose_gateway_believes_x_real_ip_from_nginx_alone() -> None:
    nginx = COMPOSE["services"]["nginx"]["networks"]["default"]["ipv4_address"]
    trusted = COMPOSE["services"]["gateway"]["environment"]["GATEWAY_TRUSTED_PROXIES"]
    assert trusted == f"{nginx}/32"
    subnet = COMPOSE["networks"]["default"]["ipam"]["config"][0]["subnet"]
    assert ipaddress.ip_address(nginx) in ipaddress.ip_network(subnet)


def test_make_secrets_writes_each_secret_once_in_a_folder_of_its_owners_alone(tmp_path: Path) -> None:
    """Compose bind-mounts a file secret as it is, so the containers' user must be able to read the
    file (0644); the folder keeps everyone else on the host out (0700)."""
    out = tmp_path / "secrets"
    subprocess.run(["make", "-s", "secrets", f"SECRETS={out}"], cwd=ROOT, check=True, capture_output=True)
    first = {p.name: p.read_text() for p in out.iterdir()}
    assert set(first) == {"admin_key", "redis_password", "callback_secret"}
    assert all(len(v.strip()) >= 32 for v in first.values()) and len(set(first.values())) == 3
    assert {oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {"0o644"}
    assert oct(out.stat().st_mode & 0o777) == "0o700"
    subprocess.run(["make", "-s", "secrets", f"SECRETS={out}"], cwd=ROOT, check=True, capture_output=True)
    assert {p.name: p.read_text() for p in out.iterdir()} == first  # never replaced once made
