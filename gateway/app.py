"""The gateway: one public API in front of every model service. Never imports TensorFlow."""

from __future__ import annotations

import time
from typing import Any

from flask import Flask, Response, g, request

from common import metrics, web
from common.errors import UnknownModel
from common.jobs.settings import JobSettings
from common.tenancy.settings import AuthSettings
from common.training.settings import TrainingSettings
from fleet.client import ModelClient, build_client
from fleet.fetch import UrlFetcher
from fleet.predict import ImageInput, Predictor, Selection, item_error, select
from gateway import auth as access
from gateway import cache as response_cache
from gateway import docs, jobs, keys, limits, training, v2
from gateway.inputs import InputReader
from gateway.settings import GatewaySettings


def create_app(
    settings: GatewaySettings | None = None,
    client: ModelClient | None = None,
    fetcher: UrlFetcher | None = None,
    *,
    poll_health: bool = True,
    job_settings: JobSettings | None = None,
    training_settings: TrainingSettings | None = None,
    auth_settings: AuthSettings | None = None,
) -> Flask:
    """Build the gateway; tests hand in a client (``responses``-backed) and ``poll_health=False``."""
    settings = settings or GatewaySettings.from_env()
    job_settings = job_settings or JobSettings.from_env()
    training_settings = training_settings or TrainingSettings.from_env()
    auth = access.Auth(auth_settings or AuthSettings.from_env(), settings.trusted_proxies)
    client = client or build_client(settings)
    fetcher = fetcher or UrlFetcher(
        timeout_s=settings.fetch_timeout_s,
        max_bytes=settings.fetch_max_bytes,
        max_redirects=settings.fetch_max_redirects,
        allow_networks=settings.fetch_allow_networks,
        allow_ports=settings.fetch_ports,
        max_per_host=settings.fetch_max_per_host,
        max_total_bytes=settings.fetch_max_total_bytes,
        max_parallel=settings.fetch_threads,
    )
    reader = InputReader(
        max_images=settings.max_batch_images,
        max_image_bytes=settings.max_image_bytes,
        fetch_all=fetcher.fetch_all,
    )
    predictor = Predictor(client, settings)
    registry = client.registry
    cache = response_cache.create(settings.cache_size, settings.cache_ttl_s, settings.cache_redis_url)
    if cache is not None:
        registry.on_weights_change = cache.drop

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

    def model_label() -> str:
        """The request's model as a metrics label: known names only, never what a client typed."""
        if request.args.get("models"):
            return "ensemble"
        name = request.args.get("model") or (request.view_args or {}).get("name", "")
        if not name:
            return ""
        if name in registry.bases or name == "ensemble":
            return name
        # Custom models come and go with what users train: one label, or the series would grow.
        return "custom" if name in registry.custom() else "other"

    web.install_metrics(app, "gateway", model_label)
    access.install(app, auth, registry)

    def read_images() -> tuple[list[ImageInput], bool]:
        items, batch = reader.read(request)
        if not batch and items[0].error:
            raise items[0].error
        predictor.validate(items)
        if not batch and items[0].error:
            raise items[0].error
        return items, batch

    def served_as(answer: dict[str, Any]) -> str | None:
        """What answered, for the cache key: the weights' hash and the precision they ran at."""
        digest = answer.get("weights_hash")
        return f"{digest}/{answer.get('precision') or 'fp32'}" if digest else None

    def cache_key(
        selection: Selection, image: bytes, top_k: int, weights: dict[str, str | None]
    ) -> str | None:
        """Only while every member's weights hash is known: it is part of the key."""
        if not all(weights.values()):
            return None
        parameters = {"top_k": top_k, "vote": selection.vote, "member_weights": selection.weights}
        return response_cache.key(image, weights, parameters)  # type: ignore[arg-type]

    def classify(selection: Selection, top_k: int) -> tuple[dict[str, Any], list[dict[str, Any]], bool]:
        started = time.perf_counter()
        deadline = web.deadline(settings.default_deadline_ms / 1000)
        items, batch = read_images()
        cacheable = cache is not None and not batch and items[0].error is None
        original = items[0].data  # the key is the client's bytes, before any canonical re-encoding
        if cacheable and cache is not None:
            expected = {m: served_as(registry.metadata(m)) for m in selection.members}
            key = cache_key(selection, original, top_k, expected)
            hit = cache.get(key) if key else None
            metrics.CACHE.labels("hit" if hit else "miss").inc()
            g.cache = "HIT" if hit else "MISS"
            if hit:
                cached = {**hit["body"], "request_id": web.request_id()}
                cached["timing_ms"] = {"total": round((time.perf_counter() - started) * 1000, 2)}
                return cached, hit["outcomes"], False
        predictor.canonicalize(selection, items)  # a hit never pays for the ensemble's re-encoding
        if not batch and items[0].error:
            raise items[0].error
        ingest_ms = (time.perf_counter() - started) * 1000
        result = predictor.run(selection, items, top_k=top_k, request_id=web.request_id(), deadline=deadline)
        body: dict[str, Any] = {"request_id": web.request_id(), "model": selection.name}
        replies = result["replies"]
        if selection.vote is None:
            reply = replies.get(selection.name, {})
            body.update(
                {field: reply.get(field) for field in ("weights", "weights_hash", "backend", "precision")}
            )
            if reply.get("version"):
                body["version"] = reply["version"]
            if reply.get("base"):  # a custom model: the model it was trained on (and how deep)
                body["base"] = reply["base"]
                if reply.get("fine_tune_layers"):
                    body["fine_tune_layers"] = reply["fine_tune_layers"]
        else:
            body.update(
                members=list(selection.members),
                vote=selection.vote,
                weights={m: replies[m].get("weights") if m in replies else None for m in selection.members},
                precision={
                    m: replies[m].get("precision") if m in replies else None for m in selection.members
                },
            )
            if selection.vote != "soft":
                body["member_weights"] = selection.weights
            body["degraded"] = bool(result["failures"])
            body["failed_members"] = [
                {"model": m, "code": e.code, "reason": e.message} for m, e in result["failures"].items()
            ]
        if (
            cacheable
            and cache is not None
            and not result["failures"]
            and "error" not in result["outcomes"][0]
        ):
            # Keyed by the weights that actually answered: during a rollout the replica that
            # answered may not be the one the lookup's hashes came from.
            served = {m: served_as(reply) for m, reply in replies.items()}
            key = cache_key(selection, original, top_k, served)
            if key:
                cache.put(key, {"body": dict(body), "outcomes": result["outcomes"]})
        body["timing_ms"] = {
            "ingest": round(ingest_ms, 2),
            **result["timing_ms"],
            "total": round((time.perf_counter() - started) * 1000, 2),
        }
        return body, result["outcomes"], batch

    @app.get("/health/live")
    def live() -> Response:
        return web.json_ok({"status": "alive"})

    @app.get("/health/ready")
    def ready() -> Response:
        return web.json_ok({"status": "ready"})

    def describe(name: str) -> dict[str, Any]:
        """A model's listing entry as this caller may see it: empty when it is someone else's
        private custom model (or went between listing and describing); replica addresses for the
        admin alone."""
        principal = auth.principal()
        if registry.is_custom(name) and not auth.owners.visible(name, principal):
            return {}
        try:
            entry = registry.describe(name)
        except UnknownModel:
            return {}
        if registry.is_custom(name):
            found = auth.owners.of(name)
            entry["public"] = found.public
            if principal.sees(found.owner):
                entry["owner"] = found.owner
        if not principal.is_admin:
            entry["replicas"] = [
                {k: v for k, v in replica.items() if k not in ("url", "host")}
                for replica in entry["replicas"]
            ]
        return entry

    @app.get("/v1/models")
    def models() -> Response:
        """What the poller saw last (each replica says when): a listing never waits on a replica."""
        return web.json_ok(
            {
                "models": [entry for name in registry.models if (entry := describe(name))],
                "ensemble": {
                    "name": "ensemble",
                    "members": list(settings.ensemble_members),
                    "votes": ["soft", "hard", "weighted"],
                    "quorum": settings.ensemble_quorum,
                },
            }
        )

    @app.get("/v1/models/<name>")
    def model(name: str) -> Response:
        entry = describe(name)
        if not entry:  # went away, or became private, since the checks before this route
            raise UnknownModel(f"unknown model {name[:64]!r}")
        return web.json_ok(entry)

    @app.post("/v1/predict")
    def predict() -> Response:
        selection = select(request.args, settings, client)
        top_k = web.query_int("top_k", settings.default_top_k, 1, settings.max_top_k)
        body, outcomes, batch = classify(selection, top_k)
        if batch:
            body["results"] = outcomes
        elif "error" in outcomes[0]:
            raise item_error(outcomes[0])
        else:
            body.update({k: v for k, v in outcomes[0].items() if k not in ("index", "name")})
        body["timing_ms"] = body.pop("timing_ms")  # keep timings last, after the predictions
        return web.json_ok(body)

    def legacy_predictions(outcome: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"label": p["label"], "prob": p["score"]} for p in outcome["predictions"]]

    @app.post("/predict")
    def seed_predict() -> Response:
        """The seed article's route: ``file`` or form ``image`` (base64) -> top 3 ``label``/``prob``."""
        _, outcomes, _ = classify(
            Selection(settings.legacy_model, (settings.legacy_model,)), settings.legacy_top_k
        )
        if "error" in outcomes[0]:
            raise item_error(outcomes[0])
        return web.json_ok({"predictions": legacy_predictions(outcomes[0])})

    @app.post("/batch_predict")
    def seed_batch_predict() -> Response:
        """The seed article's batch route: repeated ``files`` -> one entry per file, in order."""
        _, outcomes, _ = classify(
            Selection(settings.legacy_model, (settings.legacy_model,)), settings.legacy_top_k
        )
        return web.json_ok(
            {
                "results": [
                    {"filename": o["name"], "predictions": legacy_predictions(o)}
                    if "predictions" in o
                    else {"filename": o["name"], "error": o["error"]}
                    for o in outcomes
                ]
            }
        )

    @app.after_request
    def _cache_header(response: Response) -> Response:
        if "cache" in g:
            response.headers["X-Cache"] = g.cache
        return response

    app.register_blueprint(v2.create_blueprint(settings, predictor))
    app.register_blueprint(docs.create_blueprint())
    app.register_blueprint(jobs.create_blueprint(settings, job_settings, client))
    app.register_blueprint(training.create_blueprint(settings, job_settings, training_settings, client))
    app.register_blueprint(keys.create_blueprint(auth))
    limits.install(app, settings)
    if poll_health:
        registry.start_polling(settings.health_interval_s)
    return app
