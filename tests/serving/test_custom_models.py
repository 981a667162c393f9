"""Custom models served by their base model's service: heads applied to the features of the same
batch, labels and metadata of each, refusals for unknown and stale ones - a fake backbone whose
features are known."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from flask.testing import FlaskClient
from PIL import Image

from common import repository
from deploy.local.running import wait_until
from services import resnet50
from serving import custom
from serving.app import ServiceSettings, create_app
from serving.manager import ModelManager
from serving.runtime import Outputs, RuntimeInfo
from tests.helpers import photo

FEATURES = 4


class Backbone:
    """Features: the batch's mean pixel value in every place; ImageNet probabilities: uniform."""

    def __init__(self, weights_hash: str = "base-1") -> None:
        self.weights_hash = weights_hash
        self.batches: list[int] = []

    pixels_in = False

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
    return repository.publish(
        root, name, repository.write_head(kernel, np.zeros(len(classes), np.float32)), meta
    )


@pytest.fixture
def custom_models_dir(tmp_path: Path) -> Path:
    publish(tmp_path, "bright", ["light", "dark"])
    publish(tmp_path, "old", ["a", "b"], base_hash="base-0")
    return tmp_path


@pytest.fixture
def custom_service(custom_models_dir: Path) -> FlaskClient:
    settings = ServiceSettings(custom_models_dir=str(custom_models_dir), repository_poll_s=0)
    app = create_app(resnet50.SPEC, settings, Backbone(), background_load=False)
    return app.test_client()


def test_a_custom_model_answers_with_its_own_labels_and_version(
    custom_service: FlaskClient, custom_models_dir: Path
) -> None:
    answer = custom_service.post("/v1/predict?model=bright&top_k=2", data=photo())
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
    labels = custom_service.get("/v1/labels?model=bright").get_json()
    assert (
        labels["labels"] == [["light", "light"], ["dark", "dark"]]
        and labels["labels_hash"] == body["labels_hash"]
    )
    own = custom_service.post("/v1/predict?top_k=1", data=photo()).get_json()
    assert own["model"] == "resnet50" and "base" not in own


def test_the_service_lists_its_custom_models_and_which_are_stale(custom_service: FlaskClient) -> None:
    listed = {m["name"]: m for m in custom_service.get("/v1/model").get_json()["custom_models"]}
    assert listed["bright"]["state"] == "ready" and listed["bright"]["classes"] == 2
    assert listed["bright"]["evaluation"] == {"accuracy": 1.0}
    assert listed["old"]["state"] == "stale" and "train it again" in listed["old"]["reason"]
    assert custom_service.get("/v1/model").get_json()["features"] == FEATURES


def test_unknown_and_stale_custom_models_are_refused(custom_service: FlaskClient) -> None:
    unknown = custom_service.post("/v1/predict?model=nope", data=photo())
    assert unknown.status_code == 404 and unknown.get_json()["error"]["code"] == "unknown_model"
    stale = custom_service.post("/v1/predict?model=old", data=photo())
    assert stale.status_code == 409 and stale.get_json()["error"]["code"] == "custom_model_stale"
    assert custom_service.get("/v1/labels?model=nope").status_code == 404


def test_features_are_returned_on_request(custom_service: FlaskClient) -> None:
    body = custom_service.post("/v1/predict?features=true&top_k=1", data=photo()).get_json()
    vector = np.frombuffer(base64.b64decode(body["features"]["data"]), "<f4")
    assert vector.shape == (FEATURES,) and np.allclose(vector, vector[0])


def test_a_new_version_is_served_after_the_next_look_at_the_repository(custom_models_dir: Path) -> None:
    settings = ServiceSettings(custom_models_dir=str(custom_models_dir), repository_poll_s=0)
    app = create_app(resnet50.SPEC, settings, Backbone(), background_load=False)
    service = app.test_client()
    first = service.post("/v1/predict?model=bright&top_k=1", data=photo()).get_json()
    publish(custom_models_dir, "bright", ["light", "dark"], sign=-1.0)
    app.extensions["models"].refresh()
    second = service.post("/v1/predict?model=bright&top_k=1", data=photo()).get_json()
    assert (first["version"], second["version"]) == ("1", "2")
    assert first["predictions"][0]["label"] != second["predictions"][0]["label"]
    repository.remove(custom_models_dir, "bright")
    app.extensions["models"].refresh()
    assert service.post("/v1/predict?model=bright", data=photo()).status_code == 404


