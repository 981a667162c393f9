"""Custom models: the head repository (publish, load, remove), dataset
checks, and training a head (split, fit, fold, evaluate) - on real files and real Keras."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from common import imaging, repository
from common.training import dataset
from common.training.dataset import Entry
from serving import custom
from tests import colours
from workers.training import fit


def meta(name: str = "pets", base: str = "resnet50", classes: tuple[str, ...] = ("cat", "dog")) -> dict:
    return {"name": name, "base": base, "base_weights_hash": "abc", "features": 3, "classes": list(classes)}


def publish(root: Path, name: str = "pets", base: str = "resnet50", scale: float = 1.0) -> int:
    kernel = np.array([[1.0, -1.0], [0.0, 0.0], [0.5, 0.5]], np.float32) * scale
    return repository.publish(
        root, name, repository.write_head(kernel, np.zeros(2, np.float32)), meta(name, base)
    )


# --- the repository ------------------------------------------------------------------------------


def test_versions_are_published_whole_and_numbered_in_turn(tmp_path: Path) -> None:
    assert publish(tmp_path) == 1
    assert publish(tmp_path, scale=2.0) == 2
    assert sorted(p.name for p in (tmp_path / "pets").iterdir()) == ["1", "2"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left
    head = custom.load(tmp_path / "pets" / "2", "pets", 2)
    probabilities = head.apply(np.array([[1.0, 0.0, 0.0], [-1.0, 5.0, 0.0]], np.float32))
    expected = np.exp([2.0, -2.0]) / np.exp([2.0, -2.0]).sum()
    assert np.allclose(probabilities[0], expected) and np.allclose(probabilities.sum(axis=1), 1)
    assert head.describe()["class_names"] == ["cat", "dog"] and head.describe()["version"] == "2"
    assert head.weights_hash != custom.load(tmp_path / "pets" / "1", "pets", 1).weights_hash


def test_pruning_keeps_the_newest_versions_only(tmp_path: Path) -> None:
    for _ in range(4):
        publish(tmp_path)
    assert repository.prune(tmp_path, "pets", 2) == [1, 2]
    assert sorted(p.name for p in (tmp_path / "pets").iterdir()) == ["3", "4"]
    assert repository.prune(tmp_path, "pets", 2) == [] and not [
        p for p in tmp_path.iterdir() if p.name.startswith(".")
    ]
    assert publish(tmp_path) == 5  # numbering goes on


def test_a_version_that_does_not_fit_its_metadata_is_refused(tmp_path: Path) -> None:
    publish(tmp_path)
    folder = tmp_path / "pets" / "1"
    (folder / repository.META_FILE).write_text(json.dumps({**meta(), "features": 4}))
    with pytest.raises(ValueError, match="do not fit"):
        custom.load(folder, "pets", 1)


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("pets", None),
        ("a", None),
        ("my-model_2", None),
        ("Pets", "name must"),
        ("-x", "name must"),
        ("", "name must"),
        ("a" * 65, "name must"),
        ("resnet50", "reserved"),
        ("ensemble", "reserved"),
        ("../etc", "name must"),
    ],
)
def test_names(name: str, problem: str | None) -> None:
    reason = repository.check_name(name)
    assert (reason is None) if problem is None else (problem in (reason or "")), reason


def test_staging_left_by_a_killed_publisher_is_swept(tmp_path: Path) -> None:
    (tmp_path / ".publishing-x").mkdir()
    publish(tmp_path)
    repository.sweep_staging(tmp_path, older_than_s=-1)
    assert [p.name for p in tmp_path.iterdir()] == ["pets"]


# --- datasets -----------------------------------------------------------------------------------


def entries(root: Path, files: dict[str, bytes]) -> list[Entry]:
    found = []
    for name, data in files.items():
        path = root / f"{len(found):04d}"
        path.write_bytes(data)
        found.append(Entry(name, path))
    return found


def check(root: Path, files: dict[str, bytes], **limits: int) -> dataset.Dataset:
    return dataset.check(
        entries(root, files),
        root,
        imaging.ImageLimits(),
        min_images_per_class=limits.get("min_images_per_class", 3),
        max_classes=limits.get("max_classes", 10),
        max_images=limits.get("max_images", 100),
    )


def test_a_dataset_is_its_class_folders_under_one_shared_root(tmp_path: Path) -> None:
    files = {
        f"photos/{label}/{n}.jpg": image
        for n, (label, image) in enumerate(colours.images(3, 1, ("red", "blue")))
    }
    files["photos/red/notes.txt"] = b"not an image"
    files["photos/loose.jpg"] = colours.images(1, 2)[0][1]
    found = check(tmp_path, files)
    assert found.classes == ["blue", "red"] and found.counts() == {"blue": 3, "red": 3}
    assert {s["name"] for s in found.skipped} == {"photos/red/notes.txt", "photos/loose.jpg"}
    found.write(tmp_path)
    assert dataset.Dataset.read(tmp_path).items == found.items


def test_a_dataset_refusal_names_every_problem(tmp_path: Path) -> None:
    files = {f"red/{n}.jpg": image for n, (_, image) in enumerate(colours.images(2, 1, ("red",)))}
    with pytest.raises(dataset.InvalidDataset) as refused:
        check(tmp_path, files)
    problems = refused.value.problems
    assert any("at least 2 class folders" in p for p in problems)
    assert any("'red' has 2 readable images" in p for p in problems)
    assert refused.value.to_dict()["problems"] == problems and refused.value.status == 400


def test_class_and_image_limits(tmp_path: Path) -> None:
    files = {f"c{k}/{n}.jpg": colours.images(1, k)[0][1] for k in range(4) for n in range(3)}
    with pytest.raises(dataset.InvalidDataset, match="TRAINING_MAX_CLASSES"):
        check(tmp_path, files, max_classes=3)
    with pytest.raises(dataset.InvalidDataset, match="TRAINING_MAX_IMAGES"):
        check(tmp_path, files, max_images=5)


# --- training -----------------------------------------------------------------------------------


def test_the_split_holds_out_each_class_alike_and_never_all_of_it() -> None:
    labels = np.array([0] * 10 + [1] * 5 + [2] * 2)
    kept, held = fit.split(labels, 0.2)
    assert sorted([*kept, *held]) == list(range(17))
    assert [int((labels[held] == c).sum()) for c in range(3)] == [2, 1, 1]
    assert fit.split(labels, 0.0)[1].size == 0


def test_a_fitted_head_on_raw_features_separates_what_it_should() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (3, 16)) * 40 + 500  # raw features of any scale and offset
    y = rng.integers(0, 3, 300)
    x = (centres[y] + rng.normal(0, 20, (300, 16))).astype(np.float32)
    seen = []
    fitted = fit.fit(x[:240], y[:240], 3, 30, (x[240:], y[240:]), lambda e, f: seen.append(e) or True)
    assert seen == list(range(1, 31)) and len(fitted.history) == 30 and "val_accuracy" in fitted.history[-1]
    report = fit.evaluate(fitted.probabilities(x[240:]), y[240:], ["a", "b", "c"])
    assert report["accuracy"] >= 0.95, report
    matrix = np.array(report["confusion_matrix"]["matrix"])
    assert matrix.sum() == 60 and np.trace(matrix) == round(report["accuracy"] * 60)
    assert set(report["per_class"]) == {"a", "b", "c"}


def test_stopping_from_the_epoch_callback_ends_training() -> None:
    x = np.random.default_rng(1).normal(size=(20, 4)).astype(np.float32)
    fitted = fit.fit(x, np.arange(20) % 2, 2, 50, None, lambda epoch, _: epoch < 3)
    assert len(fitted.history) == 3


def test_augmented_views_differ_and_stay_images() -> None:
    rng = np.random.default_rng(0)
    original = colours.images(1, 3)[0][1]
    views = {fit.augmented(original, rng) for _ in range(4)}
    assert len(views) == 4
    for view in views:
        assert imaging.probe(view, imaging.ImageLimits()).width > 0
    from PIL import Image

    assert Image.open(io.BytesIO(next(iter(views)))).mode == "RGB"
