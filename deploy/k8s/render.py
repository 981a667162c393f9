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
``JOBS_WORKER_PROCESSES`` model calls in flight (one per pool process), at background priority behind
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
custom models trained on it), and so do the gateway and the job worker: the trainer alone writes
it (it publishes, and removes the models the gateway is asked to delete).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from deploy.k8s.objects import (
    PAUSE_S,
    REDIS_PORT,
    autoscaler,
    claim,
    deployment,
    from_secret,
    network_policy,
    redis,
    service,
)
from deploy.settings import (
    CUSTOM_MODELS_DIR,
    JOBS_DIR,
    NginxSettings,
    model_stop_grace_s,
    trainer_command,
    trainer_stop_grace_s,
    worker_command,
    worker_stop_grace_s,
)

HERE = Path(__file__).resolve().parent
OUTPUT = HERE / "imagerec.yaml"
# Memory: the request is the base model alone; the limit leaves room for fine-tuned custom models,
# each a copy of the backbone (ResNet50 measured +267 MB fp32; VGG16's weights are 5.6x ResNet50's),
# CUSTOM_MAX_FINE_TUNED (2) of them plus one while a new version replaces one, and the child
# process that converts one to OpenVINO (TensorFlow and the Keras model, ~1.2 GB at its peak).
GATEWAY_GRPC_PORT, NGINX_GRPC_PORT = 8001, 8081  # the v2 gRPC service: the gateway's, the public one
MODELS = {  # name: (port, memory request, memory limit)
    "vgg16": (8501, "1600Mi", "7Gi"),
    "resnet50": (8502, "640Mi", "3Gi"),
    "inceptionv3": (8503, "640Mi", "3Gi"),
}
# NOTE: the gateway reads each model's headless Service name anew every GATEWAY_DNS_REFRESH_S (its
# default, stated so the pause below follows it); CoreDNS hands out pod records with a 5 s TTL. A
# model pod keeps serving until both have passed, so the gateway stops calling it before it drains.
GATEWAY_DNS_REFRESH_S = 10
MODEL_PAUSE_S = GATEWAY_DNS_REFRESH_S + 5
KERAS_HOME = "/keras"  # the shared volume: ImageNet weights in models/, converted backends below
MODEL_CACHE = f"{KERAS_HOME}/converted"


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


CUSTOM_VOLUME = {"name": "custom-models", "persistentVolumeClaim": {"claimName": "imagerec-custom-models"}}
CUSTOM_MOUNT = {"name": "custom-models", "mountPath": CUSTOM_MODELS_DIR}
KERAS_VOLUME = {"name": "keras", "persistentVolumeClaim": {"claimName": "imagerec-keras"}}


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
    return [*docs, *model_pods(), *job_pods(), *nginx_pods()]


def model_pods() -> list[dict[str, Any]]:
    """Per model: a Deployment, a headless Service (one replica per ready pod to the gateway) and
    an autoscaler, so each model scales on its own."""
    docs: list[dict[str, Any]] = []
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
                    KERAS_VOLUME,
                    CUSTOM_VOLUME,
                ],
                # The service only reads the custom models (it serves those trained on it).
                mounts=[{"name": "keras", "mountPath": KERAS_HOME}, {**CUSTOM_MOUNT, "readOnly": True}],
                pause_s=MODEL_PAUSE_S,
                grace_s=MODEL_PAUSE_S + model_stop_grace_s(),  # the pause, then DRAIN_S and Gunicorn's
                as_app_user=True,
            )
        )
        docs += [service(name, port, headless=True), autoscaler(name, maximum=4)]
    # Each model's headless Service: the gateway resolves it into one replica per ready pod, anew
    # every GATEWAY_DNS_REFRESH_S, stated here because the model pods' preStop pause follows it.
    return docs


def gateway_environment() -> dict[str, Any]:
    """What the gateway, the job worker and the trainer share: the replicas, Redis, the secrets
    and the folders."""
    return {
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
        # each gateway worker's v2 gRPC service (the job worker and the trainer do not start it)
        "GATEWAY_GRPC_BIND": f"0.0.0.0:{GATEWAY_GRPC_PORT}",
        "JOBS_DIR": JOBS_DIR,
        "CUSTOM_MODELS_DIR": CUSTOM_MODELS_DIR,
    }


def job_pods() -> list[dict[str, Any]]:
    """The gateway, the job worker and the trainer: one environment, the jobs' folders."""
    gateway_env = gateway_environment()
    jobs_volume = [{"name": "jobs", "persistentVolumeClaim": {"claimName": "imagerec-jobs"}}, CUSTOM_VOLUME]
    # The trainer is the model repository's one writer (it removes models too, when the gateway
    # asks): the gateway and the job worker read it.
    jobs_mount: list[dict[str, Any]] = [
        {"name": "jobs", "mountPath": JOBS_DIR},
        {**CUSTOM_MOUNT, "readOnly": True},
    ]
    return [
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
            grpc_port=GATEWAY_GRPC_PORT,
        ),
        service("gateway", 8000, grpc_port=GATEWAY_GRPC_PORT),
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
                KERAS_VOLUME,
            ],
            mounts=[
                {"name": "jobs", "mountPath": JOBS_DIR},
                CUSTOM_MOUNT,
                {"name": "keras", "mountPath": KERAS_HOME, "readOnly": True},
            ],
            as_app_user=True,
            grace_s=trainer_stop_grace_s(),
        ),
    ]


def nginx_pods() -> list[dict[str, Any]]:
    """Nginx in front: the only public Service."""
    nginx_env = {
        "NGINX_PORT": "8080",
        "GATEWAY_UPSTREAM": "gateway:8000",
        "NGINX_GRPC_PORT": str(NGINX_GRPC_PORT),
        "GATEWAY_GRPC_UPSTREAM": f"gateway:{GATEWAY_GRPC_PORT}",
    }
    nginx_env |= NginxSettings().template_values()
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
        grpc_port=NGINX_GRPC_PORT,
    )
    container = nginx["spec"]["template"]["spec"]["containers"][0]
    # Nginx is alive when it accepts connections, and ready when it reaches a gateway.
    for probe in ("startupProbe", "livenessProbe"):
        del container[probe]["httpGet"]
        container[probe]["tcpSocket"] = {"port": 8080}
    container["readinessProbe"]["httpGet"]["path"] = "/health/ready"
    container["lifecycle"]["preStop"]["exec"]["command"] = ["sh", "-c", f"sleep {PAUSE_S}; nginx -s quit"]
    del nginx["spec"]["template"]["metadata"]["annotations"]  # /metrics is not served by Nginx
    return [
        nginx,
        service("nginx", 8080, "LoadBalancer", grpc_port=NGINX_GRPC_PORT),
        autoscaler("nginx", maximum=3),
    ]


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
