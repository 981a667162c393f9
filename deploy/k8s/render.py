"""Render deploy/k8s/imagerec.yaml: the fleet on Kubernetes, one source for every manifest.

``python -m deploy.k8s.render`` rewrites the file; a test fails when the committed file differs,
and validates every document against the Kubernetes schemas (kubernetes-validate, strict).

Per model: a Deployment (one worker per pod, readiness on /health/ready, a startup probe that
allows a slow first load, a preStop pause so the gateway forgets the pod before Gunicorn drains), a
headless Service and a HorizontalPodAutoscaler - so each model scales on its own. The gateway reads
the headless Service's DNS name as one replica per ready pod: its balancing, failover, breakers and
admission work per pod, and pods the autoscaler adds join without a restart. The gateway and Nginx
get a Deployment, a (virtual-IP) Service and an autoscaler each. Model and gateway pods run as the
image's non-root ``app`` user; the model pods' fsGroup makes the shared Keras volume theirs to
write. Resource requests come from `make bench` (resident memory warm, OpenVINO, README
"Performance"): VGG16 1.42 GB, ResNet50 0.48 GB, InceptionV3 0.44 GB, gateway 0.14 GB (2 workers),
Nginx 0.01 GB; a model pod wants about two cores under load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from deploy.settings import NginxLimits

HERE = Path(__file__).resolve().parent
OUTPUT = HERE / "imagerec.yaml"
PART_OF = {"app.kubernetes.io/part-of": "imagerec"}
MODELS = {  # name: (port, memory request, memory limit)
    "vgg16": (8501, "1600Mi", "2Gi"),
    "resnet50": (8502, "640Mi", "1Gi"),
    "inceptionv3": (8503, "640Mi", "1Gi"),
}
DRAIN_S = 30  # Gunicorn's graceful_timeout: a pod's grace period is this plus its preStop pause
PAUSE_S = 5  # preStop: long enough for a Service's endpoints to drop the pod
# NOTE: the gateway reads each model's headless Service name anew every GATEWAY_DNS_REFRESH_S (its
# default, stated so the pause below follows it); CoreDNS hands out pod records with a 5 s TTL. A
# model pod keeps serving until both have passed, so the gateway stops calling it before it drains.
GATEWAY_DNS_REFRESH_S = 10
MODEL_PAUSE_S = GATEWAY_DNS_REFRESH_S + 5
APP_ID = 10001  # the Dockerfile's non-root `app` user, and its group (same id)
KERAS_HOME = "/keras"  # the shared volume: ImageNet weights in models/, converted backends below
MODEL_CACHE = f"{KERAS_HOME}/converted"


def labels(component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": component, **PART_OF}


def http_probe(path: str, port: int, period_s: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": port},
        "periodSeconds": period_s,
        "timeoutSeconds": 3,
        "failureThreshold": failures,
    }


def app_user_security(volumes: bool) -> dict[str, Any]:
    """The pod runs as the image's `app` user (Pod Security "restricted"). With ``volumes``, fsGroup
    gives each mounted volume that user's group, group-writable, so the model writes its converted
    backends to the shared cache (without it conversion fails and the pod serves Keras, over its
    memory limit); OnRootMismatch skips the recursive chown once the volume's root is right."""
    context: dict[str, Any] = {
        "runAsNonRoot": True,
        "runAsUser": APP_ID,
        "runAsGroup": APP_ID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    if volumes:
        context |= {"fsGroup": APP_ID, "fsGroupChangePolicy": "OnRootMismatch"}
    return context


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
    pause_s: int = PAUSE_S,
    as_app_user: bool = False,
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
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(pause_s)]}}},
    }
    if mounts:
        container["volumeMounts"] = mounts
    spec: dict[str, Any] = {"terminationGracePeriodSeconds": DRAIN_S + pause_s, "containers": [container]}
    if as_app_user:
        spec["securityContext"] = app_user_security(bool(volumes))
        container["securityContext"] = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
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


