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

Asynchronous jobs: Redis (one pod, append-only file on its own claim: the queue and the job records
survive a restart; also the gateways' shared rate-limit count and response cache) and the job
``worker``, the gateway's image running Celery with the gateway's environment. The gateway writes a
job's images to ``JOBS_DIR`` and every worker reads them and writes the results there, so both
mount the same ReadWriteMany claim ``imagerec-jobs``. Workers scale by replicas: each keeps
``JOBS_WORKER_PROCESSES`` model calls in flight (one per pool process), at batch priority behind
interactive requests. The natural autoscaler is an HPA on the queue length the gateway exports,
``imagerec_job_queue_length`` (tasks of ``JOBS_CHUNK_IMAGES`` images waiting; every gateway pod
reports the same number, so take the max). That needs a metrics adapter (prometheus-adapter, KEDA),
so none is rendered here; with one, e.g.::

    metrics:
    - type: External
      external:
        metric: {name: imagerec_job_queue_length}
        target: {type: AverageValue, averageValue: "4"}   # waiting tasks per worker pod

Custom classes: the ``trainer``, the trainer image (the model image, TensorFlow included, plus the
workers) running Celery on the training queue with the gateway's environment: one pod, one training
at a time, each in a fresh process. It reads a training upload from the jobs claim, calls the base
model through the gateway's client and publishes the custom model to ``CUSTOM_MODELS_DIR``, the
ReadWriteMany claim ``imagerec-custom-models``: the model pods mount it read-only (each serves the
custom models trained on it), the gateway writable (it deletes them), and the job worker, whose
environment is the gateway's, writable too (its housekeeping sweeps what a killed publisher left).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from deploy.settings import (
    CUSTOM_MODELS_DIR,
    JOBS_DIR,
    NginxLimits,
    trainer_command,
    trainer_stop_grace_s,
    worker_command,
    worker_stop_grace_s,
)

HERE = Path(__file__).resolve().parent
OUTPUT = HERE / "imagerec.yaml"
PART_OF = {"app.kubernetes.io/part-of": "imagerec"}
# Memory: the request is the base model alone; the limit leaves room for fine-tuned custom models,
# each a copy of the backbone (ResNet50 measured +267 MB fp32; VGG16's weights are 5.6x ResNet50's),
# CUSTOM_MAX_FINE_TUNED (2) of them plus one while a new version replaces one, and the child
# process that converts one to OpenVINO (TensorFlow and the Keras model, ~1.2 GB at its peak).
MODELS = {  # name: (port, memory request, memory limit)
    "vgg16": (8501, "1600Mi", "7Gi"),
    "resnet50": (8502, "640Mi", "3Gi"),
    "inceptionv3": (8503, "640Mi", "3Gi"),
}
DRAIN_S = 30  # Gunicorn's graceful_timeout: a pod's grace period is this plus its preStop pause
PAUSE_S = 5  # preStop: long enough for a Service's endpoints to drop the pod
# NOTE: the gateway reads each model's headless Service name anew every GATEWAY_DNS_REFRESH_S (its
# default, stated so the pause below follows it); CoreDNS hands out pod records with a 5 s TTL. A
# model pod keeps serving until both have passed, so the gateway stops calling it before it drains.
GATEWAY_DNS_REFRESH_S = 10
MODEL_PAUSE_S = GATEWAY_DNS_REFRESH_S + 5
APP_ID = 10001  # the Dockerfile's non-root `app` user, and its group (same id)
REDIS_ID = 999  # the redis image's `redis` user and group
REDIS_PORT = 6379
SECRET = "imagerec-secrets"  # made by the operator (README "On Kubernetes"): never rendered here
KERAS_HOME = "/keras"  # the shared volume: ImageNet weights in models/, converted backends below
MODEL_CACHE = f"{KERAS_HOME}/converted"


def from_secret(key: str, optional: bool = False) -> dict[str, Any]:
    """An environment value read from the ``imagerec-secrets`` Secret's ``key``."""
    ref: dict[str, Any] = {"name": SECRET, "key": key}
    if optional:
        ref["optional"] = True
    return {"secretKeyRef": ref}


