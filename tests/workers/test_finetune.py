"""Fine-tuning on real Keras: where the bases are cut, that the cut computes what the whole model
does, and that training changes the last layers only and gives the classifier that is published."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest

from common import repository
from common.models import BACKBONE_LAYERS
from workers.training import finetune, fit


@pytest.mark.slow
@pytest.mark.parametrize("base", sorted(BACKBONE_LAYERS))
def test_backbone_layer_counts_are_keras_own(base: str) -> None:
    builder = {"vgg16": "VGG16", "resnet50": "ResNet50", "inceptionv3": "InceptionV3"}[base]
    model = getattr(keras.applications, builder)(weights=None)
    assert len(model.layers[1:-1]) == BACKBONE_LAYERS[base]
    with pytest.raises(ValueError, match="between 1 and"):
        finetune.cut(model, BACKBONE_LAYERS[base] + 1)


def _parity(model: Any, layers: int, size: int) -> finetune.Cut:
    part = finetune.cut(model, layers)
    images = np.random.default_rng(0).uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
    whole = np.asarray(keras.Model(model.input, model.layers[-1].input)(images))
    through_cut = finetune.features(part.trained, finetune.activations(part.frozen, images))
    np.testing.assert_allclose(through_cut, whole, rtol=1e-4, atol=1e-4)
    assert part.layer_names[-1] == model.layers[-2].name and len(part.layer_names) == layers
    return part


@pytest.mark.slow
def test_resnet50_cut_at_a_block_computes_what_the_whole_model_does() -> None:
    keras.utils.set_random_seed(0)
    model = keras.applications.ResNet50(weights=None)
    part = _parity(model, 11, 224)
    assert part.inputs == 1 and part.bytes_per_image() == 4 * 7 * 7 * 2048
    assert part.trained.get_layer("conv5_block3_1_conv") is model.get_layer("conv5_block3_1_conv")


@pytest.mark.slow
def test_inceptionv3_cut_across_branches_carries_every_branch() -> None:
    keras.utils.set_random_seed(0)
    model = keras.applications.InceptionV3(weights=None)
    layers = next(n for n in range(1, 40) if finetune.cut(model, n).inputs > 1)
    part = _parity(model, layers, 299)
    assert part.inputs > 1


def tiny_classifier() -> Any:
    """A keras.applications-shaped network: convolutions with batch normalization, pooling, and an
    ImageNet-like softmax named ``predictions``."""
    inputs = keras.Input((16, 16, 3))
    x = inputs
    for i in (1, 2):
        x = keras.layers.Conv2D(8, 3, padding="same", name=f"conv{i}")(x)
        x = keras.layers.BatchNormalization(name=f"bn{i}")(x)
        x = keras.layers.ReLU(name=f"relu{i}")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, keras.layers.Dense(10, activation="softmax", name="predictions")(x))


def colour_squares(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noisy images of three classes: red, green or blue dominant."""
    rng = np.random.default_rng(seed)
    y = np.arange(count) % 3
    x = rng.uniform(-0.5, 0.5, (count, 16, 16, 3)).astype(np.float32)
    x[np.arange(count), :, :, y] += 1.0
    return x, y


def test_fine_tuning_trains_the_last_layers_only_and_publishes_one_classifier(tmp_path: Path) -> None:
    keras.utils.set_random_seed(0)
    model = tiny_classifier()
    frozen_before = [w.copy() for w in model.get_layer("conv1").get_weights()]
    bn_before = [w.copy() for w in model.get_layer("bn2").get_weights()]
    tuned_before = model.get_layer("conv2").get_weights()[0].copy()
    part = finetune.cut(model, 4)  # conv2, bn2, relu2, pool
    assert part.layer_names == ["conv2", "bn2", "relu2", "pool"]
    x, y = colour_squares(120, seed=1)
    acts = finetune.activations(part.frozen, x)
    head = fit.fit(finetune.features(part.trained, acts), y, 3, 20)
    history: list[dict[str, float]] = []
    tuned = finetune.fine_tune(part, head, acts, y, 5, 1e-3, on_epoch=lambda e, f: history.append(f) or True)
    assert len(history) == 5 and len(tuned.history) == 5
    for before, after in zip(frozen_before, model.get_layer("conv1").get_weights(), strict=True):
        np.testing.assert_array_equal(before, after)  # below the cut: untouched
    for before, after in zip(bn_before, model.get_layer("bn2").get_weights(), strict=True):
        np.testing.assert_array_equal(before, after)  # batch normalization: frozen, statistics kept
    assert not np.array_equal(tuned_before, model.get_layer("conv2").get_weights()[0])

    fresh, truth = colour_squares(60, seed=2)
    probabilities = tuned.probabilities(finetune.activations(part.frozen, fresh))
    assert fit.evaluate(probabilities, truth, ["r", "g", "b"])["accuracy"] >= 0.9

    classifier = finetune.classifier(part, tuned)
    classifier.save(tmp_path / repository.MODEL_FILE)
    loaded = keras.models.load_model(tmp_path / repository.MODEL_FILE, compile=False)
    assert loaded.output_shape == (None, 3)
    np.testing.assert_allclose(np.asarray(loaded(fresh)), probabilities, rtol=1e-4, atol=1e-5)


def test_fine_tuning_stops_when_told() -> None:
    keras.utils.set_random_seed(0)
    part = finetune.cut(tiny_classifier(), 2)
    x, y = colour_squares(30, seed=1)
    acts = finetune.activations(part.frozen, x)
    head = fit.fit(finetune.features(part.trained, acts), y, 3, 2)
    tuned = finetune.fine_tune(part, head, acts, y, 50, 1e-3, on_epoch=lambda epoch, figures: epoch < 2)
    assert len(tuned.history) == 2
