"""Render deploy/k8s/imagerec.yaml: the fleet on Kubernetes, one source for every manifest.

``python -m deploy.k8s.render`` rewrites the file; a test fails when the committed file differs,
and validates every document against the Kubernetes schemas (kubernetes-validate, strict).

Per model: a Deployment (one worker per pod, readiness on /health/ready, a startup probe that
allows a slow first load, a preStop pause so endpoints drop the pod before Gunicorn drains), a
Service and a HorizontalPodAutoscaler - so each model scales on its own. The gateway and Nginx get
the same. Resource requests come from `make bench` (resident memory warm, OpenVINO, README
"Performance"): VGG16 1.42 GB, ResNet50 0.48 GB, InceptionV3 0.44 GB, gateway 0.14 GB (2 workers),
Nginx 0.01 GB; a model pod wants about two cores under load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from deploy.local.fleet import FleetSettings, nginx_limits

HERE = Path(__file__).resolve().parent
OUTPUT = HERE / "imagerec.yaml"
PART_OF = {"app.kubernetes.io/part-of": "imagerec"}
MODELS = {  # name: (port, memory request, memory limit)
    "vgg16": (8501, "1600Mi", "2Gi"),
    "resnet50": (8502, "640Mi", "1Gi"),
    "inceptionv3": (8503, "640Mi", "1Gi"),
}
GRACE_S = 35  # Gunicorn's graceful_timeout (30 s) plus the preStop pause


def labels(component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": component, **PART_OF}


def http_probe(path: str, port: int, period_s: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": port},
        "periodSeconds": period_s,
        "timeoutSeconds": 3,
        "failureThreshold": failures,
    }


def deployment(
    component: str,
    image: str,
    port: int,
    env: dict[str, str],
    resources: dict[str, dict[str, str]],
    *,
    startup_failures: int,
    volumes: list[dict[str, Any]] | None = None,
    mounts: list[dict[str, Any]] | None = None,
    command: list[str] | None = None,
) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": component,
        "image": image,
        "ports": [{"name": "http", "containerPort": port}],
        "env": [{"name": k, "value": v} for k, v in env.items()],
        "resources": resources,
        "startupProbe": http_probe("/health/live", port, 5, startup_failures),
        "readinessProbe": http_probe("/health/ready", port, 5, 2),
        "livenessProbe": http_probe("/health/live", port, 10, 3),
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", "5"]}}},
    }
    if command:
        container["command"] = command
    if mounts:
        container["volumeMounts"] = mounts
    spec: dict[str, Any] = {"terminationGracePeriodSeconds": GRACE_S, "containers": [container]}
    if volumes:
        spec["volumes"] = volumes
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": component, "labels": labels(component)},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app.kubernetes.io/name": component}},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {
                    "labels": labels(component),
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(port),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": spec,
            },
        },
    }


def service(component: str, port: int, kind: str = "ClusterIP") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": component, "labels": labels(component)},
        "spec": {
            "type": kind,
            "selector": {"app.kubernetes.io/name": component},
            "ports": [{"name": "http", "port": port, "targetPort": "http"}],
        },
    }


def autoscaler(component: str, maximum: int, cpu_percent: int = 70) -> dict[str, Any]:
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": component, "labels": labels(component)},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": component},
            "minReplicas": 1,
            "maxReplicas": maximum,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {"type": "Utilization", "averageUtilization": cpu_percent},
                    },
                }
            ],
        },
    }


def documents() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = [
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": "imagerec-keras", "labels": PART_OF},
            "spec": {
                # The Keras cache: ImageNet weights (put there once, e.g. from `make weights`) and
                # converted backends, shared by every model pod.
                "accessModes": ["ReadWriteMany"],
                "resources": {"requests": {"storage": "5Gi"}},
            },
        }
    ]
    for name, (port, memory, memory_limit) in MODELS.items():
        docs.append(
            deployment(
                name,
                "imagerec-model:latest",
                port,
                {"MODEL": name, "PORT": str(port), "WEIGHTS": "imagenet", "WEIGHTS_DOWNLOAD": "false"},
                {"requests": {"cpu": "1", "memory": memory}, "limits": {"cpu": "2", "memory": memory_limit}},
                startup_failures=60,  # up to 5 minutes to load, convert and warm
                volumes=[{"name": "keras", "persistentVolumeClaim": {"claimName": "imagerec-keras"}}],
                mounts=[{"name": "keras", "mountPath": "/keras"}],
            )
        )
        docs += [service(name, port), autoscaler(name, maximum=4)]
    urls = {f"{name.upper()}_URLS": f"http://{name}:{port}" for name, (port, _, _) in MODELS.items()}
    docs += [
        deployment(
            "gateway",
            "imagerec-gateway:latest",
            8000,
            urls,
            {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"cpu": "1", "memory": "512Mi"}},
            startup_failures=12,
        ),
        service("gateway", 8000),
        autoscaler("gateway", maximum=4),
    ]
    nginx_env = {"NGINX_PORT": "8080", "GATEWAY_UPSTREAM": "gateway:8000", **nginx_limits(FleetSettings())}
    nginx = deployment(
        "nginx",
        "nginx:1.27-alpine",
        8080,
        nginx_env,
        {"requests": {"cpu": "100m", "memory": "32Mi"}, "limits": {"cpu": "500m", "memory": "128Mi"}},
        startup_failures=6,
        # the template, as compose mounts it: kubectl create configmap imagerec-nginx
        #   --from-file=deploy/nginx/imagerec.conf.template
        volumes=[{"name": "templates", "configMap": {"name": "imagerec-nginx"}}],
        mounts=[{"name": "templates", "mountPath": "/etc/nginx/templates", "readOnly": True}],
    )
    container = nginx["spec"]["template"]["spec"]["containers"][0]
    # Nginx is alive when it accepts connections, and ready when it reaches a gateway.
    for probe in ("startupProbe", "livenessProbe"):
        del container[probe]["httpGet"]
        container[probe]["tcpSocket"] = {"port": 8080}
    container["readinessProbe"]["httpGet"]["path"] = "/health/ready"
    container["lifecycle"] = {"preStop": {"exec": {"command": ["sh", "-c", "sleep 5; nginx -s quit"]}}}
    del nginx["spec"]["template"]["metadata"]["annotations"]  # /metrics is not served by Nginx
    docs += [nginx, service("nginx", 8080, "LoadBalancer"), autoscaler("nginx", maximum=3)]
    return docs


def render() -> str:
    header = (
        "# GENERATED by `python -m deploy.k8s.render` from deploy/k8s/render.py: edit that, not this.\n"
        "# Apply: kubectl create configmap imagerec-nginx --from-file=deploy/nginx/imagerec.conf.template\n"
        "#        kubectl apply -f deploy/k8s/imagerec.yaml\n"
    )
    return header + yaml.safe_dump_all(documents(), sort_keys=False, width=110)


if __name__ == "__main__":
    OUTPUT.write_text(render())
    print(f"wrote {OUTPUT}")
