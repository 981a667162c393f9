"""The prediction path's typed values and their one JSON form each: what a job's results file, the
response cache and every answer carry."""

from __future__ import annotations

import pytest

from common.errors import ImageTooLarge, ServiceError
from common.outcomes import (
    Failed,
    Label,
    Predicted,
    Prediction,
    Selection,
    Served,
    error_from_json,
    error_json,
    outcome_from_json,
)

TABBY = Label("tabby", 281, 0.75, "n02123045")
VOTED = Label("tabby", 281, 2 / 3, "n02123045", votes=2.0, mean_probability=0.6)


@pytest.mark.parametrize(
    "outcome",
    [
        Predicted(0, "cat.jpg", (TABBY,)),
        Predicted(3, "cat.jpg", (VOTED,), {"vgg16": (TABBY,), "resnet50": (TABBY,)}),
        Predicted(1, "custom.jpg", (Label("red", 0, 0.9),)),  # a custom model's classes have no ids
        Failed(2, "big.jpg", ImageTooLarge("over 10 MB")),
    ],
)
def test_every_outcome_survives_its_json(outcome: Predicted | Failed) -> None:
    again = outcome_from_json(outcome.to_json())
    assert again.to_json() == outcome.to_json()
    assert type(again) is type(outcome) and (again.index, again.name) == (outcome.index, outcome.name)


def test_the_json_is_the_documented_shape() -> None:
    assert Predicted(0, "a", (TABBY,)).to_json() == {
        "index": 0,
        "name": "a",
        "predictions": [{"label": "tabby", "class_id": "n02123045", "index": 281, "score": 0.75}],
    }
    assert Failed(1, "b", ImageTooLarge("too big")).to_json() == {
        "index": 1,
        "name": "b",
        "error": {"code": "image_too_large", "message": "too big", "status": 413},
    }
    assert VOTED.to_json()["votes"] == 2.0 and "votes" not in TABBY.to_json()


def test_an_error_read_back_keeps_its_code_message_and_status() -> None:
    error = error_from_json(error_json(ImageTooLarge("too big")))
    assert (error.code, error.message, error.status) == ("image_too_large", "too big", 413)
    assert error_from_json({"code": "x"}).status == 400  # an image's own fault unless it says


def test_served_reads_a_members_answer_and_keys_the_cache_by_hash_and_precision() -> None:
    served = Served.from_reply({"weights": "random", "weights_hash": "ab", "precision": "int8", "version": 3})
    assert (served.weights, served.version, served.answered_as) == ("random", "3", "ab/int8")
    assert Served.from_reply({"weights_hash": "ab"}).answered_as == "ab/fp32"
    assert Served.from_reply({}).answered_as is None  # unknown weights: never cached


def test_a_prediction_says_what_failed_and_its_first_error() -> None:
    selection = Selection("ensemble", ("vgg16", "resnet50"), "soft", {"vgg16": 1.0, "resnet50": 1.0})
    failed = Failed(1, "b", ServiceError("nope", code="x", status=422))
    prediction = Prediction(
        selection, (Predicted(0, "a", (TABBY,)), failed), {}, {"vgg16": ServiceError("down")}, {}
    )
    assert prediction.degraded and prediction.first_error() is failed.error
    assert Selection.from_json(selection.to_json()) == selection


def test_a_label_with_null_parents_reads_as_one_without() -> None:
    """A member that serialises the dataclass as it is (Flask's JSON provider does) sends nulls."""
    raw = {
        "label": "tabby",
        "index": 281,
        "score": 0.5,
        "class_id": "n02123045",
        "parents": None,
        "categories": None,
    }
    label = Label.from_json(raw)
    assert label.parents is None and label.categories is None
    assert "parents" not in label.to_json()
