"""The model manager: one poller, one loader, one swap-and-drain for base versions and custom models."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from common import labels as labels_mod
from common import repository
from common.errors import ServiceError
from common.models import ModelSpec
from serving.batching import Batcher, BatcherClosed
from serving.loaded import LoadedModel
from serving.manager import ModelManager
from serving.runtime import Outputs, RuntimeInfo

SPEC = ModelSpec(name="resnet50", input_size=8, preprocessing="tf", labels_path=Path("unused"))
LABELS = labels_mod.from_json(["cat", "dog"])


class Versioned:
    """A two-class runtime whose answer says which version it is; ``gate`` holds a call until set."""

    def __init__(self, version: int | None, fails: bool = False) -> None:
        self.version = version or 0
        self.fails = fails
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()

    pixels_in = False

    def load(self) -> RuntimeInfo:
        if self.fails:
            raise ValueError("corrupt weights")
        return RuntimeInfo("fake", "file", "repo", f"hash-v{self.version}", 2, 0.0, features=3)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        self.started.set()
        assert self.gate.wait(10)
        return np.full((len(batch), 2), float(self.version), np.float32)

    def predict_features(self, batch: np.ndarray) -> Outputs:
        return Outputs(self.predict(batch), np.ones((len(batch), 3), np.float32))


def manager(
    versions: Path | None = None, custom: Path | None = None, failing: tuple[int, ...] = ()
) -> ModelManager:
    def batcher_for(predict: Callable[[np.ndarray], Outputs]) -> Batcher:
        return Batcher(predict, max_batch=1, window_ms=0, name="resnet50")

    def build(version: int | None) -> LoadedModel:
        runtime = Versioned(version, fails=version in failing)
        return LoadedModel(SPEC, runtime, LABELS, batcher_for, "" if version is None else str(version))

    return ModelManager("resnet50", build, versions_dir=str(versions or ""), custom_dir=str(custom or ""))


def publish_version(root: Path, version: int) -> None:
    (root / "resnet50" / str(version)).mkdir(parents=True)


def publish_head(root: Path, name: str = "pets", base: str = "resnet50", scale: float = 1.0) -> int:
    kernel = np.array([[1.0, -1.0], [0.0, 0.0], [0.5, 0.5]], np.float32) * scale
    meta = {"name": name, "base": base, "base_weights_hash": "abc", "features": 3, "classes": ["cat", "dog"]}
    return repository.publish(root, name, repository.write_head(kernel, np.zeros(2, np.float32)), meta)


def pixels() -> np.ndarray:
    return np.zeros((1, 8, 8, 3), np.uint8)


def loader_idle(models: ModelManager) -> None:
    """Everything queued on the loader before now is done (it runs one load at a time, in order)."""
    models._loader.submit(lambda: None).result(10)


def test_the_head_set_follows_the_repository(tmp_path: Path) -> None:
    served = manager(custom=tmp_path)
    served.start(background=False)
    assert not served.refresh() and served.all() == []
    publish_head(tmp_path)
    publish_head(tmp_path, "birds", base="vgg16")  # another base's service serves it
    assert served.refresh()
    assert [(h.name, h.version) for h in served.all()] == [("pets", 1)]
    publish_head(tmp_path, scale=3.0)
    assert served.refresh() and served.get("pets").version == 2  # type: ignore[union-attr]
    assert not served.refresh()  # nothing new: nothing reloaded
    (tmp_path / "pets" / "3").mkdir()  # a broken newest version: version 2 keeps serving
    (tmp_path / "pets" / "3" / repository.META_FILE).write_text("{not json")
    served.refresh()
    assert served.get("pets").version == 2  # type: ignore[union-attr]
    assert "version 3 does not load" in served.broken()["pets"]
    assert repository.remove(tmp_path, "pets") and not repository.remove(tmp_path, "pets")
    assert served.refresh() and served.get("pets") is None and served.broken() == {}


def test_a_new_base_version_is_swapped_in_and_the_old_one_drains_what_it_queued(tmp_path: Path) -> None:
    publish_version(tmp_path, 1)
    models = manager(versions=tmp_path)
    models.start(background=False)
    old = models.base
    old.runtime.gate.clear()  # type: ignore[attr-defined]
    running = old.batcher.submit(pixels())
    assert old.runtime.started.wait(5)  # type: ignore[attr-defined]
    queued = old.batcher.submit(pixels())  # found version 1 before the swap
    publish_version(tmp_path, 2)
    models.refresh()  # the poll's look: version 2 is loaded on the loader, then swapped in
    loader_idle(models)
    assert models.base.version == "2"
    old.runtime.gate.set()  # type: ignore[attr-defined]
    assert running.future.result(5).probabilities[0, 0] == 1.0  # what v1 had queued, v1 answers
    assert queued.future.result(5).probabilities[0, 0] == 1.0
    late = None
    try:
        late = old.batcher.submit(pixels())
    except BatcherClosed:  # the service sends this one to the successor
        pass
    assert late is None
    assert models.base.batcher.submit(pixels()).future.result(5).probabilities[0, 0] == 2.0
    assert models.base.version == "2" and models.versions() == [1, 2]


def test_a_base_version_that_does_not_load_is_not_tried_again_by_the_poll(tmp_path: Path) -> None:
    publish_version(tmp_path, 1)
    models = manager(versions=tmp_path, failing=(2,))
    models.start(background=False)
    publish_version(tmp_path, 2)
    models.refresh()
    loader_idle(models)
    assert models.base.version == "1" and models._failed["resnet50"][0] == 2
    tried = models._failed["resnet50"]
    models.refresh()  # the next look does not queue it again
    assert models._loading == {} and models._failed["resnet50"] == tried
    with pytest.raises(ServiceError) as refused:  # the admin endpoint tries again, and says why
        models.reload()
    assert refused.value.code == "reload_failed" and "still serving 1" in refused.value.message
    assert "corrupt weights" in refused.value.message and models.base.version == "1"
