"""Model versions from a repository folder: served highest first, hot-swapped on demand."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from flask.testing import FlaskClient
from PIL import Image

from services import resnet50
from serving import app as service
from serving.app import ServiceSettings, create_app
from serving.runtime import Outputs, RuntimeInfo
from serving.weights import WeightsPlan
from tests.helpers import encode

IMAGE = encode(Image.new("RGB", (64, 64), (40, 90, 160)), "PNG")


class VersionRuntime:
    """Answers with a class that depends on the version folder it was built from."""

    loads: list[int] = []
    hold: Callable[[], object] = staticmethod(lambda: None)  # what a load waits for
    pixels_in = False

    def __init__(self, plan: WeightsPlan) -> None:
        self.version = int(Path(str(plan.path)).parent.name)

    def load(self) -> RuntimeInfo:
        VersionRuntime.loads.append(self.version)
        VersionRuntime.hold()
        if self.version == 99:
            raise ValueError("corrupt weights")
        return RuntimeInfo("fake", "file", "repo", f"hash-v{self.version}", 1000, 0.0)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        out = np.full((len(batch), 1000), 1e-4, np.float32)
        out[:, self.version] = 0.9
        return out

    def predict_features(self, batch: np.ndarray) -> Outputs:
        return Outputs(self.predict(batch))


def publish(root: Path, version: int) -> None:
    folder = root / "resnet50" / str(version)
    folder.mkdir(parents=True)
    (folder / "weights.h5").write_bytes(b"not read by the fake runtime")


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(service, "make_runtime", lambda spec, plan, *a, **k: VersionRuntime(plan))
    monkeypatch.setattr(VersionRuntime, "hold", staticmethod(lambda: None))
    publish(tmp_path, 1)
    return tmp_path


def client_for(repo: Path, token: str = "s3cret") -> FlaskClient:
    settings = ServiceSettings(model_repository=str(repo), admin_token=token, repository_poll_s=0)
    return create_app(resnet50.SPEC, settings, background_load=False).test_client()


def predict(client: FlaskClient) -> dict:
    return client.post("/v1/predict", data=IMAGE, content_type="image/png").get_json()


def test_the_highest_version_is_served_and_named_in_every_answer(repo: Path) -> None:
    publish(repo, 3)
    client = client_for(repo)
    answer = predict(client)
    assert (answer["version"], answer["weights_hash"], answer["predictions"][0]["index"]) == (
        "3",
        "hash-v3",
        3,
    )
    meta = client.get("/v1/model").get_json()
    assert meta["version"] == "3" and meta["versions"] == ["1", "3"]


def test_reload_swaps_to_a_new_version_behind_a_token(repo: Path) -> None:
    client = client_for(repo)
    assert predict(client)["version"] == "1"
    publish(repo, 2)
    assert predict(client)["version"] == "1"  # nothing changes until asked (or polled)
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        refused = client.post("/v1/admin/reload", headers=headers)
        assert refused.status_code == 401 and refused.get_json()["error"]["code"] == "unauthorized"
    done = client.post("/v1/admin/reload", headers={"Authorization": "Bearer s3cret"}).get_json()
    assert done == {"version": "2", "previous": "1", "changed": True, "weights_hash": "hash-v2"}
    answer = predict(client)
    assert (answer["version"], answer["predictions"][0]["index"]) == ("2", 2)
    again = client.post("/v1/admin/reload", headers={"Authorization": "Bearer s3cret"}).get_json()
    assert again["changed"] is False


def test_racing_reloads_load_a_version_once(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    client = client_for(repo)
    publish(repo, 2)
    VersionRuntime.loads.clear()
    auth = {"Authorization": "Bearer s3cret"}
    # The load waits until both reloads have asked the loader for version 2: the second one
    # arrives while the first is loading, every time.
    models, asked = client.application.extensions["models"], threading.Semaphore(0)
    queue = models._queue

    def counted(*args: object) -> object:
        asked.release()
        return queue(*args)

    monkeypatch.setattr(models, "_queue", counted)
    forced: list[bool] = []
    both = staticmethod(lambda: forced.append(all([asked.acquire(timeout=10) for _ in "ab"])))
    monkeypatch.setattr(VersionRuntime, "hold", both)
    with ThreadPoolExecutor(2) as pool:  # e.g. the poller and an operator at the same moment
        answers = list(pool.map(lambda _: client.post("/v1/admin/reload", headers=auth).get_json(), range(2)))
    assert sorted(a["changed"] for a in answers) == [False, True]
    assert [a["version"] for a in answers] == ["2", "2"]  # the one that lost the race says so too
    assert VersionRuntime.loads == [2] and forced == [True]


def test_a_version_that_fails_to_load_leaves_the_old_one_serving(repo: Path) -> None:
    client = client_for(repo)
    publish(repo, 99)
    failed = client.post("/v1/admin/reload", headers={"Authorization": "Bearer s3cret"})
    assert failed.status_code == 500 and failed.get_json()["error"]["code"] == "reload_failed"
    assert "still serving 1" in failed.get_json()["error"]["message"]
    assert predict(client)["version"] == "1"


def test_the_admin_endpoint_is_off_without_a_token(repo: Path) -> None:
    assert client_for(repo, token="").post("/v1/admin/reload").status_code == 404
