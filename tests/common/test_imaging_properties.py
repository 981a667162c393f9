"""Property-based tests of the decode path: whatever the bytes, a typed answer, never a crash."""

from __future__ import annotations

import io

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from common import imaging
from common.errors import ServiceError
from tests.helpers import encode

LIMITS = imaging.ImageLimits(max_bytes=2_000_000, max_pixels=4_000_000)
# (mode, formats that can store it)
MODES = {
    "RGB": ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF"),
    "RGBA": ("PNG", "WEBP", "TIFF"),
    "L": ("JPEG", "PNG", "BMP", "TIFF", "GIF"),
    "LA": ("PNG",),
    "1": ("PNG", "BMP", "TIFF"),
    "P": ("PNG", "GIF", "BMP"),
    "CMYK": ("JPEG", "TIFF"),
    "I;16": ("PNG", "TIFF"),
    "I": ("TIFF",),
    "F": ("TIFF",),
}
SEEDS = [
    encode(Image.new(mode, (9, 7)), fmt)
    for mode, fmt in (
        ("RGB", "JPEG"),
        ("RGBA", "PNG"),
        ("P", "GIF"),
        ("RGB", "WEBP"),
        ("L", "BMP"),
        ("RGB", "TIFF"),
    )
]


def decode_or_typed_error(data: bytes) -> None:
    try:
        image = imaging.decode(data, LIMITS)
    except ServiceError as exc:
        assert 400 <= exc.status < 500
        return
    assert image.mode == "RGB" and image.width >= 1 and image.height >= 1


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4096))
def test_any_bytes_decode_or_raise_a_typed_error(data: bytes) -> None:
    decode_or_typed_error(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(SEEDS),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
    st.integers(1, 10_000),
)
def test_corrupted_real_images_decode_or_raise_a_typed_error(
    seed: bytes, flips: list[tuple[int, int]], cut: int
) -> None:
    data = bytearray(seed[:cut])
    for position, value in flips:
        if data:
            data[position % len(data)] = value
    decode_or_typed_error(bytes(data))


@st.composite
def images(draw: st.DrawFn) -> tuple[bytes, str]:
    mode = draw(st.sampled_from(sorted(MODES)))
    fmt = draw(st.sampled_from(MODES[mode]))
    width, height = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if mode in ("I;16", "I"):
        image = Image.fromarray(
            rng.integers(0, 65535, (height, width)).astype(np.uint16 if mode == "I;16" else np.int32)
        )
        image = image.convert(mode) if image.mode != mode else image
    elif mode == "F":
        image = Image.fromarray(rng.random((height, width)).astype(np.float32))
    else:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)
    options: dict[str, object] = {}
    if fmt in ("JPEG", "PNG", "WEBP", "TIFF") and draw(st.booleans()):
        exif = Image.Exif()
        exif[0x0112] = draw(st.integers(1, 8))
        options["exif"] = exif.tobytes()
    return encode(image, fmt, **options), mode


@settings(max_examples=150, deadline=None)
@given(images(), st.sampled_from([32, 64]))
def test_any_valid_image_in_any_mode_becomes_rgb_pixels(case: tuple[bytes, str], size: int) -> None:
    data, _mode = case
    pixels = imaging.load_pixels(data, size, LIMITS)
    assert pixels.shape == (size, size, 3) and pixels.dtype == np.uint8
    assert imaging.decode(io.BytesIO(data).getvalue(), LIMITS).mode == "RGB"