# --- fine-tuned custom models: a whole classifier of their own, served beside the base ----------


def flat(value: int) -> bytes:
    """A 64x64 PNG of one grey level."""
    out = io.BytesIO()
    Image.new("RGB", (64, 64), (value, value, value)).save(out, "PNG")
    return out.getvalue()


def publish_tuned(root: Path, name: str, sign: float = 1.0, broken: bool = False) -> int:
    """A fine-tuned version: a small Keras classifier on the base's input (mean brightness decides
    between two classes, ``sign`` says which way), as the trainer publishes one."""
    import keras

    inputs = keras.Input((224, 224, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(inputs)
    softmax = keras.layers.Dense(2, activation="softmax")
    model = keras.Model(inputs, softmax(pooled))
    softmax.set_weights([np.array([[sign, -sign]] * 3, np.float32) / 10, np.zeros(2, np.float32)])

    def write(folder: Path) -> None:
        if broken:
            (folder / "model.keras").write_bytes(b"not a model")
        else:
            model.save(folder / "model.keras")

    meta = {
        "name": name,
        "kind": repository.FINE_TUNED,
        "base": "resnet50",
        "base_weights": "random",
        "base_weights_hash": "base-1",
        "features": FEATURES,
        "classes": ["light", "dark"],
        "training": {"fine_tune_layers": 3},
    }
    return repository.publish(root, name, write, meta)


def tuned_service(
    root: Path, backbone: Backbone | None = None, **settings: object
) -> tuple[Backbone, FlaskClient, ModelManager]:
    """A service whose fine-tuned models have loaded (they load on a thread of their own)."""
    backbone = backbone or Backbone()
    config = ServiceSettings(custom_models_dir=str(root), repository_poll_s=0, backend="keras", **settings)  # type: ignore[arg-type]
    app = create_app(resnet50.SPEC, config, backbone, background_load=False)
    models: ModelManager = app.extensions["models"]
    settle(models)
    return backbone, app.test_client(), models


def settle(models: ModelManager) -> None:
    wait_until(lambda: not models.loading(), 60, "fine-tuned models to load")


def test_a_fine_tuned_model_runs_on_its_own_model_not_the_base(tmp_path: Path) -> None:
    publish_tuned(tmp_path, "tuned")
    backbone, service, _ = tuned_service(tmp_path)
    calls = len(backbone.batches)
    bright = service.post("/v1/predict?model=tuned&top_k=1", data=flat(250))
    assert bright.status_code == 200, bright.get_json()
    body = bright.get_json()
    assert body["predictions"][0]["label"] == "light"
    dark = service.post("/v1/predict?model=tuned&top_k=1", data=flat(5)).get_json()
    assert dark["predictions"][0]["label"] == "dark"
    assert len(backbone.batches) == calls  # the base's backbone never ran for it
    assert (body["model"], body["version"], body["base"], body["fine_tune_layers"]) == (
        "tuned",
        "1",
        "resnet50",
        3,
    )
    assert body["weights"] == "random" and body["weights_hash"] not in ("base-1", "")
    assert body["backend"].startswith("keras")
    listed = {m["name"]: m for m in service.get("/v1/model").get_json()["custom_models"]}
    assert listed["tuned"]["kind"] == "fine-tuned" and listed["tuned"]["state"] == "ready"
    assert listed["tuned"]["weights_hash"] == body["weights_hash"]
    features = service.post("/v1/predict?model=tuned&features=true", data=flat(250))
    assert features.status_code == 400 and features.get_json()["error"]["code"] == "no_features"
    assert service.post("/v1/predict?top_k=1", data=flat(250)).get_json()["model"] == "resnet50"


def test_a_fine_tuned_model_is_not_stale_when_the_base_changes_weights(tmp_path: Path) -> None:
    publish_tuned(tmp_path, "tuned")
    _, service, _ = tuned_service(tmp_path, Backbone("base-2"))  # other base weights than it started from
    answer = service.post("/v1/predict?model=tuned&top_k=1", data=flat(250))
    assert answer.status_code == 200 and answer.get_json()["base_weights_hash"] == "base-1"


def test_a_new_fine_tuned_version_replaces_the_old_which_is_closed(tmp_path: Path) -> None:
    publish_tuned(tmp_path, "tuned")
    _, service, models = tuned_service(tmp_path)
    old = models.get("tuned")
    assert isinstance(old, custom.FineTuned)
    publish_tuned(tmp_path, "tuned", sign=-1.0)
    models.refresh()
    settle(models)
    answer = service.post("/v1/predict?model=tuned&top_k=1", data=flat(250)).get_json()
    assert (answer["version"], answer["predictions"][0]["label"]) == ("2", "dark")
    assert old.served.batcher.join(10), "the old batcher did not stop"
    repository.remove(tmp_path, "tuned")
    models.refresh()
    assert service.post("/v1/predict?model=tuned", data=flat(250)).status_code == 404


def test_fine_tuned_models_beyond_the_limit_and_broken_ones_are_listed_not_served(tmp_path: Path) -> None:
    publish_tuned(tmp_path, "first")
    publish_tuned(tmp_path, "second")
    publish_tuned(tmp_path, "broken", broken=True)
    _, service, models = tuned_service(tmp_path, custom_max_fine_tuned=1)
    model = service.get("/v1/model").get_json()
    assert [m["name"] for m in model["custom_models"]] == ["first"] and model["max_fine_tuned"] == 1
    reasons = {b["name"]: b["reason"] for b in model["custom_models_broken"]}
    assert "CUSTOM_MAX_FINE_TUNED" in reasons["second"] and "does not load" in reasons["broken"]
    assert service.post("/v1/predict?model=second", data=flat(250)).status_code == 404
    repository.remove(tmp_path, "first")  # room again: the one over the limit loads on the next look
    models.refresh()
    settle(models)
    assert [h.name for h in models.all()] == ["second"]
    assert set(models._failed) == {"broken"}  # a version that did not load is not loaded again
    repository.remove(tmp_path, "broken")  # trained again under that name: version 1 anew, tried afresh
    models.refresh()
    assert models.broken() == {}
    repository.remove(tmp_path, "second")
    publish_tuned(tmp_path, "broken")
    models.refresh()
    settle(models)
    assert [h.name for h in models.all()] == ["broken"] and models.broken() == {}


def test_a_model_deleted_and_trained_again_is_served_anew_at_version_1(custom_models_dir: Path) -> None:
    settings = ServiceSettings(custom_models_dir=str(custom_models_dir), repository_poll_s=0)
    app = create_app(resnet50.SPEC, settings, Backbone(), background_load=False)
    service = app.test_client()
    first = service.post("/v1/predict?model=bright&top_k=1", data=photo()).get_json()
    repository.remove(custom_models_dir, "bright")
    publish(custom_models_dir, "bright", ["light", "dark"], sign=-1.0)  # between two looks: version 1 again
    app.extensions["models"].refresh()
    again = service.post("/v1/predict?model=bright&top_k=1", data=photo()).get_json()
    assert first["version"] == again["version"] == "1"
    assert first["predictions"][0]["label"] != again["predictions"][0]["label"]
    assert first["weights_hash"] != again["weights_hash"]


def test_a_request_that_found_a_replaced_version_is_answered_by_its_successor(tmp_path: Path) -> None:
    publish_tuned(tmp_path, "tuned")
    _, service, models = tuned_service(tmp_path)
    old = models.get("tuned")
    assert isinstance(old, custom.FineTuned)
    publish_tuned(tmp_path, "tuned", sign=-1.0)
    models.refresh()
    settle(models)
    old.close()  # the swap closed it already: closing again changes nothing
    assert old.served.batcher.join(10), "the old batcher did not stop"
    looked_up = iter([old])  # the request looked the model up just before the swap
    newest = models.get
    models.get = lambda name: next(looked_up, None) or newest(name)  # type: ignore[method-assign]
    answer = service.post("/v1/predict?model=tuned&top_k=1", data=flat(250))
    assert answer.status_code == 200, answer.get_json()
    assert (answer.get_json()["version"], answer.get_json()["predictions"][0]["label"]) == ("2", "dark")
