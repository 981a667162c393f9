"""Gateway settings: the fleet's (``fleet.settings``), and what only the HTTP gateway has - its body
limit, rate limits, trusted proxies, response cache and the seed article's routes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from common.settings import setting, with_password
from fleet.settings import FleetSettings


@dataclass(frozen=True)
class GatewaySettings(FleetSettings):
    max_body_bytes: int = setting(10 * 1024 * 1024, "largest request body, form fields included (413)")
    rate_limit: str = setting(
        "100/second", "per-client limit, Flask-Limiter syntax ('100/second;2000/minute'); empty: off"
    )
    rate_limit_storage: str = setting(
        "",
        "where limits are counted: empty = memory per worker, or redis://host:port (falls back to REDIS_URL)",
    )
    trusted_proxies: tuple[str, ...] = setting(
        ("127.0.0.1/32", "::1/128"),
        "CIDRs of the proxy (Nginx) whose X-Real-IP names the client; any other peer is the client",
    )
    cache_size: int = setting(
        1024,
        "answers the response cache keeps in each gateway worker's memory, in front of Redis if set (0: off)",
    )
    cache_ttl_s: float = setting(300.0, "seconds a cached answer is served")
    cache_redis_url: str = setting(
        "", "redis://host:6379 to share the cache across workers and gateways (falls back to REDIS_URL)"
    )
    grpc_bind: str = setting(
        "",
        "host:port of the v2 gRPC service (KServe's GRPCInferenceService) in every gateway worker, "
        "e.g. 0.0.0.0:8001; empty: off (the local fleet and compose turn it on, behind Nginx's gRPC port)",
    )
    grpc_threads: int = setting(32, "threads answering gRPC calls per gateway worker")
    grpc_max_concurrent: int = setting(
        128, "gRPC calls a gateway worker holds at once, answering or waiting (more: RESOURCE_EXHAUSTED)"
    )
    grpc_grace_s: float = setting(10.0, "seconds a stopping gateway worker lets its gRPC calls finish")
    url_requests: int = setting(
        16,
        "requests with image URLs one gateway worker fetches for at once; more are refused at once "
        "(503 fetch_busy), so a slow host never holds the threads photos sent as bytes need",
    )
    url_requests_per_client: int = setting(
        4, "of those, one client's at once (its key, or its address when anonymous)"
    )
    legacy_model: str = setting("resnet50", "model behind the seed routes /predict and /batch_predict")
    legacy_top_k: int = setting(3, "predictions returned by the seed routes")

    @classmethod
    def _derived(cls, base: FleetSettings, env: Mapping[str, str]) -> dict[str, object]:
        derived = super()._derived(base, env)
        for name in ("cache_redis_url", "rate_limit_storage"):
            # One variable for every Redis user (each may still say otherwise), REDIS_PASSWORD in it.
            derived[name] = with_password(getattr(base, name) or env.get("REDIS_URL", ""), env)
        return derived
