"""WEIGHTS=imagenet|random|auto|path: resolution, honest labelling, and loading a cached file."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from common.errors import WeightsUnavailable
from common.models import ModelSpec
from services import inceptionv3, resnet50, vgg16
from serving.weights import WeightsPlan, resolve


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
    plan = resolve(resnet50.SPEC, "imagenet", keras_home=str(tmp_path), allow_download=True)
    assert plan == WeightsPlan(
        "imagenet", tmp_path / "models" / "resnet50_weights_tf_dim_ordering_tf_kernels.h5"
    )
    assert calls == [
        (
            "resnet50_weights_tf_dim_ordering_tf_kernels.h5",
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
        plan = resolve(resnet50.SPEC, "auto", seed=3, keras_home=str(tmp_path))
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
