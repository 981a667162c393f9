"""Kubernetes manifests: up to date with their generator, valid against the Kubernetes schemas,
and wired together (services, probes, autoscalers, resources, the gateway's model URLs)."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import kubernetes_validate
import pytest
import yaml

from deploy.k8s import render
from deploy.local.fleet import NGINX_TEMPLATES

KUBERNETES = "1.30.0"
DOCS = list(yaml.safe_load_all(render.OUTPUT.read_text()))
BY_KIND: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
for doc in DOCS:
    BY_KIND[doc["kind"]][doc["metadata"]["name"]] = doc


def container(name: str) -> dict[str, Any]:
    return BY_KIND["Deployment"][name]["spec"]["template"]["spec"]["containers"][0]


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
    deployment, service, hpa = (
        BY_KIND[kind][name] for kind in ("Deployment", "Service", "HorizontalPodAutoscaler")
    )
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["targetPort"] == container(name)["ports"][0]["name"]
    spec = container(name)
    assert spec["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert spec["resources"]["requests"]["cpu"] and spec["resources"]["requests"]["memory"]
    # The pod gets longer than Gunicorn's graceful drain (30 s) plus the preStop pause.
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 35
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_the_gateway_finds_every_model_through_its_service() -> None:
    env = {e["name"]: e["value"] for e in container("gateway")["env"]}
    for name, (port, _, _) in render.MODELS.items():
        assert (
            env[f"{name.upper()}_URLS"]
            == f"http://{name}:{BY_KIND['Service'][name]['spec']['ports'][0]['port']}"
        )
        assert container(name)["ports"][0]["containerPort"] == port
        assert {e["name"]: e["value"] for e in container(name)["env"]}["PORT"] == str(port)


def test_nginx_gets_every_variable_its_template_needs() -> None:
    template = (NGINX_TEMPLATES / "imagerec.conf.template").read_text()
    needed = set(re.findall(r"\$\{(NGINX_[A-Z_]+|GATEWAY_[A-Z_]+)\}", template))
    assert {e["name"] for e in container("nginx")["env"]} == needed
