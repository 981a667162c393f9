"""Custom classes on the running fleet, through Nginx, with Redis and the Celery trainer: train on
photos made in the test, classify fresh ones, retrain under load, refuse bad datasets, keep ten
custom models cheap, and survive a trainer killed with -9."""

from __future__ import annotations

import io
import os
import shutil
import signal
import threading
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import requests

from deploy.local.running import children, rss_mb, wait_until
from tests import colours
from tests.e2e.running import E2EFleet, job, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def train(fleet: E2EFleet, archive: bytes, **fields: Any) -> requests.Response:
    data = {key: str(value) for key, value in fields.items()}
    return requests.post(
        f"{fleet.url}/v1/training",
        files={"dataset": ("photos.zip", archive)},
        data=data,
        headers=fleet.admin,
        timeout=120,
    )


def classify(fleet: E2EFleet, model: str, image: bytes) -> requests.Response:
    return requests.post(
        f"{fleet.url}/v1/predict?model={model}&top_k=2",
        data=image,
        headers={"Content-Type": "image/jpeg", **fleet.admin},
        timeout=60,
    )


def listed(fleet: E2EFleet, name: str) -> dict[str, Any]:
    """``GET /v1/models/<name>`` as the admin sees it; empty when it is a 404. Asked the moment a
    training completes, it answers already: the trainer waited until every replica of the base
    served the model, and a gateway probes for a name it has not seen yet."""
    answer = requests.get(f"{fleet.url}/v1/models/{name}", headers=fleet.admin, timeout=10)
    if answer.status_code == 404:
        return {}
    answer.raise_for_status()
    return dict(answer.json())


@pytest.fixture(scope="module")
def trained(fleet: E2EFleet) -> dict[str, Any]:
    """A custom model ``colours`` on ResNet50, trained once for the module's tests."""
    answer = train(fleet, colours.archive(14, seed=1, root="photos"), name="colours", base="resnet50")
    assert answer.status_code == 202, answer.text
    body = answer.json()
    assert (body["kind"], body["status"], body["model"], body["base"]) == (
        "training",
        "pending",
        "colours",
        "resnet50",
    )
    assert body["classes"] == ["blue", "green", "red", "yellow"] and answer.headers["Location"].endswith(
        body["job_id"]
    )
    return wait_for(fleet, body["job_id"], ("completed", "failed", "cancelled"), 300)


def test_a_model_trained_on_the_users_photos_classifies_fresh_ones(
    fleet: E2EFleet, trained: dict[str, Any]
) -> None:
    assert trained["status"] == "completed", trained
    assert trained["served"] == {"name": "colours", "version": "1", "serving": True}
    evaluation = trained["evaluation"]
    assert evaluation["evaluated_on"] == "validation" and evaluation["accuracy"] >= 0.9, evaluation
    assert len(evaluation["confusion_matrix"]["matrix"]) == 4 and set(evaluation["per_class"]) == set(
        colours.CLASSES
    )
    assert (
        len(trained["history"]) == trained["options"]["epochs"] and "val_accuracy" in trained["history"][-1]
    )
    entry = listed(fleet, "colours")
    assert entry["status"] == "ready" and entry["custom"] is True
    assert (entry["base"], entry["base_weights"], entry["classes"], entry["version"]) == (
        "resnet50",
        "random",
        4,
        "1",
    )
    assert entry["evaluation"]["accuracy"] == evaluation["accuracy"]
    fresh = colours.images(10, seed=99)
    right = 0
    for label, image in fresh:
        answer = classify(fleet, "colours", image)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert (body["model"], body["base"], body["version"], body["weights"]) == (
            "colours",
            "resnet50",
            "1",
            "random",
        )
        right += body["predictions"][0]["label"] == label
    assert right / len(fresh) >= 0.9, f"{right}/{len(fresh)} fresh photos right"


def test_custom_models_with_one_label_set_vote_and_others_are_refused(
    fleet: E2EFleet, trained: dict[str, Any]
) -> None:
    answer = train(fleet, colours.archive(8, seed=2), name="colours-vgg", base="vgg16", epochs=30)
    done = wait_for(fleet, answer.json()["job_id"], ("completed", "failed"), 300)
    assert done["status"] == "completed", done
    label, image = colours.images(1, seed=5, classes=("green",))[0]
    jpeg = {"Content-Type": "image/jpeg"}
    voted = requests.post(
        f"{fleet.url}/v1/predict?models=colours,colours-vgg&vote=soft",
        data=image,
        headers={**jpeg, **fleet.admin},
        timeout=60,
    )
    assert voted.status_code == 200, voted.text
    assert voted.json()["members"] == ["colours", "colours-vgg"]
    mixed = requests.post(
        f"{fleet.url}/v1/predict?models=colours,resnet50",
        data=image,
        headers={**jpeg, **fleet.admin},
        timeout=60,
    )
    assert mixed.status_code in (400, 409, 422) and "label" in mixed.text, mixed.text


