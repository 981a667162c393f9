"""A model repository: ``<root>/<model>/<version>/<weights file>``, versions are whole numbers.

The highest version is the one to serve. A version folder holds one ``.keras`` file (a whole
model) or one Keras weights file (``.h5``); anything else in it is ignored.
"""

from __future__ import annotations

from pathlib import Path

from common.errors import WeightsUnavailable

SUFFIXES = (".keras", ".h5")


def versions(root: str | Path, model: str) -> list[int]:
    folder = Path(root) / model
    if not folder.is_dir():
        return []
    return sorted(int(entry.name) for entry in folder.iterdir() if entry.is_dir() and entry.name.isdigit())


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
