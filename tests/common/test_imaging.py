"""The one decode path: guards, modes, orientation, frames and the resize policy."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from common import imaging
from common.errors import ImageTooLarge, InvalidImage, UnsupportedMediaType
from tests.helpers import encode, photo, png_declaring

LIMITS = imaging.ImageLimits(max_bytes=5_000_000, max_pixels=20_000_000)


@pytest.mark.parametrize(
    ("mode", "fill", "expected"),
    [
        ("RGB", (10, 20, 30), (10, 20, 30)),
        ("L", 77, (77, 77, 77)),
        ("1", 1, (255, 255, 255)),
        ("CMYK", (0, 0, 0, 0), (255, 255, 255)),
        ("RGBA", (200, 0, 0, 255), (200, 0, 0)),
        ("RGBA", (200, 0, 0, 0), imaging.BACKGROUND),  # fully transparent -> background, not black
        ("LA", (0, 0), imaging.BACKGROUND),
        ("I;16", 65535, (255, 255, 255)),  # scaled from 16 bits, not clipped
        ("I;16", 32896, (128, 128, 128)),
        ("I", 65535, (255, 255, 255)),
        ("F", 0.5, (128, 128, 128)),
        ("YCbCr", (128, 128, 128), (128, 128, 128)),
    ],
)
def test_every_mode_becomes_rgb(mode: str, fill: object, expected: tuple[int, int, int]) -> None:
    rgb = imaging.to_rgb(Image.new(mode, (4, 4), fill))  # type: ignore[arg-type]
    assert rgb.mode == "RGB"
    assert np.abs(np.asarray(rgb)[0, 0].astype(int) - expected).max() <= 1


def test_palette_transparency_is_composited_on_background() -> None:
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0] * 256)
    image.info["transparency"] = 0
    decoded = imaging.decode(encode(image, "PNG"), LIMITS)
    assert tuple(np.asarray(decoded)[0, 0]) == imaging.BACKGROUND


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"])
def test_allowed_formats_decode_to_rgb(fmt: str) -> None:
    pixels = imaging.load_pixels(encode(Image.new("RGB", (40, 30), (0, 128, 255)), fmt), 16, LIMITS)
    assert pixels.shape == (16, 16, 3) and pixels.dtype == np.uint8


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", InvalidImage),
        (b"hello, I am text", UnsupportedMediaType),
        (bytes(range(256)) * 8, UnsupportedMediaType),
        (b"%PDF-1.4\n1 0 obj\n<<>>\nendobj\n", UnsupportedMediaType),
        (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', UnsupportedMediaType),
        (png_declaring(30000, 30000), ImageTooLarge),
        (png_declaring(5000, 5000), ImageTooLarge),  # under Pillow's own cap, over ours
    ],
)
def test_bad_bytes_raise_typed_errors(data: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        imaging.decode(data, LIMITS)


def test_pixel_cap_is_checked_from_the_header_before_decoding() -> None:
    info = imaging.probe(png_declaring(3000, 2000), LIMITS)  # no pixel data needed to answer
    assert (info.format, info.width, info.height) == ("PNG", 3000, 2000)


def test_byte_cap() -> None:
    with pytest.raises(ImageTooLarge):
        imaging.decode(photo(), imaging.ImageLimits(max_bytes=1000))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_files_are_rejected_not_padded(fmt: str) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), fmt)
    with pytest.raises(InvalidImage):
        imaging.decode(data[: len(data) // 2], LIMITS)


def test_animated_gif_uses_first_frame_only() -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert tuple(np.asarray(imaging.decode(data, LIMITS))[0, 0]) == (255, 0, 0)


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (60, 30), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 10, 10))  # red marker at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    decoded = imaging.decode(encode(image, "JPEG", exif=exif.tobytes(), quality=95), LIMITS)
    assert decoded.size == (30, 60)
    assert np.asarray(decoded)[2, 27, 0] > 200  # the marker is now top-right


def test_malformed_exif_does_not_crash() -> None:
    data = encode(Image.new("RGB", (20, 20), (9, 9, 9)), "JPEG", exif=b"Exif\x00\x00MM\x00*garbage")
    assert imaging.decode(data, LIMITS).size == (20, 20)


def test_fit_keeps_the_centre_square() -> None:
    # Wide image: red left/right margins, green centre square; the crop must keep only green.
    image = Image.new("RGB", (300, 100), (255, 0, 0))
    image.paste((0, 255, 0), (100, 0, 200, 100))
    pixels = imaging.fit(image, 32, crop_fraction=1.0)
    assert pixels.shape == (32, 32, 3)
    # The bilinear filter may blend half a pixel of the margin into the outermost columns.
    assert pixels[:, 1:-1, 1].min() > 240 and pixels[:, 1:-1, 0].max() < 15
    assert pixels[:, :, 1].min() > 200


def test_fit_crop_fraction_trims_the_border() -> None:
    image = Image.new("RGB", (100, 100), (0, 0, 0))
    image.paste((255, 255, 255), (10, 10, 90, 90))  # black 10% frame
    assert imaging.fit(image, 20, crop_fraction=0.7).min() > 240
    assert imaging.fit(image, 20, crop_fraction=1.0).min() < 15


def large_photo(width: int = 4000, height: int = 3000) -> bytes:
    """A 12 MP JPEG made from a real photo (upscaled), like a phone camera's."""
    image = Image.open(io.BytesIO(photo("chelsea.jpg"))).resize((width, height), Image.Resampling.BICUBIC)
    return encode(image, "JPEG", quality=90)


def test_large_jpegs_decode_at_reduced_scale_with_bounded_pixel_difference() -> None:
    data = large_photo()
    limits = imaging.ImageLimits(max_bytes=20_000_000)
    needed = imaging.keep_side(224, 0.875)
    reduced = imaging.decode(data, limits, needed)
    assert needed <= min(reduced.size) < 2 * needed  # 1/8 scale: 500x375
    fast = imaging.load_pixels(data, 224, limits).astype(int)
    slow = imaging.fit(imaging.decode(data, limits), 224).astype(int)
    assert np.abs(fast - slow).mean() < 1.5 and np.abs(fast - slow).max() < 32


def test_reduced_decoding_never_goes_below_the_needed_side() -> None:
    data = encode(Image.new("RGB", (600, 400), (1, 2, 3)), "JPEG")
    assert imaging.decode(data, LIMITS, 256).size == (600, 400)  # 1/2 would leave 200 < 256
    assert imaging.decode(data, LIMITS, 150).size == (300, 200)


def test_canonical_copy_is_a_small_validated_png() -> None:
    limits = imaging.ImageLimits(max_bytes=20_000_000)
    data = imaging.canonical(large_photo(), limits, 342)
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG" and image.mode == "RGB" and min(image.size) == 342
    assert len(data) < 600_000
    with pytest.raises(InvalidImage):
        imaging.canonical(large_photo()[:200_000], limits, 342)
