"""Hot reload on the running fleet: a new version of the two-replica shapes model is loaded and
warmed beside the old one and swapped in while clients keep sending requests."""

from __future__ import annotations

import pytest
import requests

from deploy.local.running import wait_until
from tests.e2e import shapes
from tests.e2e.load import Load, failures, predict
from tests.e2e.running import ADMIN_TOKEN, E2EFleet, publish

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def served_version(fleet: E2EFleet, replica: int) -> str:
    return requests.get(f"{fleet.service_url('shapes', replica)}/v1/model", timeout=5).json()["version"]


def test_a_new_version_swaps_in_under_load_with_no_errors(
    fleet: E2EFleet, trained_shapes: shapes.TrainedModel
) -> None:
    assert [served_version(fleet, k) for k in (0, 1)] == ["1", "1"]
    with Load({"shapes": predict(fleet, "model=shapes&top_k=1")}, threads_per_kind=3) as load:
        load.wait_for(20)
        publish(fleet.repository, 2, trained_shapes.model_path, 1e-3)
        wait_until(
            lambda: [served_version(fleet, k) for k in (0, 1)] == ["2", "2"],
            120,
            "both replicas to find, load, warm and serve version 2",
        )
        switched = len(load.outcomes)
        load.wait_for(30, since=switched)
    assert not failures(load.outcomes), failures(load.outcomes)
    seen = [o.version for o in load.outcomes]
    # NOTE: the three clients' requests in flight when both replicas said "2" were admitted to
    # version 1, which answers what it queued before it closes: those may end after the switch.
    in_flight = 3
    assert seen[0] == "1" and set(seen[switched + in_flight :]) == {"2"}, seen
    # /v1/models answers from each gateway worker's last readiness probes (every
    # GATEWAY_HEALTH_INTERVAL_S): it reports version 2 once both workers have probed again.
    wait_until(lambda: listed_version(fleet) == "2", 30, "/v1/models to list version 2")


def listed_version(fleet: E2EFleet) -> str:
    body = requests.get(f"{fleet.url}/v1/models", timeout=10).json()
    return str(next(m for m in body["models"] if m["name"] == "shapes")["version"])


def test_the_admin_endpoint_reloads_at_once_and_wants_its_token(
    fleet: E2EFleet, trained_shapes: shapes.TrainedModel
) -> None:
    url = f"{fleet.service_url('shapes', 0)}/v1/admin/reload"
    assert requests.post(url, timeout=10).status_code == 401
    publish(fleet.repository, 3, trained_shapes.model_path, -1e-3)
    for replica in (0, 1):  # the poller may get there first: either way version 3 serves
        answer = requests.post(
            f"{fleet.service_url('shapes', replica)}/v1/admin/reload",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            timeout=120,
        )
        assert answer.status_code == 200 and answer.json()["version"] == "3", answer.text
    body = requests.post(
        f"{fleet.url}/v1/predict?model=shapes",
        files={"file": ("s.png", shapes.dataset(1, seed=5)[0][0])},
        timeout=60,
    ).json()
    assert body["version"] == "3"
