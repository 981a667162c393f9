"""Custom models served by their base model's service: heads applied to the features of the same
batch, labels and metadata of each, refusals for unknown and stale ones - a fake backbone whose
features are known."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest
from flask.testing import FlaskClient

from common.custom import heads
from common.runtime import Outputs, RuntimeInfo
from common.service import ServiceSettings, create_app
from services import resnet50
from tests.conftest import photo

FEATURES = 4


class Backbone:
    """Features: the batch's mean pixel value in every place; ImageNet probabilities: uniform."""

    def __init__(self, weights_hash: str = "base-1") -> None:
        self.weights_hash = weights_hash
        self.batches: list[int] = []

    def load(self) -> RuntimeInfo:
        return RuntimeInfo("fake", "random", "seed=0", self.weights_hash, 1000, 0.0, features=FEATURES)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self.predict_features(batch).probabilities

    def predict_features(self, batch: np.ndarray) -> Outputs:
        self.batches.append(len(batch))
        means = batch.reshape(len(batch), -1).mean(axis=1, keepdims=True)
        return Outputs(np.full((len(batch), 1000), 1e-3, np.float32), np.repeat(means, FEATURES, axis=1))


def publish(root: Path, name: str, classes: list[str], base_hash: str = "base-1", sign: float = 1.0) -> int:
    kernel = np.zeros((FEATURES, len(classes)), np.float32)
    kernel[0, 0] = sign  # class 0 wins for bright images when sign > 0
    meta = {
        "name": name,
        "base": "resnet50",
        "base_weights": "random",
        "base_weights_hash": base_hash,
        "features": FEATURES,
        "classes": classes,
        "evaluation": {"accuracy": 1.0},
    }
    return heads.publish(root, name, kernel, np.zeros(len(classes), np.float32), meta)


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    publish(tmp_path, "bright", ["light", "dark"])
    publish(tmp_path, "old", ["a", "b"], base_hash="base-0")
    return tmp_path


@pytest.fixture
def client(repository: Path) -> FlaskClient:
    settings = ServiceSettings(custom_models_dir=str(repository), custom_poll_s=3600)
    app = create_app(resnet50.SPEC, settings, Backbone(), background_load=False)
    return app.test_client()


def test_a_custom_model_answers_with_its_own_labels_and_version(
    client: FlaskClient, repository: Path
) -> None:
    answer = client.post("/v1/predict?model=bright&top_k=2", data=photo())
    assert answer.status_code == 200, answer.get_json()
    body = answer.get_json()
    assert (body["model"], body["version"], body["base"], body["weights"]) == (
        "bright",
        "1",
        "resnet50",
        "random",
    )
    assert {p["label"] for p in body["predictions"]} == {"light", "dark"}
    assert body["weights_hash"] != "base-1" and body["base_weights_hash"] == "base-1"
    labels = client.get("/v1/labels?model=bright").get_json()
    assert (
        labels["labels"] == [["light", "light"], ["dark", "dark"]]
        and labels["labels_hash"] == body["labels_hash"]
    )
    own = client.post("/v1/predict?top_k=1", data=photo()).get_json()
    assert own["model"] == "resnet50" and "base" not in own


def test_the_service_lists_its_custom_models_and_which_are_stale(client: FlaskClient) -> None:
    listed = {m["name"]: m for m in client.get("/v1/model").get_json()["custom_models"]}
    assert listed["bright"]["state"] == "ready" and listed["bright"]["classes"] == 2
    assert listed["bright"]["evaluation"] == {"accuracy": 1.0}
    assert listed["old"]["state"] == "stale" and "train it again" in listed["old"]["reason"]
    assert client.get("/v1/model").get_json()["features"] == FEATURES


def test_unknown_and_stale_custom_models_are_refused(client: FlaskClient) -> None:
    unknown = client.post("/v1/predict?model=nope", data=photo())
    assert unknown.status_code == 404 and unknown.get_json()["error"]["code"] == "unknown_model"
    stale = client.post("/v1/predict?model=old", data=photo())
    assert stale.status_code == 409 and stale.get_json()["error"]["code"] == "custom_model_stale"
    assert client.get("/v1/labels?model=nope").status_code == 404


def test_features_are_returned_on_request(client: FlaskClient) -> None:
    body = client.post("/v1/predict?features=true&top_k=1", data=photo()).get_json()
    vector = np.frombuffer(base64.b64decode(body["features"]["data"]), "<f4")
    assert vector.shape == (FEATURES,) and np.allclose(vector, vector[0])


def test_a_new_version_is_served_after_the_next_look_at_the_repository(repository: Path) -> None:
    settings = ServiceSettings(custom_models_dir=str(repository), custom_poll_s=3600)
    app = create_app(resnet50.SPEC, settings, Backbone(), background_load=False)
    client = app.test_client()
    first = client.post("/v1/predict?model=bright&top_k=1", data=photo()).get_json()
    publish(repository, "bright", ["light", "dark"], sign=-1.0)
    app.extensions["heads"].refresh()
    second = client.post("/v1/predict?model=bright&top_k=1", data=photo()).get_json()
    assert (first["version"], second["version"]) == ("1", "2")
    assert first["predictions"][0]["label"] != second["predictions"][0]["label"]
    heads.remove(repository, "bright")
    app.extensions["heads"].refresh()
    assert client.post("/v1/predict?model=bright", data=photo()).status_code == 404
