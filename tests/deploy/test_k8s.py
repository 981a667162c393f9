"""Kubernetes manifests: up to date with their generator, valid against the Kubernetes schemas,
and wired together (services, probes, autoscalers, resources, the gateway's model URLs, the model
pods' user and their writable cache)."""

from __future__ import annotations

import copy
import re
from collections import defaultdict
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from common.jobs.settings import JobSettings
from deploy.k8s import render
from deploy.settings import (
    JOBS_DIR,
    NGINX_TEMPLATES,
    model_stop_grace_s,
    worker_command,
    worker_stop_grace_s,
)

KUBERNETES = "1.30.0"
DOCS = list(yaml.safe_load_all(render.OUTPUT.read_text()))
BY_KIND: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
for doc in DOCS:
    BY_KIND[doc["kind"]][doc["metadata"]["name"]] = doc


def pod(name: str) -> dict[str, Any]:
    return BY_KIND["Deployment"][name]["spec"]["template"]["spec"]


def container(name: str) -> dict[str, Any]:
    return pod(name)["containers"][0]


def env_of(name: str) -> dict[str, Any]:
    """A container's environment: a value, or where it comes from (a Secret's key)."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(name)["env"]}


def services_selecting(name: str) -> list[dict[str, Any]]:
    """Every Service whose selector picks the Deployment's pods."""
    pod_labels = BY_KIND["Deployment"][name]["spec"]["template"]["metadata"]["labels"]
    return [s for s in BY_KIND["Service"].values() if s["spec"]["selector"].items() <= pod_labels.items()]


def test_the_committed_manifests_are_what_the_generator_renders() -> None:
    assert render.OUTPUT.read_text() == render.render(), "run: python -m deploy.k8s.render"


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_every_document_is_valid_kubernetes(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_the_validator_rejects_a_broken_manifest() -> None:
    broken = yaml.safe_load(yaml.safe_dump(BY_KIND["Deployment"]["resnet50"]))
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES, strict=True)


