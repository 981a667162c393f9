"""A custom model served by the same code: a ``.keras`` file plus a labels file.

Settings (prefix ``CUSTOM_``): ``CUSTOM_NAME``, ``CUSTOM_INPUT_SIZE``, ``CUSTOM_PREPROCESSING``,
``CUSTOM_LABELS``; the model file is ``<NAME>_WEIGHTS`` (or ``WEIGHTS``), like any service.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flask import Flask

from common.models import ModelSpec
from common.settings import load, setting
from serving import app as service


@dataclass(frozen=True)
class CustomModelSettings:
    name: str = setting("custom", "model name clients use")
    input_size: int = setting(224, "square input side in pixels")
    preprocessing: str = setting("tf", "preprocessing mode: caffe or tf")
    labels: str = setting("", "labels file (Keras index layout or a JSON list of names)")


def spec_from_settings(settings: CustomModelSettings) -> ModelSpec:
    if not settings.labels:
        raise ValueError("CUSTOM_LABELS must name the labels file of a custom model")
    return ModelSpec(
        name=settings.name,
        input_size=settings.input_size,
        preprocessing=settings.preprocessing,
        labels_path=Path(settings.labels),
    )


def create_app() -> Flask:
    """WSGI factory for Gunicorn: ``services.custom:create_app()``."""
    return service.create_app(spec_from_settings(load(CustomModelSettings, ("CUSTOM_",))))
