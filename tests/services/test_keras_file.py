"""The .keras file service: its settings are KERAS_FILE_*, and the CUSTOM_* names they had are refused."""

from __future__ import annotations

import pytest

from services import keras_file


def test_the_old_custom_names_are_refused_naming_the_new_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUSTOM_LABELS", "/labels.json")
    with pytest.raises(ValueError, match="CUSTOM_LABELS is no longer read: use KERAS_FILE_LABELS"):
        keras_file.create_app()


def test_a_name_and_a_labels_file_are_required() -> None:
    with pytest.raises(ValueError, match="KERAS_FILE_NAME and KERAS_FILE_LABELS"):
        keras_file.spec_from_settings(keras_file.KerasFileSettings(labels="/labels.json"))
    spec = keras_file.spec_from_settings(keras_file.KerasFileSettings(name="shapes", labels="/labels.json"))
    assert (spec.name, spec.input_size, spec.preprocessing) == ("shapes", 224, "tf")
