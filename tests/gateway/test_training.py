"""The training routes on a real Redis with a fake model gateway: a dataset is checked, written and
queued on the training queue; every refusal names its problems and leaves nothing behind; custom
models are found through their base's replicas and removed."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import responses

from common import repository
from common.jobs.settings import JobSettings
from common.training import removals
from common.training.settings import TrainingSettings
from fleet.client import build_client
from fleet.registry import Registry
from fleet.transport import new_session
from gateway.app import create_app
from tests import colours
from tests.gateway.fakes import FakeModelClient, redis_gateway
from tests.helpers import auth_settings, gateway_settings, keyed_client


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    return tmp_path / "models"


@pytest.fixture
def training_gateway(redis_url: str, tmp_path: Path, models_dir: Path) -> Any:
    jobs = JobSettings(redis_url=redis_url, dir=str(tmp_path / "jobs"))
    training = TrainingSettings(models_dir=str(models_dir), min_images_per_class=3)
    return keyed_client(redis_gateway(redis_url, jobs, training))


def post(gateway: Any, archive: bytes, **fields: str) -> Any:
    return gateway.post("/v1/training", data={"dataset": (io.BytesIO(archive), "photos.zip"), **fields})


def test_a_dataset_is_checked_written_and_queued_for_training(
    training_gateway: Any, redis_url: str, tmp_path: Path
) -> None:
    answer = post(
        training_gateway,
        colours.archive(3, 1, classes=("red", "blue"), root="photos"),
        name="pets",
        epochs="7",
    )
    assert answer.status_code == 202, answer.json
    body = answer.json
    assert (body["kind"], body["status"], body["phase"], body["model"], body["base"]) == (
        "training",
        "pending",
        "queued",
        "pets",
        "resnet50",
    )
    assert body["classes"] == ["blue", "red"] and body["counts"] == {"blue": 3, "red": 3}
    assert body["options"] == {"epochs": 7, "validation_split": 0.2, "augment": False, "fine_tune_layers": 0}
    waiting = redis.Redis.from_url(redis_url).lrange("training", 0, -1)
    assert len(waiting) == 1 and json.loads(waiting[0])["headers"]["task"] == "imagerec.training.train"
    assert not redis.Redis.from_url(redis_url).llen("jobs")  # never on the inference queue
    manifest = json.loads((tmp_path / "jobs" / body["job_id"] / "dataset.json").read_text())
    assert len(manifest["items"]) == 6
    assert training_gateway.get(f"/v1/jobs/{body['job_id']}").json["kind"] == "training"


def test_options_may_come_in_the_query(training_gateway: Any) -> None:
    archive = colours.archive(3, 1, classes=("red", "blue"))
    answer = training_gateway.post(
        "/v1/training?name=pets&base=vgg16", data={"dataset": (io.BytesIO(archive), "p.zip")}
    )
    assert answer.status_code == 202 and answer.json["base"] == "vgg16"
    twice = training_gateway.post(
        "/v1/training?name=pets", data={"dataset": (io.BytesIO(archive), "p.zip"), "name": "x"}
    )
    assert twice.status_code == 400 and "once" in twice.json["error"]["message"]


@pytest.mark.parametrize(
    ("archive", "fields", "code", "expected"),
    [
        (
            colours.archive(3, 1, classes=("red",)),
            {"name": "a"},
            "invalid_dataset",
            "at least 2 class folders",
        ),
        (colours.archive(2, 1), {"name": "a"}, "invalid_dataset", "each class needs at least 3"),
        (colours.archive(3, 1), {"name": "A!"}, "invalid_training_options", "name must"),
        (colours.archive(3, 1), {}, "invalid_training_options", "name must"),
        (colours.archive(3, 1), {"name": "vgg16"}, "invalid_training_options", "model of the fleet"),
        (
            colours.archive(3, 1),
            {"name": "a", "epochs": "many"},
            "invalid_training_options",
            "epochs must be a int",
        ),
        (
            colours.archive(3, 1),
            {"name": "a", "validation_split": "0.9"},
            "invalid_training_options",
            "between",
        ),
        (colours.archive(3, 1), {"name": "a", "augment": "maybe"}, "invalid_training_options", "augment"),
        (
            colours.archive(3, 1),
            {"name": "a", "base": "vgg16", "fine_tune_layers": "22"},
            "invalid_training_options",
            "fine_tune_layers must be between 0 and 21",
        ),
        (b"PK\x03\x04 broken", {"name": "a"}, "invalid_archive", "archive"),
    ],
)
def test_refusals_name_the_problem_and_leave_nothing(
    training_gateway: Any,
    redis_url: str,
    tmp_path: Path,
    archive: bytes,
    fields: dict[str, str],
    code: str,
    expected: str,
) -> None:
    answer = post(training_gateway, archive, **fields)
    assert answer.status_code == 400, answer.json
    assert expected in answer.json["error"]["message"], answer.json
    if code != "invalid_archive":
        assert answer.json["error"]["code"] == code
    assert not redis.Redis.from_url(redis_url).llen("training")
    assert not list((tmp_path / "jobs").glob("*"))  # no job folder, no staging left


def test_a_dataset_refusal_lists_every_problem(training_gateway: Any) -> None:
    answer = post(training_gateway, colours.archive(1, 1, classes=("red", "blue")), name="a")
    problems = answer.json["error"]["problems"]
    assert len(problems) >= 2 and all("needs at least 3" in p for p in problems[:2])


def test_training_needs_a_models_folder(redis_url: str, tmp_path: Path) -> None:
    settings = gateway_settings(rate_limit="")
    app = create_app(
        settings,
        client=FakeModelClient(settings),  # type: ignore[arg-type]
        poll_health=False,
        job_settings=JobSettings(redis_url=redis_url, dir=str(tmp_path)),
        training_settings=TrainingSettings(models_dir=""),
    )
    answer = post(keyed_client(app), colours.archive(3, 1), name="a")
    assert answer.status_code == 503 and answer.json["error"]["code"] == "training_unavailable"


def test_a_custom_model_is_removed_with_every_version(
    training_gateway: Any, models_dir: Path, trainer_removals: Path
) -> None:
    """The gateway asks; the trainer (here its removal loop) removes every version."""
    meta = {
        "name": "pets",
        "base": "resnet50",
        "base_weights_hash": "h",
        "features": 2,
        "classes": ["a", "b"],
    }
    for _ in range(2):
        repository.publish(
            models_dir,
            "pets",
            repository.write_head(np.eye(2, dtype=np.float32), np.zeros(2, np.float32)),
            meta,
        )
    assert training_gateway.delete("/v1/models/pets").json == {"deleted": "pets"}
    assert not (models_dir / "pets").exists()
    assert training_gateway.delete("/v1/models/pets").status_code == 404
    base = training_gateway.delete("/v1/models/resnet50")
    assert base.status_code == 400 and base.json["error"]["code"] == "not_custom"


def test_a_removal_the_trainer_does_not_answer_in_time_stays_queued(
    redis_url: str, tmp_path: Path, models_dir: Path
) -> None:
    """No trainer running: a 202, the model still on disk, and the request waiting for the trainer."""
    redis.Redis.from_url(redis_url).flushall()
    settings = gateway_settings(rate_limit="")
    app = create_app(
        settings,
        client=FakeModelClient(settings),  # type: ignore[arg-type]
        poll_health=False,
        job_settings=JobSettings(redis_url=redis_url, dir=str(tmp_path / "jobs")),
        training_settings=TrainingSettings(models_dir=str(models_dir), remove_wait_s=1),
        auth_settings=auth_settings(redis_url),
    )
    meta = {
        "name": "pets",
        "base": "resnet50",
        "base_weights_hash": "h",
        "features": 2,
        "classes": ["a", "b"],
    }
    repository.publish(models_dir, "pets", repository.write_head(np.eye(2), np.zeros(2)), meta)
    answer = keyed_client(app).delete("/v1/models/pets")
    assert answer.status_code == 202 and answer.json == {"deleted": "pets", "state": "queued"}
    assert (models_dir / "pets").is_dir()
    queued = redis.Redis.from_url(redis_url).lrange(removals.QUEUE, 0, -1)
    assert [json.loads(raw)["name"] for raw in queued] == ["pets"]


# --- finding custom models through their base's replicas -------------------------------------------


def model_json(custom: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": "resnet50",
        "state": "ready",
        "ready": True,
        "weights_hash": "w",
        "input_size": 224,
        "center_crop": 0.875,
        "precision": "fp32",
        "backend": "openvino",
        "custom_models": custom,
    }


def entry(name: str, version: str = "1") -> dict[str, Any]:
    return {
        "name": name,
        "version": version,
        "base": "resnet50",
        "base_weights": "random",
        "weights_hash": f"h{version}",
        "classes": 2,
        "class_names": ["a", "b"],
        "labels_hash": "lh",
        "state": "ready",
        "evaluation": {"accuracy": 0.9},
    }


@responses.activate
def test_the_registry_finds_custom_models_on_their_base_and_routes_to_replicas_that_list_them() -> None:
    responses.get("http://r1:8502/v1/model", json=model_json([entry("pets", "2")]))
    responses.get("http://r2:8502/v1/model", json=model_json([]))
    responses.get("http://vgg16:8501/v1/model", json={**model_json([]), "name": "vgg16"})
    responses.get("http://inceptionv3:8503/v1/model", json={**model_json([]), "name": "inceptionv3"})
    registry = Registry(gateway_settings().replicas, new_session(2))
    registry.refresh()
    assert registry.models == ["vgg16", "resnet50", "inceptionv3", "pets"]
    assert registry.base_of("pets") == "resnet50" and registry.is_custom("pets")
    for _ in range(3):  # round robin among base replicas, but the one that lists it first
        assert registry.candidates("pets")[0].url == "http://r1:8502"
    meta = registry.metadata("pets")
    assert (meta["version"], meta["weights_hash"], meta["input_size"], meta["weights"]) == (
        "2",
        "h2",
        224,
        "random",
    )
    described = registry.describe("pets")
    assert described["custom"] is True and described["status"] == "ready" and described["base"] == "resnet50"
    assert [r["url"] for r in described["replicas"]] == ["http://r1:8502"]
    with pytest.raises(Exception, match="unknown model 'cats'"):
        registry.base_of("cats")


@responses.activate
def test_the_client_names_a_custom_model_in_the_query_to_its_base() -> None:
    settings = gateway_settings()
    for url in ("http://r1:8502", "http://r2:8502"):
        responses.get(f"{url}/v1/model", json=model_json([entry("pets")]))
    responses.get("http://vgg16:8501/v1/model", json={**model_json([]), "name": "vgg16"})
    responses.get("http://inceptionv3:8503/v1/model", json={**model_json([]), "name": "inceptionv3"})
    model_client = build_client(settings)
    model_client.registry.refresh()
    for url in ("http://r1:8502", "http://r2:8502"):
        responses.post(
            f"{url}/v1/predict",
            json={
                "model": "pets",
                "predictions": [{"label": "a", "class_id": "a", "index": 0, "score": 1.0}],
            },
        )
    model_client.predict("pets", [b"image"], top_k=1)
    sent = [c.request for c in responses.calls if c.request.method == "POST"][0]
    assert "model=pets" in sent.url
    model_client.predict("resnet50", [b"image"], top_k=1)
    sent = [c.request for c in responses.calls if c.request.method == "POST"][1]
    assert "model=" not in sent.url


def test_unknown_form_fields_are_read_past_not_kept(training_gateway: Any) -> None:
    archive = colours.archive(3, 1, classes=("red", "blue"))
    answer = training_gateway.post(
        "/v1/training",
        data={"dataset": (io.BytesIO(archive), "p.zip"), "name": "pets", "junk": "x" * 5000},
    )
    assert answer.status_code == 202 and "junk" not in json.dumps(answer.json)


def test_fine_tuning_is_queued_unless_the_base_holds_its_most_fine_tuned_models(
    redis_url: str, tmp_path: Path
) -> None:
    redis.Redis.from_url(redis_url).flushall()
    settings = gateway_settings(rate_limit="")
    fake = FakeModelClient(settings)
    served = {"max_fine_tuned": 1, "custom_models": [{"name": "pets", "kind": "head"}]}
    fake.registry.metadata = lambda model: served  # type: ignore[method-assign]
    app = create_app(
        settings,
        client=fake,  # type: ignore[arg-type]
        poll_health=False,
        job_settings=JobSettings(redis_url=redis_url, dir=str(tmp_path / "jobs")),
        training_settings=TrainingSettings(models_dir=str(tmp_path / "models"), min_images_per_class=3),
    )
    gateway = keyed_client(app)
    archive = colours.archive(3, 1, classes=("red", "blue"))
    accepted = post(gateway, archive, name="birds", fine_tune_layers="11")
    assert accepted.status_code == 202, accepted.json
    assert accepted.json["options"]["fine_tune_layers"] == 11
    served["custom_models"].append({"name": "birds", "kind": "fine-tuned"})
    again = post(gateway, archive, name="birds", fine_tune_layers="11")  # retraining it replaces it
    assert again.status_code == 202, again.json
    refused = gateway.post(
        "/v1/training?name=cats&fine_tune_layers=3", data={"dataset": (io.BytesIO(archive), "a.zip")}
    )
    assert refused.status_code == 409 and refused.json["error"]["code"] == "too_many_fine_tuned"
    assert (
        "birds" in refused.json["error"]["message"]
        and "CUSTOM_MAX_FINE_TUNED" in refused.json["error"]["message"]
    )
    assert post(gateway, archive, name="cats").status_code == 202  # a head is always welcome
    served["custom_models"].pop()
    served["custom_models_loading"] = [{"name": "birds", "version": "2"}]  # counted while it loads
    assert post(gateway, archive, name="cats", fine_tune_layers="3").status_code == 409
    del served["max_fine_tuned"]  # a replica from before fine-tuning: the trainer checks
    assert post(gateway, archive, name="cats", fine_tune_layers="3").status_code == 202
    assert redis.Redis.from_url(redis_url).llen("training") == 4
