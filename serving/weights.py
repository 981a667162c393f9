"""Which weights a service loads, decided before TensorFlow is imported.

``WEIGHTS`` (or ``<MODEL>_WEIGHTS``) is one of:

* ``imagenet`` - the Keras ImageNet file from ``$KERAS_HOME/models`` (default ``~/.keras/models``),
  else downloaded there by Keras (hash-checked) unless ``WEIGHTS_DOWNLOAD`` is off; if neither
  works, start-up fails with a message naming the file, where to put it and how to fetch it.
* ``random``   - seeded random initialisation (same seed, same numbers, every restart).
* ``auto``     - ``imagenet`` when the file is in the cache, else ``random`` with a loud warning.
* a path       - a ``.keras`` model file, or a weights file (``.h5`` / ``.weights.h5``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from common.errors import WeightsUnavailable
from common.models import ModelSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightsPlan:
    """The resolved decision: ``kind`` is what every response reports as ``weights``."""

    kind: str  # "imagenet" | "random" | "file"
    path: Path | None = None  # the file to load; None for random weights
    seed: int = 0


def keras_cache_dir(keras_home: str = "") -> Path:
    """Where Keras keeps downloaded weights (``$KERAS_HOME/models``)."""
    home = keras_home or os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(home) / "models"


def missing_imagenet_message(spec: ModelSpec, expected: Path) -> str:
    return (
        f"ImageNet weights for {spec.name} are not available: expected {expected}. "
        f"Put {spec.imagenet_file} there (or point KERAS_HOME at a folder whose models/ holds it); "
        f"on a machine with internet, `make weights` fetches all three into the Keras cache "
        f"(source: {spec.imagenet_url}). To run without them, set WEIGHTS=auto or WEIGHTS=random."
    )


def download(spec: ModelSpec, target: Path) -> Path:
    """Let Keras fetch (and hash-check) the ImageNet file into the cache; needs internet."""
    import keras

    log.info("%s: downloading %s into %s", spec.name, spec.imagenet_url, target.parent)
    try:
        path = keras.utils.get_file(
            spec.imagenet_file,
            spec.imagenet_url,
            cache_dir=str(target.parent.parent),
            cache_subdir=target.parent.name,
            file_hash=spec.imagenet_md5,
        )
    except Exception as exc:
        raise WeightsUnavailable(f"{missing_imagenet_message(spec, target)} Download failed: {exc}") from exc
    return Path(path)


def resolve(
    spec: ModelSpec, mode: str, *, seed: int = 0, keras_home: str = "", allow_download: bool = False
) -> WeightsPlan:
    """Turn the ``WEIGHTS`` setting into a plan, failing early with an actionable message."""
    mode = mode.strip()
    if mode in ("imagenet", "auto", "random") and spec.builder is None:
        raise WeightsUnavailable(
            f"{spec.name} is a custom model: set WEIGHTS to its .keras file, not {mode!r}"
        )
    if mode == "random":
        return WeightsPlan("random", seed=seed)
    if mode in ("imagenet", "auto"):
        assert spec.imagenet_file is not None
        cached = keras_cache_dir(keras_home) / spec.imagenet_file
        if cached.is_file():
            return WeightsPlan("imagenet", cached)
        if mode == "imagenet":
            if allow_download:
                return WeightsPlan("imagenet", download(spec, cached))
            raise WeightsUnavailable(missing_imagenet_message(spec, cached))
        log.warning(
            "!" * 72 + "\n%s: NO IMAGENET WEIGHTS at %s - serving SEEDED RANDOM WEIGHTS "
            "(seed %d). Predictions are meaningless; every response says weights=random.\n" + "!" * 72,
            spec.name,
            cached,
            seed,
        )
        return WeightsPlan("random", seed=seed)
    path = Path(mode).expanduser()
    if not path.is_file():
        raise WeightsUnavailable(f"weights file for {spec.name} not found: {path}")
    return WeightsPlan("file", path)
