"""The training routes: train custom classes on a user's photos, and remove a custom model.

``POST /v1/training`` (multipart): ``dataset`` = a zip or tar of one folder per class; ``name`` =
the model name clients will use; ``base`` = vgg16 | resnet50 | inceptionv3 (default resnet50);
optional ``epochs``, ``validation_split``, ``augment``, ``fine_tune_layers`` (0: a head on the
frozen backbone; N: the backbone's last N layers trained too, a model with a backbone of its own,
refused with 409 when the base's service already holds ``CUSTOM_MAX_FINE_TUNED`` of them). Fields
may come in the form or the query.
Everything is checked before a job exists - the options, the archive (the jobs' limits), and the
dataset (``common.training.dataset``: classes, readable images per class) - and a refusal names
every problem. The answer is ``202`` and a job in the jobs API (``kind: training``), which the
training workers run (``workers.training.runner``). A custom model's own URL (``GET``, ``DELETE``,
``PATCH /v1/models/<name>``) is in ``gateway.models``.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, request

from common import imaging, repository, web
from common.errors import BadRequest, ServiceError
from common.jobs import queue
from common.models import BACKBONE_LAYERS, BASE_MODELS
from common.tenancy.owners import LEGACY, NameTaken
from common.tenancy.quotas import Reservation
from common.training.dataset import Dataset, Entry, check
from common.training.settings import TrainingSettings
from fleet.client import ModelClient
from gateway.job_intake import Intake
from gateway.job_service import Jobs, store_call
from gateway.settings import GatewaySettings

FIELDS = ("name", "base", "epochs", "validation_split", "augment", "fine_tune_layers", "public")


class TrainingUnavailable(ServiceError):
    status, code, retry_after = 503, "training_unavailable", 30


def options(raw: dict[str, str], settings: TrainingSettings, bases: list[str]) -> dict[str, Any]:
    """The training options from the form/query, every problem listed in one 400."""
    problems = []
    name = raw.get("name", "")
    if reason := repository.check_name(name, tuple(bases)):
        problems.append(f"name: {reason}")
    base = raw.get("base") or "resnet50"
    if base not in BASE_MODELS or base not in bases:
        offered = ", ".join(b for b in BASE_MODELS if b in bases)
        problems.append(f"base must be one of {offered}, got {base[:40]!r}")

    def number(key: str, kind: type, default: Any, low: float, high: float) -> Any:
        text = raw.get(key, "")
        if text == "":
            return default
        try:
            value = kind(text)
        except ValueError:
            problems.append(f"{key} must be a {kind.__name__}, got {text[:40]!r}")
            return default
        if not low <= value <= high:
            problems.append(f"{key} must be between {low:g} and {high:g}, got {text[:40]!r}")
        return value

    epochs = number("epochs", int, settings.default_epochs, 1, settings.max_epochs)
    split = number("validation_split", float, settings.default_validation_split, 0.0, 0.5)
    fine_tune = number("fine_tune_layers", int, 0, 0, BACKBONE_LAYERS.get(base, 0))
    flags = {}
    for key in ("augment", "public"):
        flag = raw.get(key, "false").strip().lower()
        if flag not in ("1", "true", "yes", "on", "0", "false", "no", "off", ""):
            problems.append(f"{key} must be true or false, got {flag[:20]!r}")
        flags[key] = flag in ("1", "true", "yes", "on")
    if problems:
        raise BadRequest("training refused: " + "; ".join(problems), code="invalid_training_options")
    return {
        "name": name,
        "base": base,
        "epochs": epochs,
        "validation_split": split,
        "augment": flags["augment"],
        "fine_tune_layers": fine_tune,
        "public": flags["public"],
    }


def require_multipart() -> None:
    if request.mimetype != "multipart/form-data":
        raise BadRequest(
            "send the training dataset as multipart/form-data: 'dataset' (a zip or tar of one "
            "folder per class) and 'name'",
            code="unsupported_media_type",
            status=415,
        )


def checked_dataset(
    items: list[dict[str, Any]], staged: Path, limits: imaging.ImageLimits, settings: TrainingSettings
) -> Dataset:
    """The upload's images as a dataset (``common.training.dataset``: classes, readable images per
    class, within the limits; every problem named in one refusal), written beside them."""
    entries = [Entry(item["name"], staged / item["file"]) for item in items if "file" in item]
    dataset = check(
        entries,
        staged,
        limits,
        min_images_per_class=settings.min_images_per_class,
        max_classes=settings.max_classes,
        max_images=settings.max_images,
    )
    dataset.write(staged)
    return dataset


def training_record(chosen: dict[str, Any], dataset: Dataset) -> dict[str, Any]:
    """What a training job's record says it was asked and given."""
    return {
        "kind": "training",
        "model": chosen["name"],
        "base": chosen["base"],
        "options": {k: v for k, v in chosen.items() if k not in ("name", "base", "public")},
        "classes": dataset.classes,
        "counts": dataset.counts(),
        "skipped": dataset.skipped,
        "phase": "queued",
        "total": len(dataset.items),
        "chunks": 0,
        "top_k": 0,
        "request_id": web.request_id(),
    }


