"""``POST /v1/explain``: occlusion sensitivity, its cost in forward passes, and whether it points
at what carries the class on a model trained in the test run."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from flask.testing import FlaskClient
from PIL import Image, ImageDraw

from common import imaging
from common.models import ModelSpec
from serving import preprocessing
from serving.app import ServiceSettings, create_app
from serving.explain import GREY, occluded
from tests.helpers import assert_error, encode, photo
from tests.serving.fakes import EchoRuntime


def test_each_copy_greys_a_square_twice_a_cell_centred_on_its_cell_row_by_row() -> None:
    pixels = np.full((12, 12, 3), 7, np.uint8)
    copies = occluded(pixels, 3)  # cells of 4: patches of 8, centred, clipped at the edges
    assert copies.shape == (10, 12, 12, 3) and (copies[0] == 7).all()
    grey = (copies[1:] == GREY).all(axis=3)
    assert ((copies[1:] == GREY) | (copies[1:] == 7)).all()
    expected = np.zeros((9, 12, 12), bool)
    for cell, (top, left) in enumerate((r, c) for r in range(3) for c in range(3)):
        expected[cell, max(0, 4 * top - 2) : 4 * top + 6, max(0, 4 * left - 2) : 4 * left + 6] = True
    assert (grey == expected).all()
    assert grey.any(axis=0).all()  # every pixel is hidden by some patch


def test_an_explanation_costs_its_stated_passes_in_calls_of_at_most_the_batch_size(
    service: FlaskClient, runtime: EchoRuntime
) -> None:
    response = service.post("/v1/explain?grid=5", data=photo(), content_type="image/jpeg")
    body = response.get_json()
    assert response.status_code == 200, body
    assert body["passes"] == 26 and body["grid"] == 5
    assert sum(shape[0] for shape in runtime.batches) == 26  # the forward passes, exactly
    assert max(shape[0] for shape in runtime.batches) <= 8
    drops = np.array(body["drops"])
    assert drops.shape == (5, 5) and np.isfinite(drops).all()
    assert set(body["class"]) == {"label", "class_id", "index", "score"}
    assert body["weights"] == "random" and body["model"] == "resnet50"


def test_the_class_explained_is_the_top_one_or_the_one_asked_for(service: FlaskClient) -> None:
    top = service.post("/v1/explain?grid=2", data=photo(), content_type="image/jpeg").get_json()
    predicted = service.post("/v1/predict", data=photo(), content_type="image/jpeg").get_json()
    assert top["class"]["index"] == predicted["predictions"][0]["index"]
    chosen = service.post("/v1/explain?grid=2&class_id=n02123045", data=photo(), content_type="image/jpeg")
    assert chosen.get_json()["class"] == {**chosen.get_json()["class"], "class_id": "n02123045", "index": 281}
    by_index = service.post("/v1/explain?grid=2&index=5", data=photo(), content_type="image/jpeg")
    assert by_index.get_json()["class"]["index"] == 5


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ("grid=8", "bad_request"),
        ("grid=1", "bad_request"),
        ("class_id=n0", "unknown_class"),
        ("index=1000", "bad_request"),
    ],
)
def test_bad_explanations_are_400s_before_any_pass(
    service: FlaskClient, runtime: EchoRuntime, query: str, code: str
) -> None:
    response = service.post(f"/v1/explain?{query}", data=photo(), content_type="image/jpeg")
    assert_error(response, 400, code)
    if query.startswith("grid"):
        assert runtime.batches == []  # 8 x 8 + 1 = 65 passes: over the tests' 50


def test_an_explanation_is_of_one_image(service: FlaskClient, runtime: EchoRuntime) -> None:
    black = encode(Image.new("RGB", (40, 40), "black"))
    response = service.post(
        "/v1/explain", data={"files": [(io.BytesIO(black), "a.png"), (io.BytesIO(black), "b.png")]}
    )
    assert_error(response, 400, "bad_request")
    assert runtime.batches == []


# A model trained here: which of three classes a photo is, is carried by one object's colour alone.
COLOURS = ((200, 30, 30), (30, 170, 30), (40, 60, 210))
SIDE, CELLS = 96, 4


def colour_photo(rng: np.random.Generator) -> tuple[bytes, int, tuple[int, int, int, int]]:
    """A noisy grey photo with two grey distractors and one coloured square (the class), and the
    square's box."""
    noise = rng.integers(120, 200, (SIDE, SIDE, 1)).repeat(3, axis=2).astype(np.uint8)
    image = Image.fromarray(noise)
    pen = ImageDraw.Draw(image)
    for _ in range(2):
        x, y = (int(v) for v in rng.integers(0, SIDE - 20, 2))
        s = int(rng.integers(10, 20))
        shade = int(rng.integers(40, 250))
        pen.rectangle((x, y, x + s, y + s), fill=(shade, shade, shade))
    label = int(rng.integers(0, len(COLOURS)))
    size = int(rng.integers(16, 24))
    x, y = (int(v) for v in rng.integers(0, SIDE - size, 2))
    pen.rectangle((x, y, x + size - 1, y + size - 1), fill=COLOURS[label])
    return encode(image), label, (x, y, x + size, y + size)


def train_colour_model(folder: Path) -> Path:
    import keras

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    photos = [colour_photo(rng) for _ in range(900)]
    limits = imaging.ImageLimits()
    inputs = preprocessing.get("tf")(
        np.stack([imaging.load_pixels(p, 64, limits, 1.0) for p, _, _ in photos])
    )
    labels = np.array([label for _, label, _ in photos])
    model = keras.Sequential(
        [
            keras.Input((64, 64, 3)),
            keras.layers.Conv2D(16, 3, activation="relu", padding="same"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(32, 3, activation="relu", padding="same"),
            keras.layers.GlobalMaxPooling2D(),
            keras.layers.Dense(len(COLOURS), activation="softmax"),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy")
    model.fit(inputs, labels, epochs=8, batch_size=32, verbose=0)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "labels.json").write_text(json.dumps(["red", "green", "blue"]))
    model.save(folder / "colours.keras")
    return folder


@pytest.mark.slow
def test_the_hottest_cells_fall_on_the_object_that_carries_the_class(tmp_path: Path) -> None:
    folder = train_colour_model(tmp_path / "colours")
    spec = ModelSpec(name="colours", input_size=64, preprocessing="tf", labels_path=folder / "labels.json")
    settings = ServiceSettings(weights=str(folder / "colours.keras"), backend="keras", center_crop=1.0)
    service = create_app(spec, settings, background_load=False).test_client()
    rng = np.random.default_rng(12345)  # fresh photos, never trained on
    on_object, right, fresh = 0, 0, 60
    edges = np.linspace(0, SIDE, CELLS + 1)
    for _ in range(fresh):
        data, label, (x0, y0, x1, y1) = colour_photo(rng)
        body = service.post(f"/v1/explain?grid={CELLS}", data=data, content_type="image/png").get_json()
        assert body["passes"] == CELLS * CELLS + 1
        right += body["class"]["index"] == label
        row, col = np.unravel_index(int(np.argmax(body["drops"])), (CELLS, CELLS))
        # the hottest cell overlaps the coloured square
        on_object += edges[col] < x1 and x0 < edges[col + 1] and edges[row] < y1 and y0 < edges[row + 1]
    print(f"explain: model right {right}/{fresh}, hottest cell on the object {on_object}/{fresh}")
    assert right / fresh >= 0.9, f"the model itself is not good enough: {right}/{fresh}"
    assert on_object / fresh >= 0.85, f"{on_object} of {fresh} hottest cells on the object"
