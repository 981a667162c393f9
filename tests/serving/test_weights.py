"""WEIGHTS=imagenet|random|auto|path: resolution, honest labelling, and loading a cached file."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.errors import WeightsUnavailable
from common.models import KERAS_WEIGHTS_BASE, ModelSpec
from services import inceptionv3, resnet50, vgg16
from serving import weights
from serving.weights import WeightsPlan, resolve
from tests.http_fixtures import silent_host


def cache_with(tmp_path: Path, *specs: ModelSpec) -> str:
    (tmp_path / "models").mkdir()
    for spec in specs:
        (tmp_path / "models" / str(spec.imagenet_file)).write_bytes(b"stand-in")
    return str(tmp_path)


def test_imagenet_missing_fails_with_an_actionable_message(tmp_path: Path) -> None:
    with pytest.raises(WeightsUnavailable) as info:
        resolve(vgg16.SPEC, "imagenet", keras_home=str(tmp_path))
    message = info.value.message
    expected = tmp_path / "models" / "vgg16_weights_tf_dim_ordering_tf_kernels.h5"
    assert str(expected) in message and "make weights" in message and "WEIGHTS=auto" in message
    assert "storage.googleapis.com/tensorflow/keras-applications/vgg16/" in message


def test_imagenet_missing_is_downloaded_by_keras_with_its_hash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import keras

    calls = []

    def get_file(fname: str, origin: str, cache_dir: str, cache_subdir: str, file_hash: str) -> str:
        calls.append((fname, origin, file_hash))  # stands in for the network: nothing is fetched
        target = Path(cache_dir) / cache_subdir / fname
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"weights")
        return str(target)

    monkeypatch.setattr(keras.utils, "get_file", get_file)
    monkeypatch.setattr(weights, "reachable", lambda url, timeout_s: None)
    plan = resolve(resnet50.SPEC, "imagenet", keras_home=str(tmp_path), allow_download=True)
    assert plan == WeightsPlan(
        "imagenet", tmp_path / "models" / "resnet50_weights_tf_dim_ordering_tf_kernels.h5"
    )
    assert calls == [
        (
            "resnet50_weights_tf_dim_ordering_tf_kernels.h5.part",  # renamed once its hash is checked
            resnet50.SPEC.imagenet_url,
            "2cb95161c43110f7111970584f804107",
        )
    ]


def test_failed_download_fails_start_up_with_the_instructions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import keras

    def offline(*args: object, **kwargs: object) -> str:
        raise Exception("URL fetch failure: [Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    monkeypatch.setattr(weights, "reachable", lambda url, timeout_s: None)
    with pytest.raises(WeightsUnavailable) as info:
        resolve(vgg16.SPEC, "imagenet", keras_home=str(tmp_path), allow_download=True)
    assert "Download failed" in info.value.message and "make weights" in info.value.message


@pytest.mark.parametrize("mode", ["imagenet", "auto"])
def test_cached_imagenet_file_is_used(tmp_path: Path, mode: str) -> None:
    home = cache_with(tmp_path, inceptionv3.SPEC)
    plan = resolve(inceptionv3.SPEC, mode, keras_home=home)
    assert plan.kind == "imagenet" and plan.path == Path(home) / "models" / str(
        inceptionv3.SPEC.imagenet_file
    )


def test_auto_without_weights_falls_back_to_random_loudly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        plan = resolve(resnet50.SPEC, "auto", seed=3, keras_home=str(tmp_path), allow_download=False)
    assert plan == WeightsPlan("random", seed=3)
    assert "SEEDED RANDOM WEIGHTS" in caplog.text


def test_random_and_paths(tmp_path: Path) -> None:
    assert resolve(vgg16.SPEC, "random", seed=9) == WeightsPlan("random", seed=9)
    model_file = tmp_path / "m.keras"
    model_file.write_bytes(b"x")
    assert resolve(vgg16.SPEC, str(model_file)) == WeightsPlan("file", model_file)
    with pytest.raises(WeightsUnavailable, match="not found"):
        resolve(vgg16.SPEC, str(tmp_path / "missing.h5"))


def test_custom_models_need_a_model_file() -> None:
    custom = ModelSpec(name="shapes", input_size=64, preprocessing="tf")
    with pytest.raises(WeightsUnavailable, match="custom model"):
        resolve(custom, "auto")


@pytest.mark.slow
def test_service_serves_an_imagenet_file_from_the_keras_cache(tmp_path: Path) -> None:
    """A file in Keras' ImageNet layout, found in $KERAS_HOME/models, is loaded and labelled imagenet."""
    import h5py
    import keras
    import numpy as np
    from keras.src.legacy.saving import legacy_h5_format

    from serving.app import ServiceSettings, create_app
    from serving.runtime import weights_digest
    from tests.helpers import photo

    keras.utils.set_random_seed(42)
    source = keras.applications.ResNet50(weights=None)
    (tmp_path / "models").mkdir()
    with h5py.File(tmp_path / "models" / str(resnet50.SPEC.imagenet_file), "w") as handle:
        legacy_h5_format.save_weights_to_hdf5_group(handle, source)

    settings = ServiceSettings(
        weights="auto", keras_home=str(tmp_path), model_cache=str(tmp_path / "converted")
    )
    client = create_app(resnet50.SPEC, settings, background_load=False).test_client()
    meta = client.get("/v1/model").get_json()
    assert meta["weights"] == "imagenet" and meta["weights_source"].endswith(str(resnet50.SPEC.imagenet_file))
    assert meta["weights_hash"] == weights_digest(source.get_weights())
    body = client.post("/v1/predict", data=photo(), content_type="image/jpeg").get_json()
    assert body["weights"] == "imagenet" and body["weights_hash"] == meta["weights_hash"]
    assert np.isfinite([p["score"] for p in body["predictions"]]).all()


