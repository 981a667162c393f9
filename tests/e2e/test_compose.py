"""The compose project for real: our own dockerd, the images built from deploy/docker/Dockerfile on a
base made from Debian's packages, ``docker-compose up`` with free published ports, and the fleet
driven through Nginx as the README does; then one model scaled on its own under load, containers
killed under load and during a job, and the project taken down and up again with its data kept.

The tests run in file order on one fleet (module scope): each leaves it as the next expects.
Skipped where Docker cannot start, except under CI=true, where that fails.
"""

from __future__ import annotations

import base64
import io
import os
import time
import zipfile
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import requests
import tritonclient.grpc as triton_grpc
from limits import parse_many

from deploy.docker import engine as docker_engine
from deploy.docker import project as compose
from deploy.local.running import wait_until
from gateway.settings import GatewaySettings
from tests import colours
from tests.e2e.load import Load
from tests.e2e.running import wait_for
from tests.helpers import photo

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CAT, COFFEE = photo("chelsea.jpg"), photo("coffee.jpg")
JPEG = {"Content-Type": "image/jpeg"}
MODELS = ("vgg16", "resnet50", "inceptionv3")


@pytest.fixture(scope="module")
def fleet() -> Iterator[compose.ComposeFleet]:
    reason = docker_engine.why_not()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"the compose tests must run in CI: {reason}")
        pytest.skip(reason)
    engine = docker_engine.Engine()
    fleet = None
    keep = bool(os.environ.get("E2E_KEEP_COMPOSE"))  # left up to look at: tear it down by hand
    try:
        engine.start()
        fleet = compose.ComposeFleet(engine, engine.base_image())
        fleet.compose("down", "-v", "--remove-orphans", "--timeout", "10")  # what a killed run left
        fleet.timings["build_s"] = fleet.build()
        compose.secrets()
        fleet.timings["up_s"] = fleet.up()
        yield fleet
    finally:
        if not keep:
            try:
                if fleet is not None:
                    fleet.compose("down", "-v", "--remove-orphans", "--timeout", "10", check=False)
            finally:
                engine.stop()
    # dockerd leaves bridges, iptables rules, ip_forward and mounts behind: stop() removed them.
    assert keep or engine.leftovers() == []


def predict(fleet: compose.ComposeFleet, query: str, image: bytes = CAT, **kwargs: Any) -> requests.Response:
    session = kwargs.pop("session", requests)
    return session.post(f"{fleet.url}/v1/predict?{query}", data=image, headers=JPEG, timeout=60, **kwargs)