@pytest.mark.parametrize("name", [*render.MODELS, "gateway", "nginx"])
def test_each_component_scales_on_its_own(name: str) -> None:
    deployment, hpa = BY_KIND["Deployment"][name], BY_KIND["HorizontalPodAutoscaler"][name]
    [service] = services_selecting(name)
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["targetPort"] == container(name)["ports"][0]["name"]
    spec = container(name)
    assert spec["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert spec["resources"]["requests"]["cpu"] and spec["resources"]["requests"]["memory"]
    # The pod gets longer than Gunicorn's graceful drain (30 s) plus the preStop pause.
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 35
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


@pytest.mark.parametrize("model", render.MODELS)
def test_the_gateway_reaches_each_model_pod_through_a_headless_service(model: str) -> None:
    url = urlsplit(env_of("gateway")[f"{model.upper()}_URLS"])
    service = BY_KIND["Service"].get(str(url.hostname))
    assert service is not None, f"{url.hostname}: no such Service"
    # Headless: DNS answers with each ready pod's address, which the gateway takes as a replica.
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is False
    assert service["spec"]["selector"] == BY_KIND["Deployment"][model]["spec"]["selector"]["matchLabels"]
    assert service in services_selecting(model)
    # No virtual IP forwards a port: the URL names the pod's own.
    assert url.port == container(model)["ports"][0]["containerPort"] == int(env_of(model)["PORT"])


def test_the_gateway_forgets_a_stopping_model_pod_before_it_drains() -> None:
    refresh_s = int(env_of("gateway")["GATEWAY_DNS_REFRESH_S"])
    assert refresh_s > 0
    for model in render.MODELS:
        pause_s = int(container(model)["lifecycle"]["preStop"]["exec"]["command"][-1])
        assert pause_s >= refresh_s + 5  # the next refresh, and CoreDNS's 5 s record TTL
        # then its own drain (answering not-ready) and Gunicorn's graceful stop
        assert pod(model)["terminationGracePeriodSeconds"] == pause_s + model_stop_grace_s() >= pause_s + 35


DOCKERFILE = (render.HERE.parent / "docker" / "Dockerfile").read_text()
MODEL_STAGE = DOCKERFILE.split("AS model", 1)[1].split("\nFROM ", 1)[0]


def image_user() -> dict[str, Any]:
    """The model image's user, its group, and the cache folder it owns, read from the Dockerfile."""
    [(gid, group)] = re.findall(r"groupadd --gid (\d+) (\w+)", DOCKERFILE)
    [(uid, user_group, user)] = re.findall(r"useradd .*--uid (\d+) --gid (\w+) (\w+)", DOCKERFILE)
    [run_as] = re.findall(r"^USER (\w+)", MODEL_STAGE, re.MULTILINE)
    [cache] = re.findall(r"^ENV .*\bMODEL_CACHE=(\S+)", MODEL_STAGE, re.MULTILINE)
    [(owner, owning_group, owned)] = re.findall(r"chown -R (\w+):(\w+) (\S+)", MODEL_STAGE)
    [(mode, moded)] = re.findall(r"chmod -R (\d+) (\S+)", MODEL_STAGE)
    assert user_group == group and run_as == owner == user and owning_group == group
    assert re.search(rf"mkdir -p [^&]*{re.escape(cache)}\b", MODEL_STAGE), "the image creates MODEL_CACHE"
    assert under(cache, owned) and under(cache, moded) and int(mode, 8) & 0o020, "group-writable"
    return {"uid": int(uid), "gid": int(gid), "cache": cache}


def under(path: str, folder: str) -> bool:
    return PurePosixPath(path).is_relative_to(PurePosixPath(folder))


def cache_problems(deployment: dict[str, Any]) -> list[str]:
    """Why a model pod could not write its converted-model cache (empty: it can)."""
    spec = deployment["spec"]["template"]["spec"]
    [box] = spec["containers"]
    pod_security, box_security = spec.get("securityContext", {}), box.get("securityContext", {})
    image = image_user()
    run_as = box_security.get("runAsUser", pod_security.get("runAsUser", image["uid"]))
    problems = []
    if not (box_security.get("runAsNonRoot", pod_security.get("runAsNonRoot")) and run_as != 0):
        problems.append("not forced to run as non-root")
    if run_as != image["uid"]:
        problems.append(f"runs as {run_as}, the image's user is {image['uid']}")
    if pod_security.get("fsGroup") != image["gid"]:
        problems.append(f"fsGroup {pod_security.get('fsGroup')} is not the cache's group {image['gid']}")
    if pod_security.get("fsGroupChangePolicy") != "OnRootMismatch":
        problems.append("fsGroupChangePolicy is not OnRootMismatch")
    cache = {e["name"]: e["value"] for e in box["env"]}.get("MODEL_CACHE", image["cache"])
    mounts = [m for m in box.get("volumeMounts", []) if under(cache, m["mountPath"])]
    if not mounts:  # the image's own folder: lost with the pod, and read-only with readOnlyRootFilesystem
        return [*problems, f"MODEL_CACHE {cache} is on no mounted volume"]
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    [volume] = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    if mount.get("readOnly") or mount.get("subPath"):
        problems.append(f"MODEL_CACHE {cache} is on a read-only (or sub-path) mount")
    if not {"persistentVolumeClaim", "emptyDir"} & set(volume):
        problems.append(f"volume {volume['name']} is not a writable kind")
    if volume.get("persistentVolumeClaim", {}).get("readOnly"):
        problems.append(f"claim of volume {volume['name']} is mounted read-only")
    return problems


@pytest.mark.parametrize("model", render.MODELS)
def test_a_model_pod_runs_as_the_image_user_and_can_write_its_cache(model: str) -> None:
    assert cache_problems(BY_KIND["Deployment"][model]) == []
    assert container(model)["securityContext"]["allowPrivilegeEscalation"] is False


def _read_only_mount(spec: dict[str, Any]) -> None:
    spec["containers"][0]["volumeMounts"][0]["readOnly"] = True


def _no_fs_group(spec: dict[str, Any]) -> None:
    del spec["securityContext"]["fsGroup"]


def _as_root(spec: dict[str, Any]) -> None:
    spec["securityContext"]["runAsUser"] = 0


def _cache_in_the_image(spec: dict[str, Any]) -> None:
    spec["containers"][0]["env"].append({"name": "MODEL_CACHE", "value": "/home/app/.cache"})


@pytest.mark.parametrize("breakage", [_read_only_mount, _no_fs_group, _as_root, _cache_in_the_image])
def test_the_cache_check_catches_a_pod_that_could_not_write(breakage: Any) -> None:
    broken = copy.deepcopy(BY_KIND["Deployment"]["resnet50"])
    breakage(broken["spec"]["template"]["spec"])
    assert cache_problems(broken)


def test_nginx_gets_every_variable_its_template_needs() -> None:
    template = (NGINX_TEMPLATES / "imagerec.conf.template").read_text()
    needed = set(re.findall(r"\$\{(NGINX_[A-Z_]+|GATEWAY_[A-Z_]+)\}", template))
    assert {e["name"] for e in container("nginx")["env"]} == needed


def test_the_worker_runs_the_gateway_image_with_the_gateway_environment() -> None:
    deployment = BY_KIND["Deployment"]["worker"]
    assert container("worker")["image"] == container("gateway")["image"]
    assert container("worker")["command"] == worker_command()
    assert env_of("worker") == env_of("gateway")
    assert deployment["spec"]["replicas"] == 1 and not services_selecting("worker")  # it serves nothing
    requests = container("worker")["resources"]["requests"]
    assert requests["cpu"] and requests["memory"]
    assert pod("worker")["securityContext"]["runAsUser"] == image_user()["uid"]
    # SIGTERM: Celery finishes the chunks it runs (each within JOBS_CHUNK_BUDGET_S) and then a
    # finished job's callback; killed sooner, the callback is lost.
    assert pod("worker")["terminationGracePeriodSeconds"] == worker_stop_grace_s()
    assert worker_stop_grace_s() >= JobSettings().chunk_budget_s + 15 >= 45


def jobs_folder(name: str) -> dict[str, Any]:
    """The claim a Deployment's JOBS_DIR is on (it must be mounted there, writable)."""
    spec, box = pod(name), container(name)
    [mount] = [m for m in box["volumeMounts"] if m["mountPath"] == env_of(name)["JOBS_DIR"]]
    assert not mount.get("readOnly") and not mount.get("subPath")
    [volume] = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert spec["securityContext"]["fsGroup"] == spec["securityContext"]["runAsGroup"]  # writable
    return BY_KIND["PersistentVolumeClaim"][volume["persistentVolumeClaim"]["claimName"]]


def test_the_gateway_and_the_workers_share_one_jobs_claim() -> None:
    """The gateway writes a job's images, any worker pod (on any node) reads them and writes the
    results, which any gateway pod serves: one ReadWriteMany claim, at the same JOBS_DIR."""
    assert env_of("gateway")["JOBS_DIR"] == env_of("worker")["JOBS_DIR"] == JOBS_DIR
    claim = jobs_folder("gateway")
    assert jobs_folder("worker") is claim
    assert claim["metadata"]["name"] == "imagerec-jobs"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


def test_redis_is_reached_by_its_service_and_keeps_its_data() -> None:
    for name in ("gateway", "worker"):
        url = urlsplit(env_of(name)["REDIS_URL"])
        [service] = services_selecting("redis")
        assert url.hostname == service["metadata"]["name"]
        assert (
            url.port == service["spec"]["ports"][0]["port"] == container("redis")["ports"][0]["containerPort"]
        )
        assert service["spec"]["ports"][0]["targetPort"] == container("redis")["ports"][0]["name"]
    command = container("redis")["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    [mount] = container("redis")["volumeMounts"]
    [volume] = pod("redis")["volumes"]
    assert mount["mountPath"] == "/data" and volume["persistentVolumeClaim"]["claimName"] == "imagerec-redis"
    # One pod at a time writes the append-only file: the old one stops before the new one starts.
    assert BY_KIND["Deployment"]["redis"]["spec"]["strategy"] == {"type": "Recreate"}
    assert BY_KIND["PersistentVolumeClaim"]["imagerec-redis"]["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_secrets_come_from_the_secret_and_never_sit_in_the_manifest() -> None:
    for name in ("gateway", "worker", "trainer"):
        env = env_of(name)
        for variable, key in (("IMAGEREC_ADMIN_KEY", "admin-key"), ("REDIS_PASSWORD", "redis-password")):
            assert env[variable] == {"secretKeyRef": {"name": "imagerec-secrets", "key": key}}
        assert env["JOBS_CALLBACK_SECRET"]["secretKeyRef"]["key"] == "callback-secret"
    for name in ("redis", "redis-cache"):
        command = container(name)["command"]
        assert command[command.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
        assert env_of(name)["REDIS_PASSWORD"]["secretKeyRef"]["key"] == "redis-password"
        assert "REDIS_PASSWORD" in " ".join(container(name)["readinessProbe"]["exec"]["command"])
    assert "Secret" not in BY_KIND  # the operator makes it (README); no value is ever rendered


def test_the_queue_never_evicts_and_the_cache_does() -> None:
    queue, cache = container("redis")["command"], container("redis-cache")["command"]
    assert queue[queue.index("--maxmemory-policy") + 1] == "noeviction" and "--maxmemory" in queue
    assert cache[cache.index("--maxmemory-policy") + 1] == "allkeys-lru"
    assert cache[cache.index("--appendonly") + 1] == "no" and "volumes" not in pod("redis-cache")
    assert urlsplit(env_of("gateway")["GATEWAY_CACHE_REDIS_URL"]).hostname == "redis-cache"


def test_network_policies_let_only_the_fleet_reach_redis_and_the_models() -> None:
    def admitted(name: str) -> set[str]:
        policies = [
            p
            for p in BY_KIND["NetworkPolicy"].values()
            if p["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": name}
        ]
        assert len(policies) == 1 and policies[0]["spec"]["policyTypes"] == ["Ingress"]
        [rule] = policies[0]["spec"]["ingress"]
        assert "ports" not in rule
        return {peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"] for peer in rule["from"]}

    for name in ("redis", "redis-cache", "vgg16", "resnet50", "inceptionv3"):
        assert admitted(name) == {"gateway", "worker", "trainer"}
    # Only Nginx reaches the gateway: so the gateway believes X-Real-IP from any peer.
    assert admitted("gateway") == {"nginx"}
    assert env_of("gateway")["GATEWAY_TRUSTED_PROXIES"] == "0.0.0.0/0,::/0"