def models_dir(settings: TrainingSettings) -> Path:
    """The model repository, which the gateway only reads (the trainer writes it)."""
    if not settings.models_dir:
        raise TrainingUnavailable("custom models need CUSTOM_MODELS_DIR (where they are published)")
    return Path(settings.models_dir)


def create_blueprint(
    gateway: GatewaySettings, settings: TrainingSettings, client: ModelClient, jobs: Jobs
) -> Blueprint:
    job_settings = jobs.settings
    intake = Intake(job_settings, gateway.max_image_bytes, archive_field="dataset", fields=FIELDS)
    limits = imaging.ImageLimits(gateway.max_image_bytes, gateway.max_image_pixels)
    auth = jobs.auth
    blueprint = Blueprint("training", __name__)

    def check_name_free(name: str) -> None:
        """Another principal's name is a 409 - a model from before keys (on disk, with no owner
        recorded) is the admin's."""
        principal = auth.principal()
        auth.owners.check_free(name, principal)
        legacy = auth.owners.of(name) is LEGACY and (models_dir(settings) / name).is_dir()
        if legacy and not principal.is_admin:
            raise NameTaken(f"the model name {name!r} belongs to another principal: choose another name")

    def check_fine_tuning(chosen: dict[str, Any]) -> None:
        check_name_free(chosen["name"])
        if chosen["fine_tune_layers"]:
            client.registry.check_room_for_fine_tuned(chosen["base"], chosen["name"])

    def claim(chosen: dict[str, Any]) -> bool:
        principal = auth.principal()
        quotas = None if principal.is_admin else jobs.quotas.quotas(principal)
        return bool(
            store_call(
                lambda: auth.owners.claim(
                    chosen["name"],
                    principal,
                    chosen["base"],
                    fine_tuned=bool(chosen["fine_tune_layers"]),
                    public=chosen["public"],
                    quotas=None if quotas is None else (quotas.custom_models, quotas.fine_tuned),
                    total=jobs.quota_settings.total_custom_models,
                )
            )
        )

    @blueprint.post("/v1/training")
    def submit() -> Response:
        request.max_content_length = job_settings.max_archive_bytes
        models_dir(settings)
        require_multipart()
        early = {key: request.args[key] for key in FIELDS if key in request.args}
        if "name" in early:  # refuse what the query already shows is wrong, before the upload
            check_fine_tuning(options(early, settings, client.registry.bases))
        # The caller's place, taken before the upload is read (refused at once when a quota is
        # full) and given back unless the training is queued.
        with jobs.reserve(min(job_settings.max_images, settings.max_images), training=True) as reservation:
            return receive(early, reservation)

    def receive(early: dict[str, str], reservation: Reservation) -> Response:
        staged = jobs.store.staging()
        job_id = uuid.uuid4().hex
        try:
            received = intake.receive(request, staged, reservation)
            doubled = sorted(key for key in FIELDS if key in early and key in received.fields)
            if doubled:
                raise BadRequest(f"give {', '.join(doubled)} once: in the query or in the form")
            chosen = options({**early, **received.fields}, settings, client.registry.bases)
            check_fine_tuning(chosen)
            dataset = checked_dataset(received.items, staged, limits, settings)
            record = {**training_record(chosen, dataset), "input_bytes": received.bytes}
            fresh = claim(chosen)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        try:
            return jobs.open(
                job_id, staged, record, lambda: queue.enqueue_training(jobs.queue, job_id), reservation
            )
        except BaseException:
            if fresh:  # nothing was trained under it: the name is free again
                auth.owners.release(chosen["name"])
            raise

    return blueprint
