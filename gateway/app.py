"""The gateway: one public API in front of every model service. Never imports TensorFlow.

``build`` makes the parts and registers the route tables (``create_app``: its Flask app); each
blueprint's module handles its URLs (the route -> module table is in docs/architecture.md).
``serve`` is what Gunicorn runs in each worker: the app, and the v2 gRPC service beside it
(``gateway.v2_grpc``), which calls the same parts directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flask import Flask, request

from common import web
from common.jobs.settings import JobSettings
from common.tenancy.settings import AuthSettings, QuotaSettings
from common.training.settings import TrainingSettings
from fleet.client import ModelClient, build_client
from fleet.fetch import UrlFetcher
from fleet.predict import Predictor
from fleet.registry import Registry
from gateway import auth as access
from gateway import cache as response_cache
from gateway import docs, job_service, jobs, keys, models, rate_limits, training, v1, v2
from gateway.classify import Classifier
from gateway.inputs import InputReader, UrlGate
from gateway.settings import GatewaySettings
from gateway.v2_service import V2Service


@dataclass(frozen=True)
class Gateway:
    """One gateway worker's parts: the Flask app (v1, v2 REST, jobs, training, keys) and what the
    v2 gRPC service calls beside it - the same auth, rate limit, v2 operations and registry."""

    app: Flask
    settings: GatewaySettings
    auth: access.Auth
    limit: rate_limits.SharedLimit
    protocol: V2Service
    registry: Registry


def create_app(*args: Any, **kwargs: Any) -> Flask:
    """The gateway's Flask app (``build``'s): what Gunicorn serves and most tests call."""
    return build(*args, **kwargs).app


def build(
    settings: GatewaySettings | None = None,
    client: ModelClient | None = None,
    fetcher: UrlFetcher | None = None,
    *,
    poll_health: bool = True,
    job_settings: JobSettings | None = None,
    training_settings: TrainingSettings | None = None,
    auth_settings: AuthSettings | None = None,
    quota_settings: QuotaSettings | None = None,
) -> Gateway:
    """Build the gateway; tests hand in a client (``responses``-backed) and ``poll_health=False``."""
    settings = settings or GatewaySettings.from_env()
    job_settings = job_settings or JobSettings.from_env()
    training_settings = training_settings or TrainingSettings.from_env()
    auth = access.Auth(auth_settings or AuthSettings.from_env(), settings.trusted_proxies)
    client = client or build_client(settings)
    registry = client.registry
    predictor = Predictor(client, settings)
    fetcher = fetcher or UrlFetcher.from_settings(settings)
    reader = InputReader(
        max_images=settings.max_request_images,
        max_image_bytes=settings.max_image_bytes,
        fetch_all=fetcher.fetch_all,
        gate=UrlGate(settings.url_requests, settings.url_requests_per_client),
        caller=auth.caller,
    )
    cache = response_cache.create(settings.cache_size, settings.cache_ttl_s, settings.cache_redis_url)
    policy = response_cache.Policy(cache, registry) if cache is not None else None
    classify = Classifier(settings, predictor, reader, policy, auth.caller)
    protocol = V2Service(settings, predictor)  # v2 over REST and gRPC alike
    queued = job_service.Jobs(
        job_settings, training_settings.queue, quota_settings or QuotaSettings.from_env(), auth
    )

    app = Flask("gateway")
    app.config.update(
        MAX_CONTENT_LENGTH=settings.max_body_bytes, MAX_FORM_MEMORY_SIZE=settings.max_body_bytes
    )
    # Bodies up to twice the limit (a job's upload limit, on its route) are drained after an early
    # answer (a 413 included), so the connection Nginx keeps alive stays clean; Nginx itself
    # refuses anything larger.
    web.install(
        app, drain_max_bytes=max(2 * settings.max_body_bytes, job_settings.max_archive_bytes + 1024 * 1024)
    )
    web.install_metrics(app, "gateway", lambda: model_label(registry))
    # The rate limit first: a flood of bad or made-up keys is refused before each costs a lookup.
    limiter = rate_limits.install(app, settings, auth)
    access.install(app, auth, registry)

    app.add_url_rule("/health/live", "live", lambda: web.json_ok({"status": "alive"}))
    app.add_url_rule("/health/ready", "ready", lambda: web.json_ok({"status": "ready"}))
    app.register_blueprint(v1.create_blueprint(settings, client, classify))
    app.register_blueprint(models.create_blueprint(settings, training_settings, auth, registry, queued))
    app.register_blueprint(v2.create_blueprint(settings, protocol))
    app.register_blueprint(jobs.create_blueprint(settings, client, queued))
    app.register_blueprint(training.create_blueprint(settings, training_settings, client, queued))
    app.register_blueprint(keys.create_blueprint(auth))
    app.register_blueprint(docs.create_blueprint())
    if poll_health:
        registry.start_polling(settings.health_interval_s)
    return Gateway(app, settings, auth, rate_limits.SharedLimit(limiter, settings), protocol, registry)


def serve() -> Flask:
    """The gateway as a Gunicorn worker runs it (``gateway.app:serve()``): the app and, when
    ``GATEWAY_GRPC_BIND`` names an address, the v2 gRPC service on it, answered by this app.
    NOTE: started here, in the worker, never before Gunicorn forks: gRPC's threads do not survive
    a fork."""
    settings = GatewaySettings.from_env()
    gateway = build(settings)
    if settings.grpc_bind:
        from gateway import v2_grpc  # gRPC and protoc load only where the service runs

        v2_grpc.serve(gateway)
    return gateway.app


def model_label(registry: Registry) -> str:
    """The request's model as a metrics label: known names only, never what a client typed."""
    if request.args.get("models"):
        return "ensemble"
    return known_model(request.args.get("model") or (request.view_args or {}).get("name", ""), registry)


def known_model(name: str, registry: Registry) -> str:
    """``name`` as a metrics label: a base model or ``ensemble``, else ``custom`` or ``other``."""
    if not name:
        return ""
    if name in registry.bases or name == "ensemble":
        return name
    # Custom models come and go with what users train: one label, or the series would grow.
    return "custom" if name in registry.custom() else "other"
