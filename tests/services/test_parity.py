"""Each service answers exactly what the Keras reference path answers for the same weights.

Reference: the Keras application built independently with the same seed, fed by Keras'
own ``preprocess_input`` and called through ``model.predict`` - the path the Keras docs show.
"""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from common import imaging
from services import inceptionv3, resnet50, vgg16
from serving.app import ServiceSettings, create_app
from serving.runtime import weights_digest
from tests.helpers import PHOTOS, photo
from tests.serving.fakes import KERAS_MODULES

SEED = 1234
MAX_ABS_DIFF = 1e-5
RTOL, ATOL = 1e-4, 1e-8  # tight enough to tell the preprocessing modes apart (see the control)

pytestmark = pytest.mark.slow


def probabilities(body: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(body["probabilities"]["data"]), "<f4")


@pytest.fixture(scope="session")
def converted_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("converted"))


@pytest.mark.parametrize("backend", ["keras", "openvino"])
@pytest.mark.parametrize("spec", [vgg16.SPEC, resnet50.SPEC, inceptionv3.SPEC], ids=lambda s: s.name)
def test_service_probabilities_equal_keras_reference(spec, backend: str, converted_cache: str) -> None:
    settings = ServiceSettings(
        weights="random", weights_seed=SEED, backend=backend, model_cache=converted_cache, precision="fp32"
    )
    app = create_app(spec, settings, background_load=False)
    assert app.extensions["models"].base.info.backend.startswith(backend)
    client = app.test_client()
    keras.utils.set_random_seed(SEED)
    reference_model = getattr(keras.applications, spec.builder)(weights=None)
    assert app.extensions["models"].base.info.weights_hash == weights_digest(reference_model.get_weights())

    module = KERAS_MODULES[spec.name]
    wrong_mode = "tf" if spec.preprocessing == "caffe" else "caffe"
    for name in PHOTOS:
        response = client.post(
            "/v1/predict?probabilities=true&top_k=5", data=photo(name), content_type="image/jpeg"
        )
        body = response.get_json()
        assert response.status_code == 200, body
        ours = probabilities(body)
        pixels = imaging.load_pixels(photo(name), spec.input_size, imaging.ImageLimits())[None]
        reference = reference_model.predict(module.preprocess_input(pixels.copy()), verbose=0)[0]

        assert np.abs(ours - reference).max() <= MAX_ABS_DIFF
        np.testing.assert_allclose(ours, reference, rtol=RTOL, atol=ATOL)
        assert [p["index"] for p in body["predictions"]] == list(np.argsort(-reference, kind="stable")[:5])

        # Control: the same comparison notices a wrong preprocessing mode, so it can fail.
        wrong = reference_model.predict(
            keras.applications.imagenet_utils.preprocess_input(pixels.copy(), mode=wrong_mode), verbose=0
        )[0]
        assert not np.allclose(ours, wrong, rtol=RTOL, atol=ATOL)


def test_random_weights_are_identical_across_restarts() -> None:
    """Same seed, same numbers, in a fresh process (what a restarted service does)."""
    code = (
        "from serving.runtime import build_keras_model, weights_digest\n"
        "from serving.weights import WeightsPlan\nfrom services import resnet50\n"
        f"m = build_keras_model(resnet50.SPEC, WeightsPlan('random', seed={SEED}))\n"
        "print(weights_digest(m.get_weights()))\n"
    )
    digests = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        .stdout.strip()
        .splitlines()[-1]
        for _ in range(2)
    }
    keras.utils.set_random_seed(SEED)
    in_process = weights_digest(keras.applications.ResNet50(weights=None).get_weights())
    assert digests == {in_process}
    keras.utils.set_random_seed(SEED + 1)
    assert weights_digest(keras.applications.ResNet50(weights=None).get_weights()) != in_process


def test_reduced_scale_decoding_keeps_the_top1(converted_cache: str) -> None:
    """12 MP versions of the fixtures: DCT-scaled decoding answers like a full decode."""
    import io

    from PIL import Image

    from serving.backends import OpenVINORuntime
    from serving.weights import WeightsPlan

    runtime = OpenVINORuntime(
        resnet50.SPEC, WeightsPlan("random", seed=SEED), cache_dir=Path(converted_cache)
    )
    runtime.load()
    limits = imaging.ImageLimits(max_bytes=50_000_000)
    preprocess = KERAS_MODULES["resnet50"].preprocess_input
    for name in PHOTOS:
        source = Image.open(io.BytesIO(photo(name)))
        large = source.resize((4000, round(4000 * source.height / source.width)), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        large.save(buffer, "JPEG", quality=90)
        data = buffer.getvalue()
        fast = imaging.load_pixels(data, 224, limits)
        full = imaging.fit(imaging.decode(data, limits), 224)
        answers = runtime.predict(preprocess(np.stack([fast, full]).astype(np.float32)))
        assert answers[0].argmax() == answers[1].argmax(), name
