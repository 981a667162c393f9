"""How the protocols name what answers: v1's query and v2's model name, into the core's Selection."""

from __future__ import annotations

import pytest

from common.errors import BadRequest, UnknownModel
from common.outcomes import Selection
from fleet.client import new_session
from fleet.registry import Registry
from gateway.selection import from_query, named, parse_member_weights
from tests.helpers import gateway_settings


@pytest.fixture
def registry() -> Registry:
    return Registry(gateway_settings().replicas, new_session(2))


def test_one_model_an_ensemble_and_a_list_of_members(registry: Registry) -> None:
    settings = gateway_settings()
    assert from_query({"model": "vgg16"}, settings, registry) == Selection("vgg16", ("vgg16",))
    ensemble = from_query({"model": "ensemble"}, settings, registry)
    assert ensemble.members == settings.ensemble_members and ensemble.vote == "soft"
    chosen = from_query({"models": "resnet50, vgg16,resnet50", "vote": "hard"}, settings, registry)
    assert chosen == Selection("ensemble", ("resnet50", "vgg16"), "hard", {"resnet50": 1.0, "vgg16": 1.0})
    assert named("ensemble", "weighted", settings, registry).vote == "weighted"


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ({}, BadRequest),
        ({"model": "alexnet"}, UnknownModel),
        ({"models": "vgg16,alexnet"}, UnknownModel),
        ({"model": "ensemble", "vote": "loudest"}, BadRequest),
        ({"model": "ensemble", "member_weights": "vgg16:2"}, BadRequest),  # soft ignores weights
    ],
)
def test_what_cannot_be_selected_is_refused_before_the_body_is_read(
    registry: Registry, args: dict[str, str], error: type[Exception]
) -> None:
    with pytest.raises(error):
        from_query(args, gateway_settings(), registry)


def test_a_selection_survives_its_json_as_a_job_record_stores_it(registry: Registry) -> None:
    chosen = from_query(
        {"models": "resnet50,vgg16", "vote": "weighted", "member_weights": "vgg16:3"},
        gateway_settings(),
        registry,
    )
    assert Selection.from_json(chosen.to_json()) == chosen
    with pytest.raises(ValueError):
        Selection.from_json({"model": "vgg16"})  # a raw query, as records of an older gateway held


def test_member_weights_parsing() -> None:
    members = ["vgg16", "resnet50", "inceptionv3"]
    assert parse_member_weights("resnet50:2, vgg16:0.5", members) == {
        "vgg16": 0.5,
        "resnet50": 2.0,
        "inceptionv3": 1.0,
    }
    for bad in (
        "resnet50",
        "alexnet:1",
        "resnet50:x",
        "resnet50:-1",
        "resnet50:nan",
        "vgg16:0,resnet50:0,inceptionv3:0",
    ):
        with pytest.raises(BadRequest):
            parse_member_weights(bad, members)
