"""Fine-tuning: a custom model that trains the base's last ``fine_tune_layers`` layers with its head.

Such a model is a whole classifier of its own - the base's layers, the last N with new weights, and
a softmax over the user's classes - saved as ``model.keras``; the base model's service loads it
beside the base (``serving.custom``), so each costs a copy of the backbone in memory.

Training never runs the frozen part more than once per image: the base is cut where the trained
layers begin (``Cut``), the frozen part's activations at the cut are computed once, and the epochs
run the trained layers only. Training then goes as Keras' transfer-learning guide does it: the
head first, on the frozen features (``fit.fit``), then the trained layers and the head together
at a low learning rate, batch normalization kept in inference mode (its statistics frozen: a few
hundred photos would spoil them). Keras is imported only here, in the trainer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from workers.training import fit


@dataclass
class Cut:
    """A Keras ImageNet classifier cut where its last ``layers`` backbone layers begin: ``frozen``
    maps images to the activations there (one array, or a list where branches cross the cut),
    ``trained`` maps those to the features the classifier reads; both share the base's layers."""

    model: Any
    frozen: Any
    trained: Any
    layer_names: list[str]

    @property
    def inputs(self) -> int:
        return len(self.trained.inputs)

    def bytes_per_image(self) -> int:
        return sum(4 * int(np.prod(t.shape[1:])) for t in self.trained.inputs)


def cut(model: Any, layers: int) -> Cut:
    """Cut ``model`` (a ``keras.applications`` classifier) below its last ``layers`` backbone layers."""
    import keras

    backbone = model.layers[1:-1]
    if not 1 <= layers <= len(backbone):
        raise ValueError(f"fine_tune_layers must be between 1 and {len(backbone)} for this base")
    tuned = backbone[-layers:]
    names = {layer.name for layer in tuned}
    boundary: list[Any] = []
    for layer in tuned:
        for tensor in layer.input if isinstance(layer.input, list) else [layer.input]:
            if tensor._keras_history.operation.name not in names and all(tensor is not b for b in boundary):
                boundary.append(tensor)
    features = model.layers[-1].input
    frozen = keras.Model(model.input, boundary if len(boundary) > 1 else boundary[0])
    # Keras clones the graph from the cut; the layers are the base's own, so training them here
    # trains the base model's copy.
    trained = keras.Model(boundary if len(boundary) > 1 else boundary[0], features)
    return Cut(model, frozen, trained, [layer.name for layer in tuned])


def activations(part: Any, batch: np.ndarray) -> list[np.ndarray]:
    """The frozen part's activations for a preprocessed batch, as a list (one array per input of
    the trained part)."""
    out = part(batch, training=False)
    return [np.asarray(a) for a in (out if isinstance(out, list | tuple) else [out])]


def features(part: Any, acts: list[np.ndarray], batch: int = 32) -> np.ndarray:
    """The trained part's output (the classifier's input) for cached activations."""
    rows = []
    for start in range(0, len(acts[0]), batch):
        chunk = [a[start : start + batch] for a in acts]
        rows.append(np.asarray(part(chunk if len(chunk) > 1 else chunk[0], training=False)))
    return np.concatenate(rows) if rows else np.empty((0, int(part.output.shape[-1])), np.float32)


@dataclass
class Tuned:
    """The trained layers with the head on top (on the cut's activations) and its history."""

    model: Any
    history: list[dict[str, float]]

    def probabilities(self, acts: list[np.ndarray]) -> np.ndarray:
        return np.asarray(self.model.predict(acts if len(acts) > 1 else acts[0], batch_size=32, verbose=0))


def fine_tune(
    part: Cut,
    head: fit.Fitted,
    x: list[np.ndarray],
    y: np.ndarray,
    epochs: int,
    learning_rate: float,
    validation: tuple[list[np.ndarray], np.ndarray] | None = None,
    on_epoch: Callable[[int, dict[str, float]], bool] | None = None,
    seed: int = 0,
) -> Tuned:
    """Train the cut's trained layers and a softmax layer started from ``head`` together on cached
    activations ``x`` (class indices ``y``). ``on_epoch`` as for ``fit.fit``."""
    import keras

    keras.utils.set_random_seed(seed)
    for layer in part.trained.layers:
        # Frozen batch normalization runs in inference mode: its statistics stay the base's (a
        # fit's training=True would otherwise override any training=False given here).
        layer.trainable = not isinstance(layer, keras.layers.BatchNormalization)
    inputs = [keras.Input(t.shape[1:]) for t in part.trained.inputs]
    base_features = part.trained(inputs if len(inputs) > 1 else inputs[0])
    # The head as it was fitted: behind the standardization (fixed), so its L2 penalty and the
    # learning rate mean what they meant then.
    standardize = keras.layers.Normalization(
        mean=head.mean, variance=np.square(head.std), name="custom_standardize"
    )
    softmax = keras.layers.Dense(
        head.kernel.shape[1],
        activation="softmax",
        kernel_regularizer=keras.regularizers.L2(fit.L2),
        name="custom_predictions",
    )
    model = keras.Model(inputs if len(inputs) > 1 else inputs[0], softmax(standardize(base_features)))
    softmax.set_weights([head.standard_kernel, head.standard_bias])
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    history: list[dict[str, float]] = []
    held = None if validation is None or not len(validation[1]) else validation
    model.fit(
        x if len(x) > 1 else x[0],
        y,
        epochs=epochs,
        batch_size=fit.BATCH,
        shuffle=True,
        validation_data=None if held is None else (held[0] if len(held[0]) > 1 else held[0][0], held[1]),
        callbacks=[fit.reporting(history, on_epoch)],
        verbose=0,
    )
    return Tuned(model, history)


def classifier(part: Cut, tuned: Tuned) -> Any:
    """The whole custom classifier to serve: images in, the custom classes' probabilities out."""
    import keras

    standardize = tuned.model.get_layer("custom_standardize")
    softmax = tuned.model.get_layer("custom_predictions")
    features = part.model.layers[-1].input
    return keras.Model(part.model.input, softmax(standardize(features)), name="custom_classifier")
