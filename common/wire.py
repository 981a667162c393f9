"""What the gateway, the job workers and the model services say to each other, besides JSON: the
headers of a member call, the priorities, how a vector of floats travels, and how a moment is
written (one format in every answer, record and file).

No Flask and no TensorFlow here: the fleet client (``fleet/``) and the services both import it.
"""

from __future__ import annotations

import base64
import time
from enum import StrEnum
from typing import Any

import numpy as np

REQUEST_ID_HEADER = "X-Request-ID"
DEADLINE_HEADER = "X-Deadline-Ms"
PRIORITY_HEADER = "X-Priority"
REQUEST_START_HEADER = "X-Request-Start"
IMAGE_LENGTHS_HEADER = "X-Image-Lengths"
"""Several images in one body, one after another: their lengths in bytes, comma-separated, in order
(what the gateway sends a member; a multipart body costs both ends ~0.2 ms per image to write and
parse in Python)."""


class Priority(StrEnum):
    """Who waits for the answer (``X-Priority``): a person (``interactive``, the default) or nobody
    at once, an asynchronous job or a training (``background``: waits until no interactive request
    does). ``batch``, its name before, is still read as ``background``."""

    INTERACTIVE = "interactive"
    BACKGROUND = "background"

    @classmethod
    def _missing_(cls, value: object) -> Priority | None:
        return cls.BACKGROUND if value == "batch" else None


def encode_vector(vector: np.ndarray) -> dict[str, str]:
    """A probability or feature vector, compactly: little-endian float32, base64."""
    return {"dtype": "float32", "data": base64.b64encode(vector.astype("<f4").tobytes()).decode()}


def decode_vector(encoded: dict[str, Any]) -> np.ndarray:
    """``encode_vector``'s inverse (a read-only float32 array; raises on a malformed one)."""
    return np.frombuffer(base64.b64decode(encoded["data"]), "<f4")


def timestamp(moment: float | None) -> str | None:
    """A Unix time as every answer writes it: RFC 3339, UTC, milliseconds,
    ``2026-12-02T14:05:09.123Z``; None for None or 0 ("never")."""
    if not moment:
        return None
    whole = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(moment))
    return f"{whole}.{int(moment % 1 * 1000):03d}Z"


def whole_number(text: str) -> int | None:
    """``text`` (surrounding spaces aside) as a whole number when it is ASCII digits alone, as HTTP
    means them (RFC 9110 ``1*DIGIT``); None otherwise. ``str.isdigit`` also takes '²' and '٣',
    which ``int`` refuses or reads."""
    text = text.strip()
    return int(text) if text.isascii() and text.isdigit() else None


def split_images(body: bytes, lengths: str) -> list[bytes]:
    """The images of a framed body (``IMAGE_LENGTHS_HEADER``); ValueError for lengths that are not
    whole numbers or do not add up to the body's length (the header's own size bounds their count)."""
    sizes = [whole_number(field) for field in lengths.split(",")]
    if any(size is None for size in sizes) or sum(sizes) != len(body):  # type: ignore[arg-type]
        raise ValueError(f"{IMAGE_LENGTHS_HEADER} must be lengths adding up to the body's {len(body)} bytes")
    view, images, at = memoryview(body), [], 0
    for size in sizes:
        assert size is not None
        images.append(bytes(view[at : at + size]))
        at += size
    return images