WEIGHTS_FILE = b"stand-in weights " * 1000
TINY = ModelSpec(
    name="tiny",
    input_size=32,
    preprocessing="tf",
    builder="ResNet50",
    imagenet_file="tiny_weights.h5",
    imagenet_url=KERAS_WEIGHTS_BASE + "tiny/tiny_weights.h5",
    imagenet_md5=hashlib.md5(WEIGHTS_FILE).hexdigest(),
)


@contextlib.contextmanager
def weights_server(body: bytes) -> Iterator[tuple[str, list[str]]]:
    """A local HTTP server standing in for Keras' download address: ``body`` at every path."""
    asked: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the standard library's name
            asked.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/mirror/", asked
    finally:
        server.shutdown()
        server.server_close()


def test_auto_downloads_a_missing_file_hash_checked_from_the_base_url(tmp_path: Path) -> None:
    with weights_server(WEIGHTS_FILE) as (base, asked):
        plan = resolve(TINY, "auto", keras_home=str(tmp_path), allow_download=True, base_url=base)
    target = tmp_path / "models" / "tiny_weights.h5"
    assert plan == WeightsPlan("imagenet", target) and target.read_bytes() == WEIGHTS_FILE
    assert asked == ["/mirror/tiny/tiny_weights.h5"]  # Keras' path under the mirror
    assert sorted(p.name for p in target.parent.iterdir()) == ["tiny_weights.h5"]  # no .part left
    assert (
        resolve(
            TINY, "auto", keras_home=str(tmp_path), allow_download=True, base_url="http://unused.invalid/"
        )
        == plan
    )


def test_a_file_that_fails_its_hash_is_never_kept_and_auto_serves_random(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with weights_server(b"corrupted" * 100) as (base, _), caplog.at_level(logging.WARNING):
        plan = resolve(TINY, "auto", seed=5, keras_home=str(tmp_path), allow_download=True, base_url=base)
    assert plan == WeightsPlan("random", seed=5)
    assert list((tmp_path / "models").iterdir()) == []
    assert "could not be downloaded" in caplog.text and "SEEDED RANDOM WEIGHTS" in caplog.text
    with (
        weights_server(b"corrupted") as (base, _),
        pytest.raises(WeightsUnavailable, match="Download failed"),
    ):
        resolve(TINY, "imagenet", keras_home=str(tmp_path), allow_download=True, base_url=base)


def test_offline_auto_gives_up_within_its_time_out_on_a_host_that_never_answers(tmp_path: Path) -> None:
    """A host that accepts connections and never answers, and a port that refuses them."""
    refused = socket.socket()
    refused.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
    try:
        with silent_host() as (silent, _):
            for base_url in (f"{silent}/", f"http://127.0.0.1:{refused.getsockname()[1]}/"):
                started = time.monotonic()
                plan = resolve(
                    TINY,
                    "auto",
                    keras_home=str(tmp_path),
                    allow_download=True,
                    base_url=base_url,
                    timeout_s=0.5,
                )
                assert plan.kind == "random"
                assert time.monotonic() - started < 5  # the setting bounds it; nothing waits on the network
    finally:
        refused.close()
    assert not any((tmp_path / "models").glob("*"))
