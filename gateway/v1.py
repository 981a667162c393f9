"""The v1 prediction routes, and the seed article's two routes kept for its clients.

``POST /v1/predict?model=<name>|models=<a,b,c>&top_k=``: every input kind (``gateway.inputs``);
one image answers inline, several (or ``files``) as ``results``; ``parents``, ``min_score``,
``include``, ``exclude`` and ``confidence`` ask for more than the flat top-k (``fleet.refine``).
``POST /predict`` and ``POST /batch_predict`` answer in the seed's shape from
``GATEWAY_LEGACY_MODEL``. The models' own URLs are in ``gateway.models``.
"""

from __future__ import annotations

from flask import Blueprint, Response, g, request

from common import web
from common.outcomes import Selection
from fleet.client import ModelClient
from fleet.refine import Refinement
from gateway import explain as explaining
from gateway import selection as selections
from gateway import shaping
from gateway.classify import Classifier
from gateway.settings import GatewaySettings


def refinement_from_query() -> Refinement:
    """``parents``, ``min_score``, ``include``, ``exclude``, ``confidence`` (``fleet.refine``)."""
    return Refinement(
        parents=web.query_flag("parents"),
        min_score=web.query_float("min_score") or 0.0,
        include=web.query_list("include"),
        exclude=web.query_list("exclude"),
        confidence=web.query_float("confidence"),
    )


def create_blueprint(settings: GatewaySettings, client: ModelClient, classify: Classifier) -> Blueprint:
    v1 = Blueprint("v1", __name__)
    legacy = Selection(settings.legacy_model, (settings.legacy_model,))

    @v1.post("/v1/predict")
    def predict() -> Response:
        selection = selections.from_query(request.args, settings, client.registry)
        top_k = web.query_int("top_k", settings.default_top_k, 1, settings.max_top_k)
        answer = classify(selection, top_k, refinement_from_query())
        return web.json_ok(shaping.predictions(answer.body, answer.outcomes, answer.batch))

    @v1.post("/v1/explain")
    def explain() -> Response:
        """One photo, one model: where the score of a class comes from (``gateway.explain``)."""
        selection = selections.from_query(request.args, settings, client.registry)
        return explaining.explain(settings, client, classify.reader, classify.predictor.limits, selection)

    @v1.post("/predict")
    def seed_predict() -> Response:
        """``file`` or form ``image`` (base64) -> the top 3 as ``label``/``prob``."""
        outcome = classify(legacy, settings.legacy_top_k).outcomes[0]
        return web.json_ok({"predictions": shaping.seed(outcome)})

    @v1.post("/batch_predict")
    def seed_batch_predict() -> Response:
        """Repeated ``files`` -> one entry per file, in order."""
        return web.json_ok(shaping.seed_batch(classify(legacy, settings.legacy_top_k).outcomes))

    @v1.after_request
    def _cache_header(response: Response) -> Response:
        if "cache" in g:
            response.headers["X-Cache"] = g.cache
        return response

    return v1
