"""Deployment files: the rendered Nginx config passes `nginx -t`; compose matches the topology."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from common.jobs.settings import JobSettings
from common.service_settings import ServiceSettings
from deploy.local.fleet import ROOT, ExtraService, Fleet, FleetSettings
from deploy.settings import (
    GATEWAY_THREADS,
    GATEWAY_WORKERS,
    JOBS_DIR,
    SERVICE_THREADS,
    NginxLimits,
    worker_command,
    worker_stop_grace_s,
)
from gateway.settings import GatewaySettings

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
DOCKERFILE = (ROOT / "deploy" / "docker" / "Dockerfile").read_text()
GATEWAY_STAGE = DOCKERFILE.split("AS gateway", 1)[1].split("\nFROM ", 1)[0]
MODEL_PORTS = {"vgg16": 8501, "resnet50": 8502, "inceptionv3": 8503}


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    extra = ExtraService.custom("shapes", 9600, "/m/shapes.keras", "/m/labels.json", 64)
    return Fleet(FleetSettings(run_dir=str(tmp_path / "run"), nginx_port=18080), [extra])


@pytest.mark.skipif(not (shutil.which("nginx") or Path("/usr/sbin/nginx").exists()), reason="needs nginx")
def test_rendered_nginx_config_is_valid(fleet: Fleet) -> None:
    fleet.render()
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    conf = fleet.run_dir / "nginx" / "nginx.conf"
    result = subprocess.run(
        [nginx, "-t", "-p", str(conf.parent), "-c", str(conf)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    rendered = (fleet.run_dir / "nginx" / "imagerec.conf").read_text()
    assert "${" not in rendered and "client_max_body_size 10m;" in rendered


def test_the_local_nginx_takes_its_limits_from_the_shared_settings(tmp_path: Path) -> None:
    limits = NginxLimits(max_body_size="3m", proxy_read_timeout="90s")
    fleet = Fleet(FleetSettings(run_dir=str(tmp_path)), nginx=limits)
    fleet.render()
    rendered = (fleet.run_dir / "nginx" / "imagerec.conf").read_text()
    assert "client_max_body_size 3m;" in rendered and "proxy_read_timeout 90s;" in rendered


def test_supervisord_runs_every_process_with_restarts(fleet: Fleet) -> None:
    text = fleet.render().read_text()
    programs = re.findall(r"^\[program:(\w+)\]", text, re.MULTILINE)
    assert programs == ["vgg16", "resnet50", "inceptionv3", "shapes", "gateway", "redis", "worker", "nginx"]
    assert text.count("autorestart=true") == len(programs)
    assert "--appendonly yes" in text and f"--dir {fleet.run_dir}/redis" in text  # persistence on
    assert fleet.environment()["REDIS_URL"] == "redis://127.0.0.1:6380/0"
    assert fleet.environment()["GATEWAY_REQUEST_THREADS"] == "64"
    assert "'services.resnet50:create_app()'" in text and "--workers 1" in text
    assert 'SHAPES_WEIGHTS="/m/shapes.keras"' in text
    assert fleet.environment()["RESNET50_URLS"] == "http://127.0.0.1:8502"
    assert fleet.environment()["GATEWAY_MODELS"] == "vgg16,resnet50,inceptionv3,shapes"


def test_redis_can_be_left_out(tmp_path: Path) -> None:
    fleet = Fleet(FleetSettings(run_dir=str(tmp_path), redis=False))
    assert "redis" not in fleet.programs() and "REDIS_URL" not in fleet.environment()
    assert "worker" not in fleet.programs()  # its queue is in Redis


def test_the_timeouts_nest_from_the_edge_inwards() -> None:
    """Nginx waits longer than the gateway's default deadline, which no service default exceeds:
    every request's deadline passes (504 from the fleet, in JSON) before a proxy gives up on it."""
    nginx_s = float(NginxLimits().proxy_read_timeout.removesuffix("s"))
    gateway = GatewaySettings()
    service = ServiceSettings()
    assert nginx_s * 1000 > gateway.default_deadline_ms >= service.default_deadline_ms
    assert gateway.member_timeout_s * 1000 >= gateway.default_deadline_ms


def test_gunicorn_threads_cover_the_queue_admission_can_see() -> None:
    """A request waiting for a thread is invisible to admission: every image the queue may hold
    (one per request at worst), plus the batch running, must have a thread of its own."""
    service = ServiceSettings()
    assert SERVICE_THREADS >= service.max_queue_images + service.max_batch_size
    assert FleetSettings().service_threads == SERVICE_THREADS
    assert FleetSettings().gateway_threads == GATEWAY_THREADS == GatewaySettings().request_threads
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
    settings = FleetSettings(run_dir=str(tmp_path), models=("resnet50",), replicas=("resnet50=2", "shapes=3"))
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
        Fleet(FleetSettings(run_dir=str(tmp_path), replicas=(pair,))).programs()


def test_compose_has_the_same_topology() -> None:
    services = COMPOSE["services"]
    assert set(services) == {*MODEL_PORTS, "gateway", "worker", "redis", "nginx"}
    assert [p for s in services.values() for p in s.get("ports", [])] == [
        "${NGINX_PUBLISHED_PORT:-8080}:8080"
    ]
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
    assert redis["image"].split(":")[0] == "redis" and "--appendonly" in redis["command"]
    assert redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
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


def test_compose_nginx_has_the_shared_limits() -> None:
    assert NginxLimits().template_values().items() <= COMPOSE["services"]["nginx"]["environment"].items()


def test_compose_references_files_that_exist() -> None:
    dockerfile = ROOT / "deploy" / "docker" / "Dockerfile"
    stages = re.findall(r"^FROM \S+ AS (\w+)", DOCKERFILE, re.MULTILINE)
    for service in COMPOSE["services"].values():
        if "build" in service:
            assert (ROOT / service["build"]["dockerfile"]) == dockerfile
            assert service["build"]["target"] in stages
    template = COMPOSE["services"]["nginx"]["volumes"][0].split(":")[0]
    assert (ROOT / template).is_file()
    needed = set(re.findall(r"\$\{(\w+)\}", (ROOT / template).read_text()))
    assert needed <= set(COMPOSE["services"]["nginx"]["environment"])


def test_compose_is_valid_against_the_compose_specification() -> None:
    """The Compose Specification's JSON schema (tests/fixtures/ATTRIBUTION.md). That copy predates
    the top-level ``name`` (added to the spec in 2022), so ``name`` is checked on its own."""
    schema = jsonschema.Draft201909Validator(
        json.loads((ROOT / "tests" / "fixtures" / "compose-spec.json").read_text())
    )
    document = {k: v for k, v in COMPOSE.items() if k != "name"}
    schema.validate(document)
    assert re.fullmatch(r"[a-z0-9][a-z0-9_-]*", COMPOSE["name"])  # the spec's project-name rule
    typo = {**document["services"]["gateway"], "healtcheck": {}}
    with pytest.raises(jsonschema.ValidationError, match="healtcheck"):  # strict enough to catch typos
        schema.validate({**document, "services": {**document["services"], "gateway": typo}})