def labels(component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": component, **PART_OF}


def http_probe(path: str, port: int, period_s: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": port},
        "periodSeconds": period_s,
        "timeoutSeconds": 3,
        "failureThreshold": failures,
    }


def app_user_security(volumes: bool, user: int = APP_ID) -> dict[str, Any]:
    """The pod runs as the image's `app` user (Pod Security "restricted"). With ``volumes``, fsGroup
    gives each mounted volume that user's group, group-writable, so the model writes its converted
    backends to the shared cache (without it conversion fails and the pod serves Keras, over its
    memory limit), and the gateway and the workers their job folders; OnRootMismatch skips the
    recursive chown once the volume's root is right."""
    context: dict[str, Any] = {
        "runAsNonRoot": True,
        "runAsUser": user,
        "runAsGroup": user,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    if volumes:
        context |= {"fsGroup": user, "fsGroupChangePolicy": "OnRootMismatch"}
    return context


def claim(name: str, access: str, storage: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "labels": PART_OF},
        "spec": {"accessModes": [access], "resources": {"requests": {"storage": storage}}},
    }


def deployment(
    component: str,
    image: str,
    port: int | None,
    env: dict[str, Any],
    resources: dict[str, dict[str, str]],
    *,
    startup_failures: int = 0,
    volumes: list[dict[str, Any]] | None = None,
    mounts: list[dict[str, Any]] | None = None,
    pause_s: int = PAUSE_S,
    as_app_user: bool = False,
    command: list[str] | None = None,
    grace_s: int | None = None,
) -> dict[str, Any]:
    """A Deployment of one container; ``port`` None: no HTTP (no probes, no pause, no scraping).
    An ``env`` value is a string, or a ``from_secret`` reference."""
    container: dict[str, Any] = {"name": component, "image": image}
    if command:
        container["command"] = command
    if port is not None:
        container["ports"] = [{"name": "http", "containerPort": port}]
    if env:
        container["env"] = [
            {"name": k, "value": v} if isinstance(v, str) else {"name": k, "valueFrom": v}
            for k, v in env.items()
        ]
    container["resources"] = resources
    if port is not None:
        container |= {
            "startupProbe": http_probe("/health/live", port, 5, startup_failures),
            "readinessProbe": http_probe("/health/ready", port, 5, 2),
            "livenessProbe": http_probe("/health/live", port, 10, 3),
            "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(pause_s)]}}},
        }
    if mounts:
        container["volumeMounts"] = mounts
    grace = grace_s if grace_s is not None else DRAIN_S + pause_s
    spec: dict[str, Any] = {"terminationGracePeriodSeconds": grace, "containers": [container]}
    if as_app_user:
        spec["securityContext"] = app_user_security(bool(volumes))
        container["securityContext"] = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    if volumes:
        spec["volumes"] = volumes
    template: dict[str, Any] = {"metadata": {"labels": labels(component)}, "spec": spec}
    if port is not None:
        template["metadata"]["annotations"] = {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(port),
            "prometheus.io/path": "/metrics",
        }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": component, "labels": labels(component)},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app.kubernetes.io/name": component}},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": template,
        },
    }


def service(
    component: str, port: int, kind: str = "ClusterIP", *, headless: bool = False, port_name: str = "http"
) -> dict[str, Any]:
    """The component's pods behind one virtual IP; or, ``headless``, ``<component>-pods``: a DNS
    name that answers with every ready pod's address, so a client that resolves it sees each pod.
    (Through a virtual IP, pooled keep-alive connections stay on the first pods and one circuit
    breaker covers them all.)"""
    spec: dict[str, Any] = {"type": kind}
    if headless:
        spec |= {"clusterIP": "None", "publishNotReadyAddresses": False}
    spec |= {
        "selector": {"app.kubernetes.io/name": component},
        "ports": [{"name": port_name, "port": port, "targetPort": port_name}],
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


def redis(name: str = "redis", *, cache: bool = False) -> list[dict[str, Any]]:
    """One Redis pod, run as the image's `redis` user, with a password from the Secret; its Service
    is the host of ``REDIS_URL`` (``redis``) or of the response cache (``redis-cache``). The queue's
    keeps an append-only file on a claim of its own (Recreate: one pod at a time writes it) and
    never evicts: at its maxmemory writes fail, and the fleet answers 503. The cache's keeps
    nothing and evicts the least recently used (an eviction policy is per server: two servers)."""
    memory = "256mb" if cache else "1gb"
    limit = "384Mi" if cache else "1536Mi"  # maxmemory plus Redis's own overhead and the rewrite
    resources = {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"cpu": "500m", "memory": limit}}
    mounts = [] if cache else [{"name": "data", "mountPath": "/data"}]
    deploy = deployment(
        name,
        "redis:7",
        None,
        {},
        resources,
        volumes=[] if cache else [{"name": "data", "persistentVolumeClaim": {"claimName": "imagerec-redis"}}],
        mounts=mounts,
        as_app_user=True,
        grace_s=30,  # time to write the append-only file out
    )
    deploy["spec"]["strategy"] = {"type": "Recreate"}
    pod = deploy["spec"]["template"]["spec"]
    pod["securityContext"] = app_user_security(not cache, user=REDIS_ID)
    policy = ["--maxmemory", memory, "--maxmemory-policy", "allkeys-lru" if cache else "noeviction"]
    keep = ["--appendonly", "no", "--save", ""] if cache else ["--appendonly", "yes"]
    ping = 'redis-cli -a "$REDIS_PASSWORD" --no-auth-warning ping | grep -q PONG'
    pod["containers"] = [
        {
            "name": name,
            "image": "redis:7",
            # Kubernetes expands $(REDIS_PASSWORD) from the container's environment.
            "command": ["redis-server", *keep, "--requirepass", "$(REDIS_PASSWORD)", *policy],
            "env": [{"name": "REDIS_PASSWORD", "valueFrom": from_secret("redis-password")}],
            "ports": [{"name": "redis", "containerPort": REDIS_PORT}],
            "resources": resources,
            "readinessProbe": {"exec": {"command": ["sh", "-c", ping]}, "periodSeconds": 5},
            "livenessProbe": {"tcpSocket": {"port": REDIS_PORT}, "periodSeconds": 10},
            **({"volumeMounts": mounts} if mounts else {}),
            "securityContext": pod["containers"][0]["securityContext"],
        }
    ]
    if not pod.get("volumes"):
        pod.pop("volumes", None)
    made = [deploy, service(name, REDIS_PORT, port_name="redis")]
    return made if cache else [claim("imagerec-redis", "ReadWriteOnce", "1Gi"), *made]