def test_retraining_under_load_swaps_in_version_2_with_no_failed_request(
    fleet: E2EFleet, trained: dict[str, Any]
) -> None:
    statuses: Counter[int] = Counter()
    versions: Counter[str] = Counter()
    stop = threading.Event()
    photos = [image for _, image in colours.images(4, seed=7)]

    def client() -> None:
        n = 0
        while not stop.is_set():
            answer = classify(fleet, "colours", photos[n % len(photos)])
            statuses[answer.status_code] += 1
            if answer.status_code == 200:
                versions[answer.json()["version"]] += 1
            n += 1

    threads = [threading.Thread(target=client) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        answer = train(fleet, colours.archive(14, seed=3), name="colours", epochs=40)
        done = wait_for(fleet, answer.json()["job_id"], ("completed", "failed"), 300)
        assert done["status"] == "completed" and done["served"]["version"] == "2", done["error"]
        wait_until(lambda: versions["2"] >= 5, 60, "answers from version 2")
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert set(statuses) == {200}, statuses
    assert versions["1"] > 0 and versions["2"] >= 5, versions


@pytest.mark.parametrize(
    ("build", "fields", "status", "expected"),
    [
        (lambda: colours.archive(6, 4, classes=("red",)), {"name": "one"}, 400, "at least 2 class folders"),
        (lambda: colours.archive(2, 4), {"name": "few"}, 400, "each class needs at least 5"),
        (lambda: b"not an archive at all", {"name": "junk"}, 400, "archive"),
        (lambda: colours.archive(6, 4), {"name": "Bad Name!"}, 400, "name must be"),
        (lambda: colours.archive(6, 4), {"name": "resnet50"}, 400, "model of the fleet"),
        (lambda: colours.archive(6, 4), {"name": "ok", "base": "alexnet"}, 400, "base must be"),
        (lambda: colours.archive(6, 4), {"name": "ok", "epochs": "0"}, 400, "epochs must be between"),
        (lambda: colours.archive(6, 4), {"name": "ok", "fine_tune_layers": "176"}, 400, "fine_tune_layers"),
    ],
)
def test_bad_datasets_and_options_are_refused_naming_the_problem(
    fleet: E2EFleet, build: Any, fields: dict[str, str], status: int, expected: str
) -> None:
    before = requests.get(f"{fleet.url}/v1/jobs?limit=100", headers=fleet.admin, timeout=10).json()["jobs"]
    answer = train(fleet, build(), **fields)
    assert answer.status_code == status, answer.text
    assert expected in answer.json()["error"]["message"], answer.text
    after = requests.get(f"{fleet.url}/v1/jobs?limit=100", headers=fleet.admin, timeout=10).json()["jobs"]
    assert [j["job_id"] for j in after] == [j["job_id"] for j in before]  # no job was created


def test_unreadable_files_are_skipped_and_listed(fleet: E2EFleet) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as out:
        for n, (label, image) in enumerate(colours.images(5, seed=8, classes=("red", "blue"))):
            out.writestr(f"{label}/{n}.jpg", image)
        out.writestr("red/broken.jpg", b"\xff\xd8 not really a jpeg")
        out.writestr("loose.jpg", colours.images(1, seed=9)[0][1])
    answer = train(fleet, buffer.getvalue(), name="skips", epochs=5)
    assert answer.status_code == 202, answer.text
    skipped = {item["name"] for item in answer.json()["skipped"]}
    assert skipped == {"red/broken.jpg", "loose.jpg"}
    assert answer.json()["counts"] == {"blue": 5, "red": 5}
    requests.delete(f"{fleet.url}/v1/jobs/{answer.json()['job_id']}", headers=fleet.admin, timeout=10)


def test_ten_custom_models_on_resnet50_add_under_100_mb(fleet: E2EFleet, trained: dict[str, Any]) -> None:
    """Heads share the base service's backbone: ten more custom models cost the fleet kilobytes
    of weights, not another ResNet50 (measured on the processes that hold them)."""
    holders = ("resnet50", "gateway")

    def resident() -> float:
        pids = fleet.pids()
        return sum(rss_mb(pids[name]) for name in holders)

    for n in range(3):  # warm: every label set's code path once
        classify(fleet, "colours", colours.images(1, seed=20 + n)[0][1])
    before = resident()
    repository = Path(fleet.fleet.environment()["CUSTOM_MODELS_DIR"])
    source = repository / "colours" / max(os.listdir(repository / "colours"), key=int)
    names = [f"copy-{n}" for n in range(10)]
    for name in names:
        shutil.copytree(source, repository / name / "1")
    wait_until(
        lambda: all(listed(fleet, name).get("status") == "ready" for name in names), 60, "ten more models"
    )
    for name in names:
        assert classify(fleet, name, colours.images(1, seed=30)[0][1]).status_code == 200
    added = resident() - before
    for name in names:
        assert (
            requests.delete(f"{fleet.url}/v1/models/{name}", headers=fleet.admin, timeout=10).status_code
            == 200
        )
    assert added <= 100, f"ten custom models added {added:.0f} MB"
    wait_until(lambda: not listed(fleet, names[0]), 30, "a deleted model to go")
    gone = classify(fleet, names[0], colours.images(1, seed=31)[0][1])
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "unknown_model"


def test_a_fine_tuned_model_holds_its_own_backbone_and_classifies_fresh_photos(fleet: E2EFleet) -> None:
    """fine_tune_layers > 0: the trainer trains ResNet50's last block with the head on its own
    copy of the base; the base's service loads the whole classifier beside ResNet50 (converted to
    its backend) and serves it - a copy of the backbone in its memory, measured."""
    before = rss_mb(fleet.pids()["resnet50"])
    answer = train(
        fleet,
        colours.archive(10, seed=3),
        name="colours-tuned",
        base="resnet50",
        epochs=30,
        fine_tune_layers=11,
    )
    assert answer.status_code == 202, answer.text
    assert answer.json()["options"]["fine_tune_layers"] == 11
    done = wait_for(fleet, answer.json()["job_id"], ("completed", "failed"), 600)
    assert done["status"] == "completed", done
    assert done["served"] == {"name": "colours-tuned", "version": "1", "serving": True}
    assert [entry["stage"] for entry in done["history"]].count("fine_tune") == done["epochs_total"] - 30
    assert done["evaluation"]["accuracy"] >= 0.9, done["evaluation"]
    entry = listed(fleet, "colours-tuned")
    assert (entry["status"], entry["kind"], entry["fine_tune_layers"], entry["base_weights"]) == (
        "ready",
        "fine-tuned",
        11,
        "random",
    )
    assert entry["weights_hash"] != listed(fleet, "resnet50")["weights_hash"]
    fresh = colours.images(10, seed=98)
    right = 0
    for label, image in fresh:
        reply = classify(fleet, "colours-tuned", image)
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert (body["model"], body["version"], body["fine_tune_layers"]) == ("colours-tuned", "1", 11)
        right += body["predictions"][0]["label"] == label
    assert right / len(fresh) >= 0.9, f"{right}/{len(fresh)} fresh photos right"
    added = rss_mb(fleet.pids()["resnet50"]) - before
    print(f"fine-tuned ResNet50 model: +{added:.0f} MB in the resnet50 service")  # the README's figure
    assert added >= 40, f"a whole classifier with ResNet50's weights (94 MB) added only {added:.0f} MB"
    assert (
        requests.delete(f"{fleet.url}/v1/models/colours-tuned", headers=fleet.admin, timeout=10).status_code
        == 200
    )
    wait_until(lambda: not listed(fleet, "colours-tuned"), 30, "the fine-tuned model to go")
    assert classify(fleet, "colours-tuned", fresh[0][1]).status_code == 404
    # closed once requests holding it are answered (the default deadline + 5 s): its copy goes back
    wait_until(lambda: rss_mb(fleet.pids()["resnet50"]) < before + added / 2, 120, "the copy's memory to go")


def test_kill_9_of_the_trainer_fails_the_job_cleanly_and_publishes_nothing(fleet: E2EFleet) -> None:
    repository = Path(fleet.fleet.environment()["CUSTOM_MODELS_DIR"])
    answer = train(fleet, colours.archive(40, seed=11), name="killed", augment="true", epochs=50)
    job_id = answer.json()["job_id"]
    wait_until(lambda: job(fleet, job_id)["features_done"] >= 16, 120, "the training to make progress")
    main = fleet.pids()["trainer"]
    for pid in [main, *children(main)]:
        os.kill(pid, signal.SIGKILL)
    done = wait_for(fleet, job_id, ("failed", "completed"), 180)
    assert done["status"] == "failed" and "nothing was published" in done["error"], done
    assert not (repository / "killed").exists()
    assert not [p for p in repository.iterdir() if p.name.startswith(".publishing-")]
    # The restarted trainer trains the next job.
    again = train(fleet, colours.archive(6, seed=12), name="killed", epochs=5)
    assert wait_for(fleet, again.json()["job_id"], ("completed", "failed"), 300)["status"] == "completed"
    assert (
        requests.delete(f"{fleet.url}/v1/models/killed", headers=fleet.admin, timeout=10).status_code == 200
    )
