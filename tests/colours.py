"""A custom-classes dataset made in the test run: photos whose class is their dominant colour.

Offline the backbones have random weights, and a frozen random backbone with a linear head
separates colour-level classes well and texture-level ones poorly (the README says so with
figures); these classes are the kind it can learn. Each image is a noisy, textured scene: a
background of one hue with random blotches of other colours and a large object of the class
colour, at random size and place, so no two images are alike.
"""

from __future__ import annotations

import io
import tarfile
import zipfile

import numpy as np
from PIL import Image, ImageDraw

CLASSES = {"red": (200, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 200), "yellow": (225, 205, 40)}


def draw(label: str, rng: np.random.Generator, size: int = 160) -> bytes:
    base = np.array(CLASSES[label])
    background = tuple(int(v) for v in rng.integers(90, 180, 3))
    image = Image.new("RGB", (size, size), background)
    pen = ImageDraw.Draw(image)
    for _ in range(3):  # distractors of any colour
        x, y = rng.uniform(0, size, 2)
        r = rng.uniform(0.05, 0.12) * size
        pen.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    colour = tuple(int(v) for v in np.clip(base + rng.integers(-25, 26, 3), 0, 255))
    r = rng.uniform(0.3, 0.42) * size
    cx, cy = rng.uniform(0.4, 0.6, 2) * size
    if rng.random() < 0.5:
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    else:
        pen.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
    pixels = np.asarray(image).astype(np.int16) + rng.integers(-12, 13, (size, size, 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


def images(per_class: int, seed: int, classes: tuple[str, ...] = tuple(CLASSES)) -> list[tuple[str, bytes]]:
    """(class, JPEG) pairs, ``per_class`` of each, in class order."""
    rng = np.random.default_rng(seed)
    return [(label, draw(label, rng)) for label in classes for _ in range(per_class)]


def archive(
    per_class: int, seed: int, *, classes: tuple[str, ...] = tuple(CLASSES), root: str = "", form: str = "zip"
) -> bytes:
    """A dataset archive: ``[root/]<class>/<n>.jpg``, as zip or tar.gz."""
    buffer = io.BytesIO()
    prefix = f"{root}/" if root else ""
    members = [
        (f"{prefix}{label}/{n:04d}.jpg", data)
        for n, (label, data) in enumerate(images(per_class, seed, classes))
    ]
    if form == "zip":
        with zipfile.ZipFile(buffer, "w") as out:
            for name, data in members:
                out.writestr(name, data)
    else:
        with tarfile.open(fileobj=buffer, mode="w:gz") as out:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                out.addfile(info, io.BytesIO(data))
    return buffer.getvalue()
