"""A tiny real classifier, trained in seconds inside the test run: coloured shapes on CPU.

It proves recognition end to end (Nginx -> gateway -> service) without ImageNet weights. Training
images go through the services' own decode/resize path, so serving sees what training saw.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from common import imaging
from serving import preprocessing

CLASSES = ("circle", "square", "triangle", "cross")
INPUT_SIZE = 64
MODE = "tf"


def draw(shape: str, rng: np.random.Generator, size: int = 96) -> bytes:
    """One PNG: a random-coloured ``shape`` of random size and position on a light background."""
    background = tuple(int(v) for v in rng.integers(170, 256, 3))
    colour = tuple(int(v) for v in rng.integers(0, 120, 3))
    image = Image.new("RGB", (size, size), background)
    pen = ImageDraw.Draw(image)
    r = rng.uniform(0.16, 0.28) * size
    cx, cy = rng.uniform(0.36, 0.64, 2) * size
    if shape == "circle":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "square":
        pen.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "triangle":
        pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    else:
        w = r / 3
        pen.rectangle((cx - r, cy - w, cx + r, cy + w), fill=colour)
        pen.rectangle((cx - w, cy - r, cx + w, cy + r), fill=colour)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def dataset(count: int, seed: int) -> tuple[list[bytes], np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(CLASSES), count)
    return [draw(CLASSES[i], rng) for i in labels], labels


def to_inputs(images: list[bytes]) -> np.ndarray:
    limits = imaging.ImageLimits()
    pixels = np.stack([imaging.load_pixels(data, INPUT_SIZE, limits) for data in images])
    return preprocessing.get(MODE)(pixels)


@dataclass(frozen=True)
class TrainedModel:
    model_path: Path
    labels_path: Path
    holdout_accuracy: float


def train(folder: Path, seed: int = 0) -> TrainedModel:
    import keras

    keras.utils.set_random_seed(seed)
    images, labels = dataset(1200, seed)
    inputs = to_inputs(images)
    model = keras.Sequential(
        [
            keras.Input((INPUT_SIZE, INPUT_SIZE, 3)),
            keras.layers.Conv2D(16, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(64, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(len(CLASSES), activation="softmax"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(2e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    holdout_images, holdout_labels = dataset(200, seed + 1)
    holdout = to_inputs(holdout_images)
    accuracy = 0.0
    for _ in range(12):  # stop as soon as it is clearly good
        model.fit(inputs, labels, epochs=2, batch_size=32, verbose=0)
        accuracy = float((model.predict(holdout, verbose=0).argmax(axis=1) == holdout_labels).mean())
        if accuracy >= 0.99:
            break
    folder.mkdir(parents=True, exist_ok=True)
    model_path, labels_path = folder / "shapes.keras", folder / "shapes_labels.json"
    model.save(model_path)
    labels_path.write_text(json.dumps(list(CLASSES)))
    return TrainedModel(model_path, labels_path, accuracy)