def service(component: str, port: int, kind: str = "ClusterIP", *, headless: bool = False) -> dict[str, Any]:
    """The component's pods behind one virtual IP; or, ``headless``, ``<component>-pods``: a DNS
    name that answers with every ready pod's address, so a client that resolves it sees each pod.
    (Through a virtual IP, pooled keep-alive connections stay on the first pods and one circuit
    breaker covers them all.)"""
    spec: dict[str, Any] = {"type": kind}
    if headless:
        spec |= {"clusterIP": "None", "publishNotReadyAddresses": False}
    spec |= {
        "selector": {"app.kubernetes.io/name": component},
        "ports": [{"name": "http", "port": port, "targetPort": "http"}],
    }
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": f"{component}-pods" if headless else component, "labels": labels(component)},
        "spec": spec,
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
                # converted backends, shared by every model pod; writable by them through fsGroup
                # (NOTE: NFS-backed volumes ignore fsGroup: export them writable by group APP_ID).
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
                {
                    "MODEL": name,
                    "PORT": str(port),
                    "WEIGHTS": "imagenet",
                    "WEIGHTS_DOWNLOAD": "false",
                    "KERAS_HOME": KERAS_HOME,
                    "MODEL_CACHE": MODEL_CACHE,
                },
                {"requests": {"cpu": "1", "memory": memory}, "limits": {"cpu": "2", "memory": memory_limit}},
                startup_failures=60,  # up to 5 minutes to load, convert and warm
                volumes=[{"name": "keras", "persistentVolumeClaim": {"claimName": "imagerec-keras"}}],
                mounts=[{"name": "keras", "mountPath": KERAS_HOME}],
                pause_s=MODEL_PAUSE_S,
                as_app_user=True,
            )
        )
        docs += [service(name, port, headless=True), autoscaler(name, maximum=4)]
    # Each model's headless Service: the gateway resolves it into one replica per ready pod, anew
    # every GATEWAY_DNS_REFRESH_S, stated here because the model pods' preStop pause follows it.
    gateway_env = {
        **{f"{name.upper()}_URLS": f"http://{name}-pods:{port}" for name, (port, _, _) in MODELS.items()},
        "GATEWAY_DNS_REFRESH_S": str(GATEWAY_DNS_REFRESH_S),
    }
    docs += [
        deployment(
            "gateway",
            "imagerec-gateway:latest",
            8000,
            gateway_env,
            {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"cpu": "1", "memory": "512Mi"}},
            startup_failures=12,
            as_app_user=True,
        ),
        service("gateway", 8000),
        autoscaler("gateway", maximum=4),
    ]
    nginx_env = {"NGINX_PORT": "8080", "GATEWAY_UPSTREAM": "gateway:8000", **NginxLimits().template_values()}
    nginx = deployment(
        "nginx",
        "nginx:1.27-alpine",
        8080,
        nginx_env,
        {"requests": {"cpu": "100m", "memory": "32Mi"}, "limits": {"cpu": "500m", "memory": "128Mi"}},
        startup_failures=6,
        # the template, as compose mounts it: kubectl create configmap imagerec-nginx
        #   --from-file=deploy/nginx/imagerec.conf.template
        # NOTE: not as_app_user: the nginx image renders its templates and starts as root.
        volumes=[{"name": "templates", "configMap": {"name": "imagerec-nginx"}}],
        mounts=[{"name": "templates", "mountPath": "/etc/nginx/templates", "readOnly": True}],
    )
    container = nginx["spec"]["template"]["spec"]["containers"][0]
    # Nginx is alive when it accepts connections, and ready when it reaches a gateway.
    for probe in ("startupProbe", "livenessProbe"):
        del container[probe]["httpGet"]
        container[probe]["tcpSocket"] = {"port": 8080}
    container["readinessProbe"]["httpGet"]["path"] = "/health/ready"
    container["lifecycle"]["preStop"]["exec"]["command"] = ["sh", "-c", f"sleep {PAUSE_S}; nginx -s quit"]
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
