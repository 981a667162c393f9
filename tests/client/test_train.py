"""``python -m client train`` and ``models delete`` against scripted answers (``responses``): what is
sent, how a training job is followed, and what is printed."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
import requests
import responses

from client import Client
from client.__main__ import main
from tests.client.helpers import multipart_files

JOB_ID = "c4ca4238a0b923820dcc509a6f75849b"
URL = "http://fleet.test"
STOPPED = f"python -m client job cancel {JOB_ID}"

EVALUATION = {
    "evaluated_on": "validation",
    "images": 4,
    "accuracy": 0.75,
    "per_class": {
        "cats": {"precision": 1.0, "recall": 0.5, "support": 2},
        "dogs": {"precision": 0.6667, "recall": 1.0, "support": 2},
        "birds": {"precision": None, "recall": None, "support": 0},
    },
    "confusion_matrix": {"labels": ["cats", "dogs", "birds"], "matrix": [[1, 1, 0], [0, 2, 0], [0, 0, 0]]},
}


def training(status: str = "pending", phase: str = "queued", **fields: Any) -> dict[str, Any]:
    """A training job as ``GET /v1/jobs/<id>`` describes it."""
    return {
        "job_id": JOB_ID,
        "kind": "training",
        "status": status,
        "phase": phase,
        "model": "pets",
        "base": "resnet50",
        "options": {"epochs": 3, "validation_split": 0.25, "augment": False, "fine_tune_layers": 0},
        "classes": ["birds", "cats", "dogs"],
        "counts": {"birds": 5, "cats": 6, "dogs": 5},
        "skipped": [{"name": "notes.txt", "reason": "not inside a class folder"}],
        "total": 16,
        "features_done": 0,
        "features_failed": 0,
        "epoch": len(fields.get("history", [])),
        "history": [],
        "evaluation": None,
        "served": None,
        "error": None,
        "links": {"self": f"/v1/jobs/{JOB_ID}", "model": "/v1/models/pets"},
        **fields,
    }


def epochs(count: int) -> list[dict[str, Any]]:
    return [
        {"epoch": n, "loss": 1.0 / n, "accuracy": 0.5 + n / 10, "val_loss": 1.2 / n, "val_accuracy": 0.25 * n}
        for n in range(1, count + 1)
    ]


def query(call: Any) -> dict[str, str]:
    return dict(parse_qsl(urlsplit(call.request.url).query))


def parts(call: Any) -> dict[str, tuple[str, bytes]]:
    """The file parts of the request (``responses`` read the streamed body into bytes)."""
    assert isinstance(call.request.body, bytes)
    return multipart_files(call.request.body)


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """One folder per class, a hidden file and a loose file among them."""
    folder = tmp_path / "pets"
    for name in ("cats/1.jpg", "cats/2.jpg", "dogs/1.jpg", "notes.txt", "cats/.DS_Store"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(f"bytes of {name}".encode())
    return folder


@responses.activate
def test_train_sends_the_folder_zipped_by_class_and_the_options(
    dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    responses.post(f"{URL}/v1/training", status=202, json=training(base="vgg16"))
    argv = ["train", str(dataset), "--name", "pets", "--base", "vgg16", "--epochs", "5"]
    argv += ["--validation-split", "0.25", "--augment", "--fine-tune-layers", "4"]
    assert main(["--url", URL, *argv]) == 0
    printed = capsys.readouterr()
    assert printed.out == f"{JOB_ID}\n"  # the id alone: no waiting without --wait
    assert "training pets on vgg16: 3 classes, 16 images (birds 5, cats 6, dogs 5)" in printed.err
    assert "  notes.txt: not inside a class folder" in printed.err
    [call] = responses.calls
    assert query(call) == {
        "name": "pets",
        "base": "vgg16",
        "epochs": "5",
        "validation_split": "0.25",
        "augment": "true",
        "fine_tune_layers": "4",
    }
    [(field, (filename, data))] = parts(call).items()
    assert (field, filename) == ("dataset", "pets.zip")
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.namelist() == ["notes.txt", "cats/1.jpg", "cats/2.jpg", "dogs/1.jpg"]
        assert archive.read("cats/2.jpg") == b"bytes of cats/2.jpg"


@responses.activate
def test_train_sends_an_archive_as_it_is_with_only_the_options_given(tmp_path: Path) -> None:
    archive = tmp_path / "pets.tar.gz"
    archive.write_bytes(b"\x1f\x8b not really a tarball" * 100)
    responses.post(f"{URL}/v1/training", status=202, json=training())
    assert Client(URL).train(archive, name="pets")["job_id"] == JOB_ID
    [call] = responses.calls
    assert query(call) == {"name": "pets", "base": "resnet50"}  # the fleet's defaults for the rest
    assert parts(call) == {"dataset": ("pets.tar.gz", archive.read_bytes())}


@responses.activate
def test_train_wait_follows_the_phases_and_prints_the_evaluation(
    dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    responses.post(f"{URL}/v1/training", status=202, json=training())
    states = [
        training(),
        training("running", "features", features_done=8),
        training("running", "training", features_done=15, features_failed=1, history=epochs(1)),
        training("running", "evaluating", features_done=15, features_failed=1, history=epochs(3)),
        training(
            "completed",
            "done",
            features_done=15,
            features_failed=1,
            history=epochs(3),
            skipped=[
                {"name": "notes.txt", "reason": "not inside a class folder"},
                {"name": "cats/9.jpg", "reason": "truncated"},
            ],
            evaluation=EVALUATION,
            served={"name": "pets", "version": "2", "serving": True},
        ),
    ]
    for state in states:
        responses.get(f"{URL}/v1/jobs/{JOB_ID}", json=state)  # answered in turn, one per poll
    assert main(["--url", URL, "train", str(dataset), "--name", "pets", "--wait", "--interval", "0"]) == 0
    printed = capsys.readouterr()
    assert [call.request.method for call in responses.calls] == ["POST"] + ["GET"] * len(states)
    assert "16/16" in printed.err  # the features bar ended with every image, the failed one included
    assert "3/3" in printed.err and "loss=0.3333, val_accuracy=0.7500" in printed.err  # the epochs bar
    assert "waiting for a training worker" in printed.err and "evaluating" in printed.err
    assert "skipped 1 file(s) while training:\n  cats/9.jpg: truncated" in printed.err
    lines = printed.out.splitlines()
    assert lines[0] == JOB_ID
    assert lines[1:] == [
        "accuracy 75.00% on 4 validation images",
        "class  precision   recall  support",
        "cats     100.00%   50.00%        2",
        "dogs      66.67%  100.00%        2",
        "birds          -        -        0",
        "confusion matrix (rows: true class, columns: predicted)",
        "       cats  dogs  birds",
        "cats      1     1      0",
        "dogs      0     2      0",
        "birds     0     0      0",
        "served: pets version 2 (python -m client predict PHOTO --model pets)",
    ]


@pytest.mark.parametrize(
    ("final", "ending"),
    [
        (
            training("failed", "failed", error="after unreadable images were skipped, a class has none left"),
            f"job {JOB_ID} failed: after unreadable images were skipped, a class has none left\n",
        ),
        (training("cancelled", "features", features_done=4), f"job {JOB_ID} cancelled\n"),
    ],
)
@responses.activate
def test_train_wait_exits_non_zero_when_the_job_does_not_complete(
    dataset: Path, capsys: pytest.CaptureFixture[str], final: dict[str, Any], ending: str
) -> None:
    responses.post(f"{URL}/v1/training", status=202, json=training())
    responses.get(f"{URL}/v1/jobs/{JOB_ID}", json=training("running", "features", features_done=4))
    responses.get(f"{URL}/v1/jobs/{JOB_ID}", json=final)
    argv = ["--url", URL, "train", str(dataset), "--name", "pets", "--wait", "--interval", "0", "--quiet"]
    assert main(argv) == 1
    printed = capsys.readouterr()
    assert printed.out == f"{JOB_ID}\n"  # no evaluation
    assert printed.err.endswith(ending) and "features" not in printed.err  # --quiet: no bars


@responses.activate
def test_ctrl_c_while_waiting_leaves_the_job_running(
    dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        raise KeyboardInterrupt

    responses.post(f"{URL}/v1/training", status=202, json=training())
    responses.get(f"{URL}/v1/jobs/{JOB_ID}", json=training("running", "features", features_done=4))
    responses.add_callback(responses.GET, f"{URL}/v1/jobs/{JOB_ID}", callback=interrupted)
    assert main(["--url", URL, "train", str(dataset), "--name", "pets", "--wait", "--interval", "0"]) == 130
    assert f"job {JOB_ID} carries on ({STOPPED} stops it)" in capsys.readouterr().err


@responses.activate
def test_a_refusal_prints_the_message_and_each_problem(
    dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    problems = [
        "class dogs: 1 readable image; at least 5 (TRAINING_MIN_IMAGES_PER_CLASS)",
        "skipped 1 file: notes.txt (not inside a class folder)",
    ]
    refusal = {"code": "invalid_dataset", "message": "dataset refused: " + "; ".join(problems)}
    responses.post(f"{URL}/v1/training", status=400, json={"error": {**refusal, "problems": problems}})
    assert main(["--url", URL, "train", str(dataset), "--name", "pets", "--wait"]) == 1
    assert capsys.readouterr().err == "".join(
        [f"error: {refusal['message']}\n", *(f"  - {problem}\n" for problem in problems)]
    )
    assert len(responses.calls) == 1  # nothing to wait for


def test_train_refuses_an_empty_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "cats").mkdir()
    assert main(["--url", URL, "train", str(tmp_path), "--name", "pets"]) == 1
    assert capsys.readouterr().err == f"error: no files under {tmp_path}\n"


@pytest.mark.parametrize(
    ("status", "answer", "code", "printed"),
    [
        (200, {"deleted": "pets"}, 0, ("deleted pets\n", "")),
        (404, {"error": {"code": "unknown_model", "message": "no custom model 'pets'"}}, 1, None),
        (400, {"error": {"code": "not_custom", "message": "pets is a model of the fleet"}}, 1, None),
    ],
)
@responses.activate
def test_models_delete(
    capsys: pytest.CaptureFixture[str],
    status: int,
    answer: dict[str, Any],
    code: int,
    printed: tuple[str, str] | None,
) -> None:
    call = responses.delete(f"{URL}/v1/models/pets", status=status, json=answer)
    assert main(["--url", URL, "models", "delete", "pets"]) == code
    assert call.call_count == 1
    expected = printed or ("", f"error: {answer['error']['message']}\n")
    assert tuple(capsys.readouterr()) == expected


@responses.activate
def test_models_alone_still_lists_the_models(capsys: pytest.CaptureFixture[str]) -> None:
    responses.get(f"{URL}/v1/models", json={"models": [{"name": "pets"}]})
    assert main(["--url", URL, "models"]) == 0
    assert '"name": "pets"' in capsys.readouterr().out
