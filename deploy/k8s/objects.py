"""The Kubernetes objects the fleet is made of, as plain dicts: Deployments with their probes, pause
and security context, Services, autoscalers, claims, a Redis pod, network policies.
``deploy.k8s.render`` assembles the fleet from them."""

from __future__ import annotations

from typing import Any

from deploy.settings import GUNICORN_GRACEFUL_S  # a pod's grace: this plus its preStop pause

PART_OF = {"app.kubernetes.io/part-of": "imagerec"}
PAUSE_S = 5  # preStop: long enough for a Service's endpoints to drop the pod
APP_ID = 10001  # the Dockerfile's non-root `app` user, and its group (same id)
REDIS_ID = 999  # the redis image's `redis` user and group
REDIS_PORT = 6379
SECRET = "imagerec-secrets"  # made by the operator (docs: Deployment): never rendered here


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
    grpc_port: int | None = None,
) -> dict[str, Any]:
    """A Deployment of one container; ``port`` None: no HTTP (no probes, no pause, no scraping);
    ``grpc_port``: a second port, named ``grpc``. An ``env`` value is a string, or a ``from_secret``
    reference."""
    container: dict[str, Any] = {"name": component, "image": image}
    if command:
        container["command"] = command
    if port is not None:
        container["ports"] = [{"name": "http", "containerPort": port}]
    if grpc_port is not None:
        container.setdefault("ports", []).append({"name": "grpc", "containerPort": grpc_port})
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
    grace = grace_s if grace_s is not None else GUNICORN_GRACEFUL_S + pause_s
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
    component: str,
    port: int,
    kind: str = "ClusterIP",
    *,
    headless: bool = False,
    port_name: str = "http",
    grpc_port: int | None = None,
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
    if grpc_port is not None:  # cleartext HTTP/2, so a load balancer that reads it does not guess
        spec["ports"].append(
            {"name": "grpc", "port": grpc_port, "targetPort": "grpc", "appProtocol": "kubernetes.io/h2c"}
        )
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
