"""Fleet settings: how the gateway and the job workers reach the model services (``GATEWAY_<FIELD>``,
plus ``<MODEL>_URLS`` for each model's replicas): routing, ensembles, time-outs, retries, breakers,
probes and URL fetching."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from common.models import BASE_MODELS
from common.settings import load, refuse_renamed, setting

S = TypeVar("S", bound="FleetSettings")
DEFAULT_URLS = {
    "vgg16": "http://127.0.0.1:8501",
    "resnet50": "http://127.0.0.1:8502",
    "inceptionv3": "http://127.0.0.1:8503",
}


RENAMED = {"MAX_BATCH_IMAGES": "GATEWAY_MAX_REQUEST_IMAGES ('batch' names the services' model calls)"}
"""Settings whose name changed: refused at start-up (``common.settings.refuse_renamed``)."""


@dataclass(frozen=True)
class FleetSettings:
    models: tuple[str, ...] = setting(BASE_MODELS, "models routed by name")
    ensemble_models: tuple[str, ...] = setting((), "members of model=ensemble (empty: all models)")
    ensemble_quorum: float = setting(0.5, "fraction of members (rounded up) that must answer, else 503")
    default_top_k: int = setting(5, "predictions returned when top_k is not given")
    max_top_k: int = setting(1000, "largest top_k accepted")
    max_image_bytes: int = setting(10 * 1024 * 1024, "largest single encoded image (413)")
    max_image_pixels: int = setting(
        40_000_000, "largest declared width x height (413), checked before decoding"
    )
    max_request_images: int = setting(32, "most images in one request, checked before decoding")
    connect_timeout_s: float = setting(1.0, "connect timeout to a model replica")
    member_timeout_s: float = setting(30.0, "time a model replica has to answer")
    default_deadline_ms: float = setting(
        30_000.0,
        "deadline of a request that brings none (X-Deadline-Ms, timeout_ms), counted from its arrival at "
        "Nginx; members are told what is left of it, and admit only what they can answer in time",
    )
    connect_retries: int = setting(1, "extra rounds over a model's replicas when all refuse to connect")
    retry_backoff_s: float = setting(0.05, "first back-off before such a round (doubles, +-50% jitter)")
    breaker_fail_max: int = setting(
        5, "consecutive failures (connect, time-out, 5xx, garbage) that open a replica's circuit"
    )
    breaker_reset_s: float = setting(5.0, "seconds an open circuit waits before one trial call")
    health_interval_s: float = setting(2.0, "seconds between readiness probes of every replica")
    request_threads: int = setting(
        64, "Gunicorn threads per gateway worker: sizes the fan-out pool and connection pool"
    )
    fanout_threads: int = setting(
        0, "threads calling members in parallel per gateway worker (0: request_threads x number of models)"
    )
    unknown_model_probe_s: float = setting(
        1.0,
        "a request naming a model no replica listed at the last probe re-probes every replica first, at "
        "most this often (0: never): a model the trainer just published is routed at once",
    )
    dns_refresh_s: float = setting(
        10.0, "seconds between DNS lookups of replica host names, one replica per address (0: never)"
    )
    fetch_threads: int = setting(8, "image URLs of one request fetched at once")
    fetch_timeout_s: float = setting(10.0, "total time for fetching an image URL, redirects included")
    fetch_max_bytes: int = setting(10 * 1024 * 1024, "largest image fetched from a URL")
    fetch_max_redirects: int = setting(3, "redirect hops followed (each one re-checked)")
    fetch_max_total_bytes: int = setting(
        64 * 1024 * 1024, "most bytes fetched from image URLs for one request (or one job batch) in all"
    )
    fetch_max_per_host: int = setting(
        4, "fetches from one host at once, per process: a slow host cannot hold every fetch thread"
    )
    fetch_allow_networks: tuple[str, ...] = setting(
        (), "CIDRs the URL fetcher may reach besides public addresses (off)"
    )
    fetch_allow_ports: tuple[str, ...] = setting(
        ("80", "443"), "ports the URL fetcher (and job callbacks) may connect to; empty: any"
    )
    replicas: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Replica base URLs per model, from ``<MODEL>_URLS`` (comma-separated)."""

    @classmethod
    def from_env(cls: type[S], environ: Mapping[str, str] | None = None) -> S:
        env = os.environ if environ is None else environ
        refuse_renamed(env, RENAMED, ("GATEWAY_",))
        return load(cls, ("GATEWAY_",), env, **cls._derived(load(cls, ("GATEWAY_",), env), env))

    @classmethod
    def _derived(cls, base: FleetSettings, env: Mapping[str, str]) -> dict[str, object]:
        """Values read from variables other than ``GATEWAY_<FIELD>``: ``<MODEL>_URLS``."""
        replicas = {}
        for name in base.models:
            raw = env.get(f"{name.upper()}_URLS") or DEFAULT_URLS.get(name)
            if not raw:
                raise ValueError(f"model {name!r} has no replicas: set {name.upper()}_URLS")
            replicas[name] = tuple(url.strip().rstrip("/") for url in raw.split(",") if url.strip())
        return {"replicas": replicas}

    @property
    def fetch_ports(self) -> tuple[int, ...]:
        try:
            return tuple(int(port) for port in self.fetch_allow_ports)
        except ValueError:
            raise ValueError(
                f"GATEWAY_FETCH_ALLOW_PORTS: port numbers, got {self.fetch_allow_ports}"
            ) from None

    @property
    def ensemble_members(self) -> tuple[str, ...]:
        return self.ensemble_models or self.models
