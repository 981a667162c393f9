"""Training a head: a stratified split, a softmax layer fitted with Keras on standardized base
features, and its evaluation on the held-out images.

Features are standardized (the training images' mean and spread per feature) so one learning rate
suits every backbone - random weights give features of any scale - and the standardization is then
folded into the layer (``kernel / std``, ``bias - mean/std @ kernel``): what is served is one
matrix product on the raw features. Keras (TensorFlow) is imported only when fitting.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance

LEARNING_RATE = 0.01
L2 = 1e-4
BATCH = 32


def split(labels: np.ndarray, validation_split: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices, the same share of each class held out: at least one image of
    a class when the share is above 0, and never all of them."""
    rng = np.random.default_rng(seed)
    train, held = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        count = int(round(len(members) * validation_split))
        if validation_split > 0:
            count = min(max(count, 1), len(members) - 1)
        held += members[:count].tolist()
        train += members[count:].tolist()
    return np.array(sorted(train), int), np.array(sorted(held), int)


def augmented(data: bytes, rng: np.random.Generator, max_side: int = 600) -> bytes:
    """Another view of a photo for training: a crop of 60-100 % of its area, maybe mirrored, and
    brightness and contrast within 20 % - changes under which its class stays the same. Views are
    made no larger than ``max_side`` (the model sees far fewer pixels), so they stay small."""
    with Image.open(io.BytesIO(data)) as opened:
        opened.draft("RGB", (max_side, max_side))  # JPEG: decode at a fraction of the size
        image = opened.convert("RGB")
    image.thumbnail((max_side, max_side))
    width, height = image.size
    scale = np.sqrt(rng.uniform(0.6, 1.0))
    w, h = max(1, int(width * scale)), max(1, int(height * scale))
    left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    view = image.crop((left, top, left + w, top + h))
    if rng.random() < 0.5:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    view = ImageEnhance.Brightness(view).enhance(rng.uniform(0.8, 1.2))
    view = ImageEnhance.Contrast(view).enhance(rng.uniform(0.8, 1.2))
    out = io.BytesIO()
    view.save(out, "PNG" if view.width * view.height <= 512 * 512 else "JPEG", quality=92)
    return out.getvalue()


@dataclass
class Fitted:
    """A fitted layer on raw features, and what fitting it did."""

    kernel: np.ndarray  # features x classes
    bias: np.ndarray
    history: list[dict[str, float]]
    mean: np.ndarray  # the standardization the layer was fitted behind, before it was folded in
    std: np.ndarray
    standard_kernel: np.ndarray
    standard_bias: np.ndarray

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        logits = features @ self.kernel + self.bias
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return exp / exp.sum(axis=1, keepdims=True)


def fit(
    x: np.ndarray,
    y: np.ndarray,
    classes: int,
    epochs: int,
    validation: tuple[np.ndarray, np.ndarray] | None = None,
    on_epoch: Callable[[int, dict[str, float]], bool] | None = None,
    seed: int = 0,
) -> Fitted:
    """Fit softmax regression on ``x`` (features) and ``y`` (class indices). ``on_epoch(epoch,
    figures)`` is called after each epoch with loss, accuracy (and val_loss, val_accuracy); it
    returns False to stop (a cancelled job)."""
    import keras

    keras.utils.set_random_seed(seed)
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    # A feature (nearly) constant over the training photos - a ReLU unit that never fires - keeps
    # its scale: dividing by its tiny spread would turn the weight L2 leaves on it into a huge
    # one once folded, and one photo that fires it would decide the answer.
    std = np.where(std > 1e-3 * max(float(std.mean()), 1e-12), std, 1.0).astype(np.float32)
    model = keras.Sequential(
        [
            keras.Input((x.shape[1],)),
            keras.layers.Dense(classes, activation="softmax", kernel_regularizer=keras.regularizers.L2(L2)),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(LEARNING_RATE),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    history: list[dict[str, float]] = []
    standard = (x - mean) / std
    held = (
        None
        if validation is None or not len(validation[0])
        else ((validation[0] - mean) / std, validation[1])
    )
    model.fit(
        standard,
        y,
        epochs=epochs,
        batch_size=BATCH,
        shuffle=True,
        validation_data=held,
        callbacks=[reporting(history, on_epoch)],
        verbose=0,
    )
    kernel, bias = (np.asarray(w, np.float32) for w in model.layers[-1].get_weights())
    folded = kernel / std[:, None].astype(np.float32)
    folded_bias = (bias - (mean / std).astype(np.float32) @ kernel).astype(np.float32)
    return Fitted(folded, folded_bias, history, mean.astype(np.float32), std, kernel, bias)


def reporting(
    history: list[dict[str, float]], on_epoch: Callable[[int, dict[str, float]], bool] | None
) -> Any:
    """A Keras callback that appends each epoch's figures to ``history`` and calls ``on_epoch``
    (which returns False to stop the training)."""
    import keras

    class Report(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            figures = {k: round(float(v), 4) for k, v in (logs or {}).items()}
            history.append({"epoch": epoch + 1, **figures})
            if on_epoch is not None and not on_epoch(epoch + 1, figures):
                self.model.stop_training = True

    return Report()


def evaluate(probabilities: np.ndarray, y: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Accuracy, per-class precision and recall, and the confusion matrix (rows: true class), of
    the probabilities a model gave the held-out images (true class indices ``y``)."""
    count = len(classes)
    predicted = probabilities.argmax(axis=1) if len(probabilities) else np.empty(0, int)
    confusion = np.zeros((count, count), int)
    for truth, guess in zip(y, predicted, strict=True):
        confusion[truth, guess] += 1
    per_class = {}
    for i, name in enumerate(classes):
        claimed, actual = confusion[:, i].sum(), confusion[i].sum()
        per_class[name] = {
            "precision": round(float(confusion[i, i] / claimed), 4) if claimed else None,
            "recall": round(float(confusion[i, i] / actual), 4) if actual else None,
            "support": int(actual),
        }
    return {
        "images": int(len(y)),
        "accuracy": round(float((predicted == y).mean()), 4) if len(y) else None,
        "per_class": per_class,
        "confusion_matrix": {"labels": classes, "matrix": confusion.tolist()},
    }
