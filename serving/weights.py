"""Which weights a service loads, decided before TensorFlow is imported.

``WEIGHTS`` (or ``<MODEL>_WEIGHTS``) is one of:

* ``imagenet`` - the Keras ImageNet file from ``$KERAS_HOME/models`` (default ``~/.keras/models``),
  else downloaded there by Keras (hash-checked) unless ``WEIGHTS_DOWNLOAD`` is off; if neither
  works, start-up fails with a message naming the file, where to put it and how to fetch it.
* ``random``   - seeded random initialisation (same seed, same numbers, every restart).
* ``auto``     - ``imagenet`` when the file is in the cache or can be downloaded (as above), else
  ``random`` with a loud warning. Offline, the download gives up within
  ``WEIGHTS_DOWNLOAD_TIMEOUT_S`` (connecting, name lookup included): start-up does not wait on it.

A download goes to ``<file>.part`` beside the target and is renamed once Keras has checked its
hash: an interrupted or corrupted download never passes for the cached file.
* a path       - a ``.keras`` model file, or a weights file (``.h5`` / ``.weights.h5``).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from common.errors import WeightsUnavailable
from common.models import KERAS_WEIGHTS_BASE, ModelSpec

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


def source_url(spec: ModelSpec, base_url: str = "") -> str:
    """Where the ImageNet file is fetched from: Keras' own address, or the same path under
    ``base_url`` (a mirror; ``WEIGHTS_BASE_URL``)."""
    assert spec.imagenet_url is not None
    if not base_url:
        return spec.imagenet_url
    return base_url.rstrip("/") + "/" + spec.imagenet_url.removeprefix(KERAS_WEIGHTS_BASE).lstrip("/")


def reachable(url: str, timeout_s: float) -> None:
    """Raise ``OSError`` unless a TCP connection to ``url``'s host opens within ``timeout_s``, name
    lookup included (a thread: ``getaddrinfo`` takes no time-out of its own)."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    outcome: list[BaseException | None] = []

    def connect() -> None:
        try:
            socket.create_connection((parts.hostname or "", port), timeout=timeout_s).close()
            outcome.append(None)
        except OSError as exc:
            outcome.append(exc)

    worker = threading.Thread(target=connect, name="weights-reachable", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if not outcome:
        raise OSError(f"no connection to {parts.hostname}:{port} within {timeout_s:g}s")
    if outcome[0] is not None:
        raise outcome[0]


def download(spec: ModelSpec, target: Path, *, base_url: str = "", timeout_s: float = 3.0) -> Path:
    """Let Keras fetch (and hash-check) the ImageNet file into the cache; needs the network.
    ``timeout_s`` bounds the connect (name lookup included) and every read, not the whole file."""
    url = source_url(spec, base_url)
    log.info("%s: downloading %s into %s (time-out %gs)", spec.name, url, target.parent, timeout_s)
    part = target.with_name(f"{target.name}.part")
    previous = socket.getdefaulttimeout()
    try:
        reachable(url, timeout_s)  # first: offline, Keras (~3 s to import) is never loaded for nothing
        import keras

        socket.setdefaulttimeout(timeout_s)  # urllib's connect and each read under Keras
        keras.utils.get_file(
            part.name,
            url,
            cache_dir=str(target.parent.parent),
            cache_subdir=target.parent.name,
            file_hash=spec.imagenet_md5,
        )
        os.replace(part, target)
    except Exception as exc:
        part.unlink(missing_ok=True)  # a corrupted file Keras refused stays behind otherwise
        raise WeightsUnavailable(f"{missing_imagenet_message(spec, target)} Download failed: {exc}") from exc
    finally:
        socket.setdefaulttimeout(previous)
    log.info("%s: downloaded and hash-checked %s", spec.name, target)
    return target


def resolve(
    spec: ModelSpec,
    mode: str,
    *,
    seed: int = 0,
    keras_home: str = "",
    allow_download: bool = False,
    base_url: str = "",
    timeout_s: float = 3.0,
) -> WeightsPlan:
    """Turn the ``WEIGHTS`` setting into a plan, failing early with an actionable message.
    ``allow_download``, ``base_url``, ``timeout_s``: whether, from where and how patiently a
    missing ImageNet file is downloaded (``imagenet`` and ``auto``)."""
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
                return WeightsPlan("imagenet", download(spec, cached, base_url=base_url, timeout_s=timeout_s))
            raise WeightsUnavailable(missing_imagenet_message(spec, cached))
        if allow_download:
            try:
                return WeightsPlan("imagenet", download(spec, cached, base_url=base_url, timeout_s=timeout_s))
            except WeightsUnavailable as exc:
                cause = exc.__cause__
                log.warning(
                    "%s: ImageNet weights could not be downloaded: %s", spec.name, cause or exc.message
                )
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
