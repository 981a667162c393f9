"""Prometheus metrics for the gateway and every model service (prometheus-client).

Under Gunicorn each worker writes its samples to files in ``PROMETHEUS_MULTIPROC_DIR`` (the fleet,
the containers and the manifests set it; ``deploy/gunicorn.conf.py`` empties it at start and retires
dead workers' files) and ``/metrics`` sums every worker's (``MultiProcessCollector``), so a scrape
sees the whole process group whichever worker answers. Without the variable (tests, one process)
the default registry is served. Names map to Triton's in the README ("Metrics").
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.registry import Collector

CONTENT_TYPE = CONTENT_TYPE_LATEST
"""The Content-Type of what ``scrape`` returns."""

SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

REQUESTS = Counter(
    "imagerec_requests_total",
    "Requests answered, by component, route, model and status (HTTP's code; gRPC's code name and RPC)",
    ["component", "route", "model", "status"],
)
REQUEST_SECONDS = Histogram(
    "imagerec_request_duration_seconds",
    "Time to answer an HTTP request",
    ["component", "route", "model"],
    buckets=SECONDS,
)
QUEUE_SECONDS = Histogram(
    "imagerec_queue_duration_seconds",
    "Time a request waited for its batch to start",
    ["model"],
    buckets=SECONDS,
)
INFERENCE_SECONDS = Histogram(
    "imagerec_inference_duration_seconds", "Model time per batch (one model call)", ["model"], buckets=SECONDS
)
BATCH_SIZE = Histogram(
    "imagerec_batch_size", "Images per model call", ["model"], buckets=(1, 2, 4, 8, 16, 32, 64)
)
INFERENCES = Counter("imagerec_inference_images_total", "Images run through the model", ["model"])
EXECUTIONS = Counter("imagerec_inference_batches_total", "Model calls (batches)", ["model"])
SHED = Counter(
    "imagerec_shed_total",
    "Requests a model service refused or dropped: overloaded, queue_full, deadline",
    ["model", "reason"],
)
PENDING = Gauge(
    "imagerec_pending_images",
    "Images admitted and not yet answered: decoding, queued or running",
    ["model"],
    multiprocess_mode="livesum",
)
MODEL_READY = Gauge(
    "imagerec_model_ready", "1 once the model is loaded and warmed", ["model"], multiprocess_mode="livemax"
)
MODEL_PRECISION_BITS = Gauge(
    "imagerec_model_precision_bits",
    "Bits of the numbers the model serves with: 32 (fp32), 16 (bf16) or 8 (int8 or int8-weights), past "
    "their quality gates",
    ["model"],
    multiprocess_mode="livemax",
)
MODEL_LOAD_SECONDS = Gauge(
    "imagerec_model_load_seconds",
    "Seconds the model took to load and warm",
    ["model", "backend"],
    multiprocess_mode="livemax",
)
MEMBER_SECONDS = Histogram(
    "imagerec_gateway_member_duration_seconds",
    "Gateway -> model service call time",
    ["model"],
    buckets=SECONDS,
)
MEMBER_FAILURES = Counter(
    "imagerec_gateway_member_failures_total",
    "Failed gateway -> model service calls, by reason",
    ["model", "reason"],
)
CACHE = Counter("imagerec_gateway_cache_total", "Response cache lookups: hit or miss", ["result"])


_COLLECTORS: dict[str, Collector] = {}


def add_collector(name: str, collector: Collector) -> None:
    """Serve ``collector``'s samples too (the last one added under ``name``): figures read at
    scrape time, e.g. from Redis, which are the same whichever worker answers."""
    _COLLECTORS[name] = collector


def _registry() -> CollectorRegistry:
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return registry


def scrape() -> bytes:
    """Every sample, in Prometheus' text format (``CONTENT_TYPE``): all workers', plus the
    collectors added with ``add_collector``."""
    extra = CollectorRegistry(auto_describe=False)
    for collector in _COLLECTORS.values():
        extra.register(collector)
    return bytes(generate_latest(_registry()) + generate_latest(extra))
