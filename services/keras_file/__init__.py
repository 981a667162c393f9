"""A model of your own served by the same code as the ImageNet models: a ``.keras`` file plus a
labels file (not to be confused with the custom models users train, ``CUSTOM_MODELS_DIR``).

Settings (prefix ``KERAS_FILE_``): ``KERAS_FILE_NAME``, ``KERAS_FILE_INPUT_SIZE``,
``KERAS_FILE_PREPROCESSING``, ``KERAS_FILE_LABELS``; the model file is ``<NAME>_WEIGHTS`` (or
``WEIGHTS``), like any service. The ``CUSTOM_`` names these had before are refused at start-up.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from flask import Flask

from common.models import ModelSpec
from common.settings import load, refuse_renamed, setting
from serving import app as service

RENAMED_PREFIX = "CUSTOM_"
RENAMED = {field: f"KERAS_FILE_{field}" for field in ("NAME", "INPUT_SIZE", "PREPROCESSING", "LABELS")}
"""The file service's settings were ``CUSTOM_<FIELD>``, which also named the trained custom models."""


@dataclass(frozen=True)
class KerasFileSettings:
    name: str = setting("", "model name clients use (required)")
    input_size: int = setting(224, "square input side in pixels")
    preprocessing: str = setting("tf", "preprocessing mode: caffe or tf")
    labels: str = setting("", "labels file (Keras index layout or a JSON list of names; required)")


def spec_from_settings(settings: KerasFileSettings) -> ModelSpec:
    if not settings.name or not settings.labels:
        raise ValueError("KERAS_FILE_NAME and KERAS_FILE_LABELS must name the model and its labels file")
    return ModelSpec(
        name=settings.name,
        input_size=settings.input_size,
        preprocessing=settings.preprocessing,
        labels_path=Path(settings.labels),
    )


def create_app() -> Flask:
    """WSGI factory for Gunicorn: ``services.keras_file:create_app()``."""
    refuse_renamed(os.environ, RENAMED, (RENAMED_PREFIX,))
    return service.create_app(spec_from_settings(load(KerasFileSettings, ("KERAS_FILE_",))))