def _nudged(n: int) -> bytes:
    # A JPEG comment segment after SOI: the image is the same, the bytes (and the cache key) differ.
    comment = f"request {n}".encode()
    return CAT[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + CAT[2:]


def resnet50_load(fleet: compose.ComposeFleet, threads: int = 4) -> Load:
    """Client threads sending new photos to ResNet50 on the defaults, paced to half the gateway's
    default per-client limit (100/second) together: a refusal here is the fleet's failure, never
    the limit doing its job (the limiter has tests of its own)."""
    counter = iter(range(10**9))
    per_second = min(item.amount / item.get_expiry() for item in parse_many(GatewaySettings().rate_limit))
    interval = threads / (per_second / 2)

    def send(session: requests.Session) -> requests.Response:
        started = time.monotonic()
        answer = predict(fleet, "model=resnet50&top_k=1", _nudged(next(counter)), session=session)
        time.sleep(max(0.0, interval - (time.monotonic() - started)))  # pacing, not waiting for a state
        return answer

    return Load({"resnet50": send}, threads_per_kind=threads)


def failures(load: Load) -> Counter[tuple[int, str, str]]:
    return Counter((o.status, o.code, o.message) for o in load.outcomes if o.status != 200)


def test_every_image_runs_as_a_non_root_user_on_a_read_only_root(fleet: compose.ComposeFleet) -> None:
    secrets = {(compose.SECRETS / name).read_text().strip() for name in ("admin_key", "redis_password")}
    for service in compose.SERVICES:
        for container in fleet.containers(service):
            found = fleet.inspect(container)
            assert found["HostConfig"]["ReadonlyRootfs"] is True, service
            uid = fleet.docker("exec", container, "id", "-u").stdout.strip()
            assert uid == "10001", f"{service} runs as {uid}"
            environment = " ".join(found["Config"]["Env"])
            assert not any(secret in environment for secret in secrets), (
                f"{service} has a secret in its environment"
            )
            assert fleet.docker("exec", container, "touch", "/app-was-here", check=False).returncode != 0


def test_the_readme_requests_through_the_published_port(fleet: compose.ComposeFleet) -> None:
    for model in MODELS:
        answer = predict(fleet, f"model={model}&top_k=3")
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert (body["model"], body["weights"], len(body["predictions"])) == (model, "random", 3)
    soft = predict(fleet, "model=ensemble&vote=soft").json()
    assert soft["members"] == list(MODELS) and soft["degraded"] is False
    seed = requests.post(f"{fleet.url}/predict", files={"file": ("cat.jpg", CAT, "image/jpeg")}, timeout=60)
    assert seed.status_code == 200 and seed.json()["predictions"], seed.text
    models = requests.get(f"{fleet.url}/v1/models", timeout=10).json()["models"]
    assert {m["name"]: (m["status"], m["weights"]) for m in models} == dict.fromkeys(
        MODELS, ("ready", "random")
    )
    page = requests.get(f"{fleet.url}/", timeout=10)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert "<title>imagerec</title>" in page.text

    v2 = requests.post(
        f"{fleet.url}/v2/models/resnet50/infer",
        json={
            "inputs": [
                {"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(CAT).decode()]}
            ],
            "parameters": {"top_k": 3},
        },
        timeout=60,
    )
    assert v2.status_code == 200, v2.text
    labels = next(o for o in v2.json()["outputs"] if o["name"] == "labels")["data"]
    assert labels[:3] == [p["label"] for p in predict(fleet, "model=resnet50&top_k=3").json()["predictions"]]

    client = triton_grpc.InferenceServerClient(url=fleet.grpc_address)
    assert client.is_server_ready() and client.is_model_ready("resnet50")
    image = triton_grpc.InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([CAT], dtype=object))
    result = client.infer("resnet50", [image], parameters={"top_k": 3})
    assert [str(label, "utf-8") for label in result.as_numpy("labels")[0]] == labels[:3]


def submit_job(fleet: compose.ComposeFleet, query: str, photos: int, first: int) -> str:
    """A zip of ``photos`` new photos posted as a job with the admin key; its id."""
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        for n in range(photos):
            zipped.writestr(f"photos/{n}.jpg", _nudged(first + n))
    answer = requests.post(
        f"{fleet.url}/v1/jobs?{query}",
        files={"archive": ("photos.zip", archive.getvalue())},
        headers=fleet.admin,
        timeout=120,
    )
    assert answer.status_code == 202, answer.text
    return str(answer.json()["job_id"])


@pytest.fixture(scope="module")
def job_result(fleet: compose.ComposeFleet) -> dict[str, Any]:
    """A job of 12 photos run to completion with the admin key from run/secrets/admin_key."""
    job_id = submit_job(fleet, "model=resnet50&top_k=2", 12, first=1000)
    done = wait_for(fleet, job_id, ("completed", "failed", "cancelled"), 300)  # type: ignore[arg-type]
    assert done["status"] == "completed", done
    return done


def test_a_job_completes_with_the_admin_key(fleet: compose.ComposeFleet, job_result: dict[str, Any]) -> None:
    assert (job_result["done"], job_result["failed"]) == (12, 0), job_result


@pytest.fixture(scope="module")
def custom_model(fleet: compose.ComposeFleet) -> dict[str, Any]:
    """A custom model trained by the trainer container, published to the custom-models volume."""
    answer = requests.post(
        f"{fleet.url}/v1/training",
        files={"dataset": ("photos.zip", colours.archive(14, seed=1, root="photos"))},
        data={"name": "colours", "base": "resnet50"},
        headers=fleet.admin,
        timeout=120,
    )
    assert answer.status_code == 202, answer.text
    done = wait_for(fleet, answer.json()["job_id"], ("completed", "failed", "cancelled"), 600)  # type: ignore[arg-type]
    assert done["status"] == "completed", done
    return done


def test_a_custom_model_is_trained_and_answered_by_its_bases_container(
    fleet: compose.ComposeFleet, custom_model: dict[str, Any]
) -> None:
    assert custom_model["served"]["serving"] is True
    right = 0
    for label, image in colours.images(6, seed=99):
        answer = requests.post(
            f"{fleet.url}/v1/predict?model=colours&top_k=1",
            data=image,
            headers={**JPEG, **fleet.admin},
            timeout=60,
        )
        assert answer.status_code == 200, answer.text
        assert (answer.json()["base"], answer.json()["weights"]) == ("resnet50", "random")
        right += answer.json()["predictions"][0]["label"] == label
    assert right >= 5, f"{right}/6 fresh photos right"


def test_resnet50_scales_out_and_in_under_load(fleet: compose.ComposeFleet) -> None:
    with resnet50_load(fleet) as load:
        wait_until(lambda: len(load.outcomes) >= 20, 60, "the load to get going")
        fleet.compose("up", "-d", "--no-build", "--no-recreate", "--scale", "resnet50=3")
        fleet.wait_green(("resnet50",))
        # Docker's DNS answers with all three; the gateway re-resolves every GATEWAY_DNS_REFRESH_S.
        wait_until(lambda: fleet.ready_replicas() == 3, 120, "the gateway to list three ready replicas")
        wait_until(
            lambda: all(count > 0 for count in fleet.replica_images().values()),
            120,
            "every replica to answer a share of the load",
        )
        shares = fleet.replica_images()
        fleet.compose("up", "-d", "--no-build", "--no-recreate", "--scale", "resnet50=1")
        wait_until(lambda: fleet.ready_replicas() == 1, 120, "the gateway to drop the two replicas that left")
        after = len(load.outcomes)
        wait_until(lambda: len(load.outcomes) >= after + 20, 60, "the load to go on on one replica")
    assert len(shares) == 3 and all(count > 0 for count in shares.values()), shares
    # Not one: joining replicas take calls once probed ready, leaving ones drain first (DRAIN_S).
    assert failures(load) == Counter(), f"{failures(load)} of {len(load.outcomes)}"


def test_a_killed_replica_loses_only_what_it_held_and_comes_back(fleet: compose.ComposeFleet) -> None:
    fleet.compose("up", "-d", "--no-build", "--no-recreate", "--scale", "resnet50=2")
    fleet.wait_green(("resnet50",))
    wait_until(lambda: fleet.ready_replicas() == 2, 120, "two ready replicas")
    victim = fleet.containers("resnet50")[-1]
    restarts = fleet.inspect(victim)["RestartCount"]
    with resnet50_load(fleet, threads=2) as load:
        wait_until(lambda: len(load.outcomes) >= 20, 60, "the load to get going")
        fleet.crash(victim)
        fleet.restarted(victim, restarts)  # restart: unless-stopped
        wait_until(lambda: fleet.ready_replicas() == 2, 120, "the restarted replica back in rotation")
        before = fleet.replica_images()[victim[:12]]
        wait_until(
            lambda: fleet.replica_images()[victim[:12]] > before, 120, "the restarted replica to answer"
        )
    lost = failures(load)
    # At most the requests the dead replica held when it died (2 client threads): the gateway's
    # failover and breaker route everything after around it.
    assert sum(lost.values()) <= 2, f"{lost} of {len(load.outcomes)}"
    fleet.compose("up", "-d", "--no-build", "--no-recreate", "--scale", "resnet50=1")
    wait_until(lambda: fleet.ready_replicas() == 1, 120, "back to one replica")


def test_a_job_survives_its_gateway_redis_and_worker_being_killed(fleet: compose.ComposeFleet) -> None:
    job_id = submit_job(fleet, "model=vgg16&top_k=1", 60, first=5000)
    for service in ("worker", "redis", "gateway"):
        [container] = fleet.containers(service)
        restarts = fleet.inspect(container)["RestartCount"]
        fleet.crash(container)
        fleet.restarted(container, restarts)
    fleet.wait_green()
    done = wait_for(fleet, job_id, ("completed", "failed", "cancelled"), 600)  # type: ignore[arg-type]
    assert done["status"] == "completed" and (done["done"], done["failed"]) == (60, 0), done


def test_down_and_up_keeps_job_results_custom_models_and_keys(
    fleet: compose.ComposeFleet, job_result: dict[str, Any], custom_model: dict[str, Any]
) -> None:
    created = requests.post(
        f"{fleet.url}/v1/keys",
        json={"name": "kept", "scopes": ["predict", "jobs"]},
        headers=fleet.admin,
        timeout=10,
    )
    assert created.status_code == 201, created.text
    key = {"Authorization": f"Bearer {created.json()['key']}"}
    volumes = compose.project_volumes(fleet)
    fleet.compose("down")
    assert compose.project_volumes(fleet) == volumes
    fleet.up()
    results = requests.get(f"{fleet.url}/v1/jobs/{job_result['job_id']}", headers=fleet.admin, timeout=10)
    assert results.status_code == 200 and results.json()["status"] == "completed", results.text
    assert requests.get(f"{fleet.url}/v1/jobs?limit=1", headers=key, timeout=10).status_code == 200
    served = requests.post(
        f"{fleet.url}/v1/predict?model=colours&top_k=1",
        data=colours.images(1, seed=5)[0][1],
        headers={**JPEG, **fleet.admin},
        timeout=60,
    )
    assert served.status_code == 200, served.text
    deleted = requests.delete(f"{fleet.url}/v1/models/colours", headers=fleet.admin, timeout=60)
    assert deleted.status_code in (200, 202, 204), deleted.text
    wait_until(
        lambda: (
            requests.get(f"{fleet.url}/v1/models/colours", headers=fleet.admin, timeout=10).status_code == 404
        ),
        120,
        "the deleted model to be gone",
    )
