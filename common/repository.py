"""The model repository: the one on-disk layout every process agrees on.

Base model versions: ``<MODEL_REPOSITORY>/<model>/<version>/<weights file>``, versions are whole
numbers; the highest is the one to serve. A version folder holds one ``.keras`` file (a whole
model) or one Keras weights file (``.h5``); anything else in it is ignored.

Custom models (trained by the fleet's trainer): ``<CUSTOM_MODELS_DIR>/<name>/<version>/`` with
``head.npz`` (``kernel`` features x classes, ``bias``) or ``model.keras`` (a fine-tuned whole
classifier), and ``model.json`` (base, the base weights' hash, classes, evaluation, how it was
trained; ``kind`` is ``fine-tuned`` for a whole classifier). A version is published whole: written
in a staging folder, then renamed into place, so a reader never sees half of one. The highest
version is served; removing the ``<name>`` folder (a rename, then a delete) removes the model.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import WeightsUnavailable
from common.models import BASE_MODELS
from common.wire import whole_number

SUFFIXES = (".keras", ".h5")
NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
RESERVED = frozenset({*BASE_MODELS, "ensemble", "custom"})
HEAD_FILE, META_FILE, MODEL_FILE = "head.npz", "model.json", "model.keras"
FINE_TUNED = "fine-tuned"


def check_name(name: str, bases: tuple[str, ...] = ()) -> str | None:
    """Why ``name`` cannot name a custom model (None: it can)."""
    if not NAME.match(name or ""):
        return "name must be 1-64 of a-z, 0-9, '_' and '-', starting with a letter or digit"
    if name in RESERVED or name in bases:
        return f"{name!r} is a model of the fleet or a reserved word; choose another name"
    return None


def versions(root: str | Path, model: str) -> list[int]:
    folder = Path(root) / model
    if not folder.is_dir():
        return []
    found = (whole_number(entry.name) for entry in folder.iterdir() if entry.is_dir())
    return sorted(number for number in found if number is not None)


def latest(root: str | Path, model: str) -> int:
    found = versions(root, model)
    if not found:
        raise WeightsUnavailable(
            f"no versions of {model} in the model repository {root} (<root>/{model}/<n>/)"
        )
    return found[-1]


def weights_file(root: str | Path, model: str, version: int) -> Path:
    folder = Path(root) / model / str(version)
    files = (
        sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(SUFFIXES))
        if folder.is_dir()
        else []
    )
    if len(files) != 1:
        raise WeightsUnavailable(
            f"{folder} must hold exactly one {' or '.join(SUFFIXES)} file, found {len(files)}"
        )
    return files[0]


Identity = tuple[int, int, int]
"""A published version: its number, its folder's inode and modification time (deleted and trained
again, a model starts again at version 1: these tell that version 1 from the old one)."""


def newest_version(root: Path, name: str) -> tuple[Identity, Path] | None:
    """The newest version of model ``name`` under ``root`` with its identity; None when it has none
    (or was removed while it was read). Base versions and custom models alike."""
    try:
        numbers = versions(root, name)
        if not numbers:
            return None
        path = root / name / str(numbers[-1])
        stat = path.stat()
    except OSError:  # removed between the listing and the look inside
        return None
    return (numbers[-1], stat.st_ino, stat.st_mtime_ns), path


def newest(root: Path) -> dict[str, tuple[Identity, Path]]:
    """The newest version of every model under ``root``, with its identity."""
    if not root.is_dir():
        return {}
    found = {}
    for folder in sorted(root.iterdir()):
        if not folder.name.startswith(".") and folder.is_dir():
            if (version := newest_version(root, folder.name)) is not None:
                found[folder.name] = version
    return found


def write_head(kernel: np.ndarray, bias: np.ndarray) -> Callable[[Path], None]:
    """What ``publish`` writes for a head."""
    return lambda folder: np.savez(
        folder / HEAD_FILE, kernel=kernel.astype(np.float32), bias=bias.astype(np.float32)
    )


def publish(root: Path, name: str, write: Callable[[Path], None], meta: dict[str, Any]) -> int:
    """Write a new version of ``name`` (the next number) whole - ``write(folder)`` its model's
    files, then ``model.json`` - and return its number."""
    model_dir = root / name
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".publishing-", dir=root))
    try:
        write(staging)
        (staging / META_FILE).write_text(json.dumps(meta, indent=2))
        model_dir.mkdir(exist_ok=True)  # only once the version is written: no empty model folder
        for _ in range(100):  # another publisher may take the next number first: take the one after
            version = (versions(root, name) or [0])[-1] + 1
            try:
                os.rename(staging, model_dir / str(version))
                return version
            except OSError:
                if not (model_dir / str(version)).exists():
                    raise
        raise RuntimeError(f"could not find a free version number for {name}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def prune(root: Path, name: str, keep: int) -> list[int]:
    """Delete all but the newest ``keep`` versions of ``name`` (each at once, a rename); returns
    the versions deleted. Services serve the newest, so only an older one they fall back on while
    a new one fails to load is lost with them."""
    doomed = versions(root, name)[:-keep]
    for version in doomed:
        gone = root / f".deleted-{name}-{version}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(root / name / str(version), gone)
        except FileNotFoundError:
            continue
        shutil.rmtree(gone, ignore_errors=True)
    return doomed


def remove(root: Path, name: str) -> bool:
    """Delete a custom model, every version, at once (a rename) - False when there is none."""
    folder = root / name
    if not folder.is_dir():
        return False
    doomed = root / f".deleted-{name}-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(folder, doomed)
    except FileNotFoundError:  # another removal got there first
        return False
    shutil.rmtree(doomed, ignore_errors=True)
    return True


def sweep_staging(root: Path, older_than_s: float = 3600) -> None:
    """Remove what a publisher killed mid-write left behind (never a published version)."""
    if not root.is_dir():
        return
    for entry in root.iterdir():
        if entry.name.startswith((".publishing-", ".deleted-")):
            try:
                if entry.stat().st_mtime < time.time() - older_than_s:
                    shutil.rmtree(entry, ignore_errors=True)
            except OSError:
                continue


@contextmanager
def locked(root: Path) -> Iterator[None]:
    """Hold the repository's writer lock (``<root>/.lock``, an advisory file lock): publishing,
    pruning and removing take it, so a removal and a publication of one name never interleave,
    whichever process of the trainer runs each."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
