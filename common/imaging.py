"""Image bytes -> validated, oriented RGB pixels of the model's input size.

Every service and the gateway go through these functions, so the guards live in one place:
format allow-list, pixel cap checked before decoding, truncated files rejected (never padded),
first frame only, EXIF orientation applied, every Pillow mode converted to RGB.

Resize policy: take the centred square whose side is ``crop_fraction`` of the shorter side, and
resample that box once (bilinear, antialiased) to ``size x size``. With the default 0.875 this is
the usual ImageNet evaluation crop (resize to 256, centre-crop 224) done in a single resample.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from common.errors import ImageTooLarge, InvalidImage, ServiceError, UnsupportedMediaType

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white
_ORIENTATION_TAG = 0x0112

# NOTE: Pillow only *warns* about decompression bombs below 2x MAX_IMAGE_PIXELS; make it an error.
warnings.simplefilter("error", Image.DecompressionBombWarning)


@dataclass(frozen=True)
class ImageLimits:
    """Caps applied before any pixel is decoded."""

    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int
    height: int


def _open(data: bytes, limits: ImageLimits) -> Image.Image:
    if not data:
        raise InvalidImage("empty image: the request carried no image bytes")
    if len(data) > limits.max_bytes:
        raise ImageTooLarge(f"image is {len(data)} bytes; the limit is {limits.max_bytes}")
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        raise UnsupportedMediaType(
            f"not a supported image; send one of {', '.join(ALLOWED_FORMATS)}"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLarge(f"image declares more than {limits.max_pixels} pixels") from None
    except Exception as exc:  # Pillow's parsers raise many types on malformed headers
        raise InvalidImage(f"cannot read image header: {type(exc).__name__}") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise InvalidImage("image has no pixels")
    if width * height > limits.max_pixels:
        raise ImageTooLarge(
            f"image is {width}x{height} = {width * height} pixels; the limit is {limits.max_pixels}"
        )
    return image


def probe(data: bytes, limits: ImageLimits) -> ImageInfo:
    """Check format and declared size without decoding pixels (cheap; used by the gateway)."""
    image = _open(data, limits)
    return ImageInfo(format=image.format or "", width=image.width, height=image.height)


def _apply_orientation(image: Image.Image) -> Image.Image:
    try:
        orientation = image.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # malformed EXIF: keep the pixels as stored
        return image
    if orientation in range(2, 9):
        return ImageOps.exif_transpose(image)
    return image


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    """Scale 16/32-bit integer and float greyscale to 8 bits instead of clipping."""
    pixels = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        peak = 1.0 if pixels.size and float(np.nanmax(pixels)) <= 1.0 else 255.0
    else:
        peak = 65535.0
    scaled = np.clip(np.nan_to_num(pixels) * (255.0 / peak) + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(scaled, mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB; transparency is composited on :data:`BACKGROUND`."""
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode.startswith("I") or image.mode == "F":
        return _high_depth_to_l(image).convert("RGB")
    has_alpha = image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info
    try:
        if has_alpha:
            background = Image.new("RGBA", image.size, (*BACKGROUND, 255))
            background.alpha_composite(image.convert("RGBA"))
            return background.convert("RGB")
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise UnsupportedMediaType(f"unsupported image mode {image.mode}: {exc}") from None


def keep_side(size: int, crop_fraction: float) -> int:
    """The shorter side an image needs for a ``size`` crop: smaller is upscaling, larger is waste."""
    return math.ceil(size / crop_fraction)


def _reduce_while_decoding(image: Image.Image, shorter_side: int) -> None:
    """JPEG only: let libjpeg decode at 1/2, 1/4 or 1/8 scale (DCT scaling) when that still leaves
    at least ``shorter_side`` pixels. A 12 MP photo for a 224 crop decodes at 1/8: ~8x faster."""
    if image.format == "JPEG" and min(image.size) >= 2 * shorter_side:
        scale = shorter_side / min(image.size)
        image.draft(image.mode, (math.ceil(image.width * scale), math.ceil(image.height * scale)))


def decode(data: bytes, limits: ImageLimits, shorter_side: int = 0) -> Image.Image:
    """Decode the first frame into an oriented RGB image, or raise a ``ServiceError``.

    With ``shorter_side``, JPEGs may decode at reduced scale, never below that side.
    """
    image = _open(data, limits)
    try:
        if shorter_side:
            _reduce_while_decoding(image, shorter_side)
        image.load()  # NOTE: open() is lazy; truncation and corrupt data surface here
        image = to_rgb(_apply_orientation(image))
    except ServiceError:
        raise
    except Exception as exc:
        raise InvalidImage(f"cannot decode image: {exc}") from None
    return image


def fit(image: Image.Image, size: int, crop_fraction: float = 0.875) -> np.ndarray:
    """Centre-crop and resize in one resample; returns ``(size, size, 3)`` uint8 pixels."""
    width, height = image.size
    side = min(width, height) * crop_fraction
    left, top = (width - side) / 2, (height - side) / 2
    resized = image.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side))
    return np.asarray(resized, dtype=np.uint8)


def load_pixels(data: bytes, size: int, limits: ImageLimits, crop_fraction: float = 0.875) -> np.ndarray:
    """Bytes -> ``(size, size, 3)`` uint8 RGB pixels, with every guard applied."""
    return fit(decode(data, limits, keep_side(size, crop_fraction)), size, crop_fraction)


def canonical(data: bytes, limits: ImageLimits, shorter_side: int) -> bytes:
    """A validated, oriented RGB copy no larger than needed (shorter side ``shorter_side``), as PNG.

    The gateway sends this to every ensemble member instead of the client's photo, so a 12 MP
    JPEG is decoded once, not once per member. Members still validate it like any upload.
    """
    image = decode(data, limits, shorter_side)
    if min(image.size) > shorter_side:
        scale = shorter_side / min(image.size)
        size = (round(image.width * scale), round(image.height * scale))
        image = image.resize(size, Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
