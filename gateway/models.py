"""Every route of ``/v1/models``: the listing, and one model's ``GET``, ``DELETE`` and ``PATCH``.

The listing and a model's entry are what the registry's poller saw last (each replica says when):
they never wait on a replica. A private custom model is visible to its owner (and the admin)
alone - to anyone else it does not exist (404) - and replica addresses are the admin's alone.
``DELETE`` removes a custom model, every version: the trainer, the repository's one writer, does it
(``common.training.removals``); ``PATCH {"public": bool}`` shares it or takes it back.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, request

from common import repository, web
from common.errors import BadRequest, NotFound, UnknownModel
from common.tenancy.owners import LEGACY
from common.training import removals
from common.training.settings import TrainingSettings
from fleet.registry import Registry
from gateway.auth import Auth
from gateway.job_service import Jobs, store_call
from gateway.settings import GatewaySettings
from gateway.training import models_dir


def create_blueprint(
    settings: GatewaySettings, training: TrainingSettings, auth: Auth, registry: Registry, jobs: Jobs
) -> Blueprint:
    models = Blueprint("models", __name__)

    def describe(name: str) -> dict[str, Any]:
        """A model's entry as this caller may see it: empty when it is someone else's private
        custom model (or went between listing and describing)."""
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

    def owned_or_404(name: str) -> None:
        """The caller owns custom model ``name`` (or is the admin), or gets a missing model's 404."""
        if name in registry.bases:
            raise BadRequest(f"{name} is a model of the fleet, not a custom model", code="not_custom")
        if repository.check_name(name) or not auth.principal().sees(auth.owners.of(name).owner):
            raise NotFound(f"no custom model {name[:64]!r}", code="unknown_model")

    def on_disk_or_404(name: str) -> None:
        """A model from before keys (no owner recorded) exists while its folder does."""
        if auth.owners.of(name) is LEGACY and not (models_dir(training) / name).is_dir():
            raise NotFound(f"no custom model {name[:64]!r}", code="unknown_model")

    @models.get("/v1/models")
    def listing() -> Response:
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

    @models.get("/v1/models/<name>")
    def model(name: str) -> Response:
        entry = describe(name)
        if not entry:  # went away, or became private, since the checks before this route
            raise UnknownModel(f"unknown model {name[:64]!r}")
        return web.json_ok(entry)

    @models.delete("/v1/models/<name>")
    def remove(name: str) -> Response:
        owned_or_404(name)
        try:
            on_disk_or_404(name)
        except NotFound:
            auth.audit("model.delete", name, "not_found")
            raise
        # A training of it in flight is cancelled, and the name stays its owner's until that
        # training has stopped: the trainer publishes nothing of it and then frees the name.
        in_flight = [
            job["id"]
            for job in store_call(jobs.store.active)
            if job.get("kind") == "training" and job.get("model") == name
        ]
        if in_flight:
            store_call(auth.owners.mark_deleting, name)
        for job_id in in_flight:
            store_call(jobs.store.cancel, job_id)
            auth.audit("training.cancel", job_id, "model_deleted")
        # Not answered within TRAINING_REMOVE_WAIT_S, the removal stays queued for the trainer: a 202.
        removed = store_call(removals.ask, jobs.store.redis, name, training.remove_wait_s)
        if not in_flight:
            store_call(auth.owners.release, name)
        auth.audit("model.delete", name, "ok" if removed is not None else "queued")
        if removed is None:
            return web.json_ok({"deleted": name, "state": "queued"}, status=202)
        return web.json_ok({"deleted": name})

    @models.patch("/v1/models/<name>")
    def share(name: str) -> Response:
        """``{"public": true}``: every caller may see and use the model; ``false``: its owner alone."""
        owned_or_404(name)
        body = request.get_json(silent=True)
        if not isinstance(body, dict) or not isinstance(body.get("public"), bool) or len(body) != 1:
            raise BadRequest('send JSON {"public": true} or {"public": false}', code="invalid_json")
        on_disk_or_404(name)
        store_call(lambda: auth.owners.set_public(name, body["public"]))
        auth.audit("model.share", name, public=body["public"])
        return web.json_ok({"name": name, "public": body["public"]})

    return models
