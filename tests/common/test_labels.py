"""The shipped class index is Keras' file, and decoding matches ``decode_predictions``."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from keras.src.applications import imagenet_utils

from common import labels


@pytest.fixture
def keras_reads_the_shipped_index(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Keras' decode_predictions, made to read our copy (it would otherwise download it)."""
    requested: list[str] = []

    def get_file(fname: str, origin: str, cache_subdir: str, file_hash: str) -> str:
        requested.append(file_hash)
        return str(labels.IMAGENET_INDEX)

    monkeypatch.setattr(imagenet_utils, "CLASS_INDEX", None)
    monkeypatch.setattr(imagenet_utils.file_utils, "get_file", get_file)
    return requested


def test_shipped_index_is_byte_identical_to_keras_file(keras_reads_the_shipped_index: list[str]) -> None:
    imagenet_utils.decode_predictions(np.ones((1, 1000)) / 1000, top=1)
    [keras_hash] = keras_reads_the_shipped_index
    assert hashlib.md5(labels.IMAGENET_INDEX.read_bytes()).hexdigest() == keras_hash


def test_top_k_decodes_like_keras(keras_reads_the_shipped_index: list[str]) -> None:
    rng = np.random.default_rng(7)
    scores = rng.dirichlet(np.ones(1000), size=4).astype(np.float32)
    index = labels.load()
    for row, expected in zip(scores, imagenet_utils.decode_predictions(scores, top=5), strict=True):
        ours = index.top_k(row, 5)
        assert [(p.class_id, p.label) for p in ours] == [(e[0], e[1]) for e in expected]
        assert [p.score for p in ours] == pytest.approx([float(e[2]) for e in expected])


def test_label_layouts() -> None:
    assert labels.from_json(["cat", "dog"]).names == ("cat", "dog")
    assert labels.from_json({"0": ["n1", "cat"], "1": ["n2", "dog"]}).class_ids == ("n1", "n2")
    assert labels.from_json([["a", "cat"]]).digest != labels.from_json([["a", "dog"]]).digest
    with pytest.raises(ValueError):
        labels.from_json("cat")
    with pytest.raises(ValueError):
        labels.from_json([["a", "b", "c"]])


def test_tabby_is_where_keras_puts_it() -> None:
    index = labels.load()
    assert len(index) == 1000
    assert (index.class_ids[281], index.names[281]) == ("n02123045", "tabby")
    assert json.loads(labels.IMAGENET_INDEX.read_text())["281"] == ["n02123045", "tabby"]