def network_policy(component: str, sources: tuple[str, ...]) -> dict[str, Any]:
    """Only pods of ``sources`` may connect to ``component``'s pods (any port)."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": f"{component}-ingress", "labels": labels(component)},
        "spec": {
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": component}},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": s}}} for s in sources]}
            ],
        },
    }


def network_policies() -> list[dict[str, Any]]:
    """Redis and the model services answer the gateway, the job worker and the trainer alone; the
    gateway answers Nginx alone, which is what lets it believe X-Real-IP from any peer
    (GATEWAY_TRUSTED_PROXIES below). NOTE: a Prometheus that scrapes the pods directly needs a rule
    of its own added to these (its namespace or labels are the cluster's)."""
    callers = ("gateway", "worker", "trainer")
    return [
        *(network_policy(name, callers) for name in ("redis", "redis-cache", *MODELS)),
        network_policy("gateway", ("nginx",)),
    ]


def documents() -> list[dict[str, Any]]:
    # The Keras cache: ImageNet weights (put there once, e.g. from `make weights`) and converted
    # backends, shared by every model pod; writable by them through fsGroup (NOTE: NFS-backed
    # volumes ignore fsGroup: export them writable by group APP_ID). Job folders likewise: the
    # uploads and results of JOBS_RETENTION_S (a day), each upload up to JOBS_MAX_ARCHIVE_BYTES.
    # Custom models are heads of kilobytes (a features x classes matrix) per version, or whole
    # fine-tuned classifiers (ResNet50 95 MB, VGG16 530 MB per version; the trainer keeps the two
    # newest versions of each, TRAINING_KEEP_VERSIONS), which the model pods also convert into the
    # Keras volume.
    docs: list[dict[str, Any]] = [
        claim("imagerec-keras", "ReadWriteMany", "20Gi"),
        claim("imagerec-jobs", "ReadWriteMany", "20Gi"),
        claim("imagerec-custom-models", "ReadWriteMany", "10Gi"),
        *redis(),
        *redis("redis-cache", cache=True),
        *network_policies(),
    ]
    custom_volume = {
        "name": "custom-models",
        "persistentVolumeClaim": {"claimName": "imagerec-custom-models"},
    }
    custom_mount = {"name": "custom-models", "mountPath": CUSTOM_MODELS_DIR}
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
                    "CUSTOM_MODELS_DIR": CUSTOM_MODELS_DIR,
                },
                {"requests": {"cpu": "1", "memory": memory}, "limits": {"cpu": "2", "memory": memory_limit}},
                startup_failures=60,  # up to 5 minutes to load, convert and warm
                volumes=[
                    {"name": "keras", "persistentVolumeClaim": {"claimName": "imagerec-keras"}},
                    custom_volume,
                ],
                # The service only reads the custom models (it serves those trained on it).
                mounts=[{"name": "keras", "mountPath": KERAS_HOME}, {**custom_mount, "readOnly": True}],
                pause_s=MODEL_PAUSE_S,
                as_app_user=True,
            )
        )
        docs += [service(name, port, headless=True), autoscaler(name, maximum=4)]
    # Each model's headless Service: the gateway resolves it into one replica per ready pod, anew
    # every GATEWAY_DNS_REFRESH_S, stated here because the model pods' preStop pause follows it.
    gateway_env: dict[str, Any] = {
        **{f"{name.upper()}_URLS": f"http://{name}-pods:{port}" for name, (port, _, _) in MODELS.items()},
        "GATEWAY_DNS_REFRESH_S": str(GATEWAY_DNS_REFRESH_S),
        "REDIS_URL": f"redis://redis:{REDIS_PORT}/0",
        "GATEWAY_CACHE_REDIS_URL": f"redis://redis-cache:{REDIS_PORT}/0",
        # The password goes into both URLs (common.settings.with_password); the admin key and the
        # callbacks' signing key come from the same Secret.
        "REDIS_PASSWORD": from_secret("redis-password"),
        "IMAGEREC_ADMIN_KEY": from_secret("admin-key"),
        "JOBS_CALLBACK_SECRET": from_secret("callback-secret", optional=True),
        # Only Nginx's pods reach the gateway (its NetworkPolicy): every peer is the proxy.
        "GATEWAY_TRUSTED_PROXIES": "0.0.0.0/0,::/0",
        "JOBS_DIR": JOBS_DIR,
        "CUSTOM_MODELS_DIR": CUSTOM_MODELS_DIR,
    }
    jobs_volume = [{"name": "jobs", "persistentVolumeClaim": {"claimName": "imagerec-jobs"}}, custom_volume]
    # The trainer is the model repository's one writer (it removes models too, when the gateway
    # asks): the gateway and the job worker read it.
    jobs_mount: list[dict[str, Any]] = [
        {"name": "jobs", "mountPath": JOBS_DIR},
        {**custom_mount, "readOnly": True},
    ]
    docs += [
        deployment(
            "gateway",
            "imagerec-gateway:latest",
            8000,
            gateway_env,
            {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"cpu": "1", "memory": "512Mi"}},
            startup_failures=12,
            volumes=jobs_volume,
            mounts=jobs_mount,
            as_app_user=True,
        ),
        service("gateway", 8000),
        autoscaler("gateway", maximum=4),
        # The job worker: the gateway's image, environment and job folders; no Service (it only
        # takes tasks from Redis) and no autoscaler (see the module's docstring). Memory: three
        # processes of the gateway's code, each with JOBS_BATCH_IMAGES images at a time (not measured).
        deployment(
            "worker",
            "imagerec-gateway:latest",
            None,
            gateway_env,
            {"requests": {"cpu": "250m", "memory": "384Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}},
            command=worker_command(),
            volumes=jobs_volume,
            mounts=jobs_mount,
            as_app_user=True,
            grace_s=worker_stop_grace_s(),
        ),
        # The trainer: no Service, no autoscaler, one replica (one training at a time; more pods
        # would train in parallel, TensorFlow's memory each). Memory (estimated, not measured):
        # TensorFlow imported, ~0.5 GB, plus a training's features - at most TRAINING_MAX_IMAGES
        # (5,000) x (1 + TRAINING_AUGMENT_VIEWS, 2) views x 4,096 float32 (VGG16's) = 0.25 GB - in
        # three or four copies while Keras fits (the training rows, standardised, Keras's own): about
        # 1.5 GB at the largest, a typical one far less. Fine-tuning adds its copy of the base (up
        # to VGG16's 0.55 GB, Adam's state for the trained layers) and the cached activations, at
        # most TRAINING_FINE_TUNE_CACHE_MB (1 GB) twice over. So 1Gi requested and a 4Gi limit;
        # killed over it, the training fails and nothing is published. It reads the base's weights
        # file where the model services do (the keras volume, read-only).
        deployment(
            "trainer",
            "imagerec-trainer:latest",
            None,
            gateway_env,
            {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}},
            command=trainer_command(),
            volumes=[
                *jobs_volume,
                {"name": "keras", "persistentVolumeClaim": {"claimName": "imagerec-keras"}},
            ],
            mounts=[
                {"name": "jobs", "mountPath": JOBS_DIR},
                custom_mount,
                {"name": "keras", "mountPath": KERAS_HOME, "readOnly": True},
            ],
            as_app_user=True,
            grace_s=trainer_stop_grace_s(),
        ),
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
