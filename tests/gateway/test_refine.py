"""Answers people can use, through the gateway: parents, filters, the hedged answer (v1)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from flask.testing import FlaskClient

from common import hierarchy
from common.labels import Labels
from common.outcomes import Label, Predicted, outcome_from_json
from fleet.refine import Refinement, refine
from tests.gateway.fakes import FakeModelClient, fake_vector
from tests.helpers import assert_error, photo

CAT = photo("chelsea.jpg")
GRAPH = hierarchy.imagenet()


def post(gateway: FlaskClient, query: str, data: bytes = CAT) -> dict:
    response = gateway.post(f"/v1/predict?{query}", data=data, content_type="image/jpeg")
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()


def node_sum(synset: str, p: np.ndarray) -> float:
    return float(p.astype(np.float64)[GRAPH.under[GRAPH.position[synset]]].sum())


def test_the_default_answer_is_the_flat_top_k_as_before(gateway: FlaskClient, fake: FakeModelClient) -> None:
    body = post(gateway, "model=resnet50")
    assert "hedged" not in body and all("parents" not in p for p in body["predictions"])
    assert fake.calls[-1] == ("resnet50", 1, False)  # no vector asked of the member


def test_parents_nearest_first_with_their_probabilities_and_categories(
    gateway: FlaskClient, fake: FakeModelClient
) -> None:
    body = post(gateway, "model=resnet50&parents=true")
    p = fake_vector("resnet50", CAT)
    assert fake.calls[-1] == ("resnet50", 1, True)
    for prediction in body["predictions"]:
        parents = prediction["parents"]
        assert [n["class_id"] for n in parents] == [n.class_id for n in GRAPH.ancestors(prediction["index"])]
        assert parents[-1]["name"] == "entity" and parents[-1]["score"] == pytest.approx(1.0, abs=1e-5)
        for node in parents:
            assert node["score"] == pytest.approx(node_sum(node["class_id"], p), abs=1e-6)
        assert prediction["categories"] == list(GRAPH.categories(prediction["index"]))


@pytest.mark.parametrize("confidence", [0.2, 0.6, 0.9])
def test_the_hedged_answer_meets_the_confidence_beside_the_flat_top_k(
    gateway: FlaskClient, confidence: float
) -> None:
    body = post(gateway, f"model=resnet50&confidence={confidence}")
    p = fake_vector("resnet50", CAT)
    hedged = body["hedged"]
    assert hedged["score"] >= confidence and hedged["confidence"] == confidence
    assert hedged["score"] == pytest.approx(node_sum(hedged["class_id"], p), abs=1e-6)
    assert hedged == {**GRAPH.hedge(p, confidence).to_json()}
    assert len(body["predictions"]) == 5


def test_a_soft_ensemble_hedges_on_its_merged_distribution(gateway: FlaskClient) -> None:
    body = post(gateway, "model=ensemble&confidence=0.5&parents=true")
    merged = np.mean(
        [fake_vector(m, CAT).astype(np.float64) for m in ("vgg16", "resnet50", "inceptionv3")], axis=0
    )
    assert body["hedged"]["score"] == pytest.approx(node_sum(body["hedged"]["class_id"], merged), abs=1e-6)
    for node in body["predictions"][0]["parents"]:
        assert node["score"] == pytest.approx(node_sum(node["class_id"], merged), abs=1e-6)
    assert body["predictions"][0]["index"] == int(merged.argmax())


def test_include_and_exclude_by_ancestor_category_or_class_and_min_score(gateway: FlaskClient) -> None:
    p = fake_vector("resnet50", CAT)
    animals = post(gateway, "model=resnet50&include=animal&top_k=10")["predictions"]
    expected = [i for i in np.argsort(-p, kind="stable") if GRAPH.allowed(["n00015388"], [])[i]][:10]
    assert [a["index"] for a in animals] == expected
    no_dogs = post(gateway, "model=resnet50&include=n00015388&exclude=n02084071&top_k=20")["predictions"]
    assert not any(GRAPH.allowed(["n02084071"], [])[a["index"]] for a in no_dogs)
    named = post(gateway, "model=resnet50&include=tabby,tiger_cat")["predictions"]
    assert {a["class_id"] for a in named} == {"n02123045", "n02123159"}
    floor = float(np.sort(p)[-3])
    kept = post(gateway, f"model=resnet50&min_score={floor}&top_k=10")["predictions"]
    assert len(kept) == 3 and all(a["score"] >= floor for a in kept)


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ("confidence=0", "bad_request"),
        ("confidence=1.5", "bad_request"),
        ("confidence=nan", "bad_request"),
        ("confidence=abc", "bad_request"),
        ("min_score=-0.1", "bad_request"),
        ("include=n99999999", "unknown_class"),
        ("exclude=unicorn", "unknown_class"),
        ("include=" + ",".join(["animal"] * 33), "bad_request"),
        ("include=" + "x" * 101, "bad_request"),
        ("include=%3Cscript%3E", "bad_request"),
    ],
)
def test_bad_refinements_are_400s_naming_the_parameter(gateway: FlaskClient, query: str, code: str) -> None:
    response = gateway.post(f"/v1/predict?model=resnet50&{query}", data=CAT, content_type="image/jpeg")
    assert_error(response, 400, code)
    assert query.split("=")[0] in response.get_json()["error"]["message"]


def test_a_hard_vote_takes_parents_but_not_filters_or_hedging(
    gateway: FlaskClient, fake: FakeModelClient
) -> None:
    calls = len(fake.calls)
    response = gateway.post(
        "/v1/predict?model=ensemble&vote=hard&confidence=0.5", data=CAT, content_type="image/jpeg"
    )
    assert_error(response, 400, "bad_request")
    assert len(fake.calls) == calls  # refused before any member was called
    body = post(gateway, "model=ensemble&vote=hard&parents=true")
    assert all("votes" in p and p["parents"][-1]["name"] == "entity" for p in body["predictions"])


def test_a_batch_refines_each_image(gateway: FlaskClient) -> None:
    coffee = photo("coffee.jpg")
    response = gateway.post(
        "/v1/predict?model=resnet50&confidence=0.5",
        data={"files": [(io.BytesIO(CAT), "a.jpg"), (io.BytesIO(coffee), "b.jpg")]},
    )
    results = response.get_json()["results"]
    for result, data in zip(results, (CAT, coffee), strict=True):
        assert result["hedged"] == GRAPH.hedge(fake_vector("resnet50", data), 0.5).to_json()


def test_a_custom_models_flat_classes_filter_by_id_or_name_and_say_why_there_are_no_parents() -> None:
    labels = Labels(("a", "b", "c"), ("apple", "banana", "cherry"))
    p = np.array([0.5, 0.3, 0.2], np.float32)
    plain = Predicted(0, "x", tuple(labels.top_k(p, 3)))
    refined = refine(
        plain, p, labels, Refinement(parents=True, confidence=0.5, exclude=("apple",)), 3, model="fruit"
    )
    assert [label.label for label in refined.labels] == ["banana", "cherry"]
    assert refined.hedged is None and "fruit has flat classes" in (refined.flat or "")
    assert all(label.parents is None for label in refined.labels)
    assert refined.to_json()["hierarchy"] == refined.flat
    with pytest.raises(Exception, match="none of this model's classes"):
        refine(plain, p, labels, Refinement(include=("n00015388",)), 3)


def test_refined_outcomes_survive_their_json() -> None:
    p = fake_vector("resnet50", CAT)
    plain = Predicted(0, "x", tuple(GRAPH.labels.top_k(p, 2)))
    refined = refine(plain, p, GRAPH.labels, Refinement(parents=True, confidence=0.3), 2)
    assert outcome_from_json(refined.to_json()).to_json() == refined.to_json()
    assert isinstance(refined.labels[0], Label) and refined.labels[0].parents


def v2(gateway: FlaskClient, model: str, parameters: dict, *images: bytes):  # type: ignore[no-untyped-def]
    data = [base64.b64encode(image).decode() for image in images]
    tensor = {"name": "image", "datatype": "BYTES", "shape": [len(data)], "data": data}
    return gateway.post(f"/v2/models/{model}/infer", json={"inputs": [tensor], "parameters": parameters})


def test_v2_takes_the_same_refinements_as_parameters(gateway: FlaskClient) -> None:
    coffee = photo("coffee.jpg")
    parameters = {"top_k": 3, "parents": True, "confidence": 0.5, "include": "animal,food"}
    body = v2(gateway, "resnet50", parameters, CAT, coffee).get_json()
    v1 = [
        post(gateway, "model=resnet50&top_k=3&parents=true&confidence=0.5&include=animal,food", data)
        for data in (CAT, coffee)
    ]
    assert body["parameters"]["hedged"] == [answer["hedged"] for answer in v1]
    assert body["parameters"]["parents"] == [[p["parents"] for p in answer["predictions"]] for answer in v1]
    labels = next(o for o in body["outputs"] if o["name"] == "labels")["data"]
    assert labels == [p["label"] for answer in v1 for p in answer["predictions"]]


@pytest.mark.parametrize(
    "parameters",
    [
        {"parents": "yes"},
        {"confidence": "high"},
        {"confidence": 2},
        {"min_score": True},
        {"include": 5},
        {"include": "unicorn"},
    ],
)
def test_v2_refuses_bad_refinements_in_its_own_shape(gateway: FlaskClient, parameters: dict) -> None:
    response = v2(gateway, "resnet50", parameters, CAT)
    assert response.status_code == 400 and isinstance(response.get_json()["error"], str)
    assert next(iter(parameters)) in response.get_json()["error"]
