"""The gateway's OpenAPI description and the live fleet agree: schemathesis generates requests
from /openapi.json and checks every answer (status documented, JSON schema, content type,
headers, invalid input refused) through Nginx."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error, positive_data_acceptance

from deploy.local.running import wait_until
from tests import colours
from tests.e2e.running import E2EFleet
from tests.helpers import photo

pytestmark = pytest.mark.e2e


# Excluded everywhere: the generic 5xx check (replaced by no_internal_error) and "schema-valid data
# must be accepted" - a schema cannot say "a decodable image", so random bytes get 415.
EXCLUDED = [not_a_server_error, positive_data_acceptance]
OPERATIONS = 31


@schemathesis.check
def no_internal_error(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case
) -> None:
    """500 is a bug. 502, 503 and 504 are documented answers (a member failed, overload, deadline)."""
    if response.status_code == 500:
        raise AssertionError(f"500 from {case.method} {case.path}: {response.text[:300]}")


# NOTE: driven through schemathesis' Python API rather than its pytest plugin, whose
# parametrization does not run under pytest 9 ('Function' object has no attribute '_nodeid').
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_the_live_fleet_matches_its_openapi_description(fleet: E2EFleet, mode: GenerationMode) -> None:
    api = schemathesis.openapi.from_url(f"{fleet.url}/openapi.json")
    failures: dict[str, str] = {}
    exercised: list[str] = []
    operations = [result.ok() for result in api.get_all_operations()]
    for operation in operations:
        # The v2 infer bodies are where malformed tensors once gave a 500 (inputs ["x"], [null]):
        # enough examples there to reach such shapes, fewer elsewhere to keep the suite short.
        examples = 150 if operation.label.endswith("/infer") else 20

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        def exercise(case: schemathesis.Case) -> None:
            # Valid requests as the admin, so every route is exercised past its key check. Invalid
            # ones as generated: a missing or malformed Authorization is one of the invalid parts a
            # negative case may have, and adding the key back would make it valid (and accepted).
            headers = fleet.admin if mode is GenerationMode.POSITIVE else None
            case.call_and_validate(
                headers=headers, additional_checks=[no_internal_error], excluded_checks=EXCLUDED
            )

        try:
            exercise()
            exercised.append(operation.label)
        except Unsatisfiable:  # negative mode: nothing about this operation can be invalid
            assert mode is GenerationMode.NEGATIVE, operation.label
        except Exception as exc:  # collect every operation's first failure, then report them all
            failures[operation.label] = str(exc)[:1500]
    assert len(operations) == OPERATIONS
    if mode is GenerationMode.POSITIVE:
        assert len(exercised) + len(failures) == OPERATIONS  # every documented operation
    else:  # those with parameters or bodies to get wrong
        infer = {"POST /v2/models/{name}/infer", "POST /v2/models/{name}/versions/{version}/infer"}
        jobs = {"POST /v1/jobs", "GET /v1/jobs", "GET /v1/jobs/{job_id}/results", "POST /v1/training"}
        assert {"POST /v1/predict", *infer, *jobs} <= {*exercised, *failures}
    assert not failures, "\n\n".join(f"{label}:\n{text}" for label, text in failures.items())


def checker(fleet: E2EFleet) -> Callable[..., schemathesis.Response]:
    """Calls one described operation with the parts given, and checks its answer as above."""
    api = schemathesis.openapi.from_url(f"{fleet.url}/openapi.json")

    def checked(method: str, path: str, **parts: Any) -> schemathesis.Response:
        case = api[path][method].Case(**parts)
        return case.call_and_validate(
            headers=fleet.admin, additional_checks=[no_internal_error], excluded_checks=EXCLUDED
        )

    return checked


def test_a_job_followed_through_every_job_route_matches_the_description(fleet: E2EFleet) -> None:
    """Random requests seldom make a job (the model must exist and the body hold an image), and
    never one that finishes: one real job, each of its answers checked against the description."""
    checked = checker(fleet)
    images = [base64.b64encode(photo("chelsea.jpg")).decode(), "not base64"]
    submitted = checked(
        "POST",
        "/v1/jobs",
        query={"model": "shapes", "top_k": 2},
        body={"images": images},
        media_type="application/json",
    )
    assert submitted.status_code == 202, submitted.text
    job = {"job_id": submitted.json()["job_id"]}

    def finished() -> bool:
        return checked("GET", "/v1/jobs/{job_id}", path_parameters=job).json()["status"] == "completed"

    wait_until(finished, 60, f"job {job['job_id']} to complete")
    answers = {
        form: checked("GET", "/v1/jobs/{job_id}/results", path_parameters=job, query={"format": form})
        for form in ("json", "jsonl", "csv")
    }
    assert [answer.status_code for answer in answers.values()] == [200, 200, 200]
    outcomes = answers["json"].json()["results"]
    assert [outcome.get("error", {}).get("code") for outcome in outcomes] == [None, "invalid_base64"]
    page = checked("GET", "/v1/jobs", query={"limit": 1}).json()
    assert page["jobs"] and page["next"]  # a full page links to the next
    before = page["next"].split("before=")[1]
    assert checked("GET", "/v1/jobs", query={"limit": 1, "before": before}).status_code == 200
    assert checked("DELETE", "/v1/jobs/{job_id}", path_parameters=job).status_code == 409  # it finished
    unknown = {"job_id": "0" * 32}
    assert checked("GET", "/v1/jobs/{job_id}", path_parameters=unknown).status_code == 404
    assert checked("DELETE", "/v1/jobs/{job_id}", path_parameters=unknown).status_code == 404


@pytest.mark.slow  # a real training (tests/e2e/test_training.py tests what it learns)
def test_a_training_job_followed_through_its_routes_matches_the_description(fleet: E2EFleet) -> None:
    """Random uploads never train (that takes two class folders of readable photos): one refused
    dataset and one small training, followed to its model, each answer checked."""
    checked = checker(fleet)
    multipart = "multipart/form-data"
    one_class = {"dataset": colours.archive(5, seed=40, classes=("red",))}
    refused = checked("POST", "/v1/training", query={"name": "openapi"}, body=one_class, media_type=multipart)
    assert refused.status_code == 400 and refused.json()["error"]["problems"], refused.text
    dataset = {"dataset": colours.archive(5, seed=41, classes=("red", "blue"))}
    submitted = checked(
        "POST", "/v1/training", query={"name": "openapi", "epochs": 3}, body=dataset, media_type=multipart
    )
    assert submitted.status_code == 202, submitted.text
    job = {"job_id": submitted.json()["job_id"]}

    def ended() -> bool:
        state = checked("GET", "/v1/jobs/{job_id}", path_parameters=job).json()["status"]
        return state in ("completed", "failed", "cancelled")

    wait_until(ended, 300, f"training job {job['job_id']} to end")
    done = checked("GET", "/v1/jobs/{job_id}", path_parameters=job).json()
    assert done["status"] == "completed" and done["served"]["serving"], done
    results = checked("GET", "/v1/jobs/{job_id}/results", path_parameters=job)
    assert results.status_code == 200 and results.json()["results"] == []  # the product is the model
    assert checked("GET", "/v1/jobs", query={"limit": 5}).status_code == 200
    assert checked("DELETE", "/v1/jobs/{job_id}", path_parameters=job).status_code == 409  # it finished
    model = {"name": "openapi"}
    listed = f"{fleet.url}/v1/models/openapi"  # the gateway sees it on its next look at the replicas
    wait_until(
        lambda: requests.get(listed, headers=fleet.admin, timeout=10).status_code == 200,
        30,
        "the gateway to list it",
    )
    entry = checked("GET", "/v1/models/{name}", path_parameters=model).json()
    assert entry["custom"] is True and entry["class_names"] == ["blue", "red"], entry
    assert checked("GET", "/v1/models").status_code == 200  # the listing, with a custom model in it
    assert checked("DELETE", "/v1/models/{name}", path_parameters={"name": "resnet50"}).status_code == 400
    assert checked("DELETE", "/v1/models/{name}", path_parameters=model).status_code == 200
    assert checked("DELETE", "/v1/models/{name}", path_parameters=model).status_code == 404


def test_the_docs_page_is_served_without_a_cdn(fleet: E2EFleet) -> None:
    page = requests.get(f"{fleet.url}/docs", timeout=10)
    assert page.status_code == 200 and "/openapi.json" in page.text
    assert "http" not in page.text.split("<body>")[1].replace("/openapi.json", "")  # every asset is local
    script = requests.get(f"{fleet.url}/docs/static/swagger-ui-bundle.js", timeout=10)
    assert script.status_code == 200 and len(script.content) > 100_000
    spec = requests.get(f"{fleet.url}/openapi.json", timeout=10).json()
    assert spec["openapi"].startswith("3.") and "/v1/predict" in spec["paths"]
