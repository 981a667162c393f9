"""Part 5: decoding a 12 MP JPEG for a 224 crop: plain Pillow (open, convert, resize) vs ours."""

from __future__ import annotations

import io
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from common import imaging

PHOTO = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "chelsea.jpg"


def twelve_megapixels() -> bytes:
    image = Image.open(PHOTO).resize((4000, 3000), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def median_ms(call: Callable[[], object], repeat: int = 15) -> float:
    call()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return round(statistics.median(times) * 1000, 2)


def measure() -> dict[str, float]:
    data = twelve_megapixels()
    limits = imaging.ImageLimits(max_bytes=50_000_000)

    def plain() -> np.ndarray:
        image = Image.open(io.BytesIO(data)).convert("RGB").resize((224, 224), Image.Resampling.BILINEAR)
        return np.asarray(image)

    plain_ms = median_ms(plain)
    ours_ms = median_ms(lambda: imaging.load_pixels(data, 224, limits))
    return {
        "jpeg_bytes": len(data),
        "plain_pillow_ms": plain_ms,
        "ours_ms": ours_ms,
        "speedup": round(plain_ms / ours_ms, 1),
    }
