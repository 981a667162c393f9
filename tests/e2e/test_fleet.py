"""The whole stack, for real: Nginx -> gateway (Gunicorn) -> model services (Gunicorn + Keras)."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image

from common import hierarchy
from deploy.local.running import wait_until
from tests.e2e.running import JPEG, E2EFleet, assert_json_error, post
from tests.helpers import encode, metric_value, photo

pytestmark = pytest.mark.e2e
CAT, COFFEE = photo("chelsea.jpg"), photo("coffee.jpg")
IMAGENET_MODELS = ("vgg16", "resnet50", "inceptionv3")


def probabilities(fleet: E2EFleet, model: str, data: bytes) -> np.ndarray:
    body = requests.post(
        f"{fleet.service_url(model)}/v1/predict?probabilities=true",
        data=data,
        headers={"Content-Type": "image/jpeg"},
        timeout=60,
    ).json()
    return np.frombuffer(base64.b64decode(body["probabilities"]["data"]), "<f4")


def test_models_are_listed_with_honest_weights(fleet: E2EFleet) -> None:
    anonymous = requests.get(f"{fleet.url}/v1/models", timeout=10).json()["models"]
    assert all("url" not in r for m in anonymous for r in m["replicas"])  # addresses are the admin's
    body = requests.get(f"{fleet.url}/v1/models", headers=fleet.admin, timeout=10).json()
    models = {m["name"]: m for m in body["models"]}
    assert set(models) == {*IMAGENET_MODELS, "shapes", "flaky"}
    assert [r["url"] for r in models["shapes"]["replicas"]] == [
        fleet.service_url("shapes", 0),
        fleet.service_url("shapes", 1),
    ]
    for name in IMAGENET_MODELS:
        assert models[name]["status"] == "ready" and models[name]["weights"] == "random"
        assert models[name]["backend"].startswith("openvino-")  # auto: converted, parity-checked
        [replica] = models[name]["replicas"]
        checked_at = replica.pop("checked_at")  # the listing answers from the last probe, and says when
        assert checked_at and replica == {
            "url": fleet.service_url(name),
            "ready": True,
            "weights": "random",
            "state": "ready",
        }
    assert [models[m]["input_size"] for m in ("vgg16", "resnet50", "inceptionv3", "shapes")] == [
        224,
        224,
        299,
        64,
    ]
    assert models["shapes"]["weights"] == "file" and models["shapes"]["classes"] == 4
    assert body["ensemble"]["members"] == list(IMAGENET_MODELS)


def test_every_input_kind_gives_the_same_answer(fleet: E2EFleet) -> None:
    b64 = base64.b64encode(CAT).decode()
    answers = {
        "multipart": post(fleet, "model=resnet50", files={"file": ("cat.jpg", CAT, "image/jpeg")}),
        "json-base64": post(fleet, "model=resnet50", json={"image": b64}),
        "json-data-uri": post(fleet, "model=resnet50", json={"image": f"data:image/jpeg;base64,{b64}"}),
        "json-url": post(fleet, "model=resnet50", json={"url": f"{fleet.image_server}/cat.jpg"}),
        "form-base64": post(fleet, "model=resnet50", data={"image": b64}),
        "raw-body": post(fleet, "model=resnet50", data=CAT, headers={"Content-Type": "image/jpeg"}),
    }
    bodies = {kind: response.json() for kind, response in answers.items()}
    assert {kind: r.status_code for kind, r in answers.items()} == dict.fromkeys(answers, 200), bodies
    reference = bodies["multipart"]
    assert reference["model"] == "resnet50" and reference["weights"] == "random"
    assert len(reference["predictions"]) == 5
    for kind, body in bodies.items():
        assert body["predictions"] == reference["predictions"], kind


@pytest.mark.parametrize("model", IMAGENET_MODELS)
def test_each_model_answers_through_the_edge_as_it_does_directly(fleet: E2EFleet, model: str) -> None:
    edge = post(fleet, f"model={model}&top_k=5", data=COFFEE, headers={"Content-Type": "image/jpeg"}).json()
    direct = requests.post(
        f"{fleet.service_url(model)}/v1/predict",
        data=COFFEE,
        headers={"Content-Type": "image/jpeg"},
        timeout=60,
    ).json()
    assert edge["model"] == model and edge["weights"] == "random"
    assert edge["predictions"] == direct["predictions"]
    scores = [p["score"] for p in edge["predictions"]]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0 + 1e-6
    assert set(edge["timing_ms"]) >= {"decode", "inference", "total"}


def test_soft_ensemble_is_the_mean_of_member_probabilities(fleet: E2EFleet) -> None:
    body = post(
        fleet, "model=ensemble&vote=soft&top_k=5", data=CAT, headers={"Content-Type": "image/jpeg"}
    ).json()
    assert body["degraded"] is False and body["members"] == list(IMAGENET_MODELS)
    mean = np.mean([probabilities(fleet, m, CAT) for m in IMAGENET_MODELS], axis=0)
    assert [p["index"] for p in body["predictions"]] == list(np.argsort(-mean, kind="stable")[:5])
    assert [p["score"] for p in body["predictions"]] == pytest.approx(np.sort(mean)[::-1][:5], abs=1e-6)
    assert set(body["member_predictions"]) == set(IMAGENET_MODELS)


def test_hard_ensemble_counts_member_votes(fleet: E2EFleet) -> None:
    body = post(
        fleet,
        "models=vgg16,resnet50,inceptionv3&vote=hard",
        data=COFFEE,
        headers={"Content-Type": "image/jpeg"},
    ).json()
    top1 = [body["member_predictions"][m][0]["index"] for m in IMAGENET_MODELS]
    best = body["predictions"][0]
    assert best["votes"] == max(top1.count(i) for i in top1)
    assert best["index"] in top1 and best["score"] == pytest.approx(best["votes"] / 3)


def test_batch_with_bad_items_answers_the_good_ones_in_order(fleet: E2EFleet) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    truncated = encode(Image.fromarray(noise), "JPEG")[:600]
    files = [
        ("files", ("cat.jpg", CAT, "image/jpeg")),
        ("files", ("notes.txt", b"hello", "text/plain")),
        ("files", ("coffee.jpg", COFFEE, "image/jpeg")),
        ("files", ("cut.jpg", truncated, "image/jpeg")),
    ]
    response = post(fleet, "model=vgg16&top_k=3", files=files)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["name"] for r in results] == ["cat.jpg", "notes.txt", "coffee.jpg", "cut.jpg"]
    assert results[1]["error"]["code"] == "unsupported_media_type"  # refused by the gateway
    assert results[3]["error"]["code"] == "invalid_image"  # refused by the service's full decode
    single = post(fleet, "model=vgg16&top_k=3", data=COFFEE, headers={"Content-Type": "image/jpeg"}).json()
    # Batched and single inference may differ in the last float bits (different kernels).
    assert [p["index"] for p in results[2]["predictions"]] == [p["index"] for p in single["predictions"]]
    assert [p["score"] for p in results[2]["predictions"]] == pytest.approx(
        [p["score"] for p in single["predictions"]], rel=1e-4
    )


def test_seed_routes(fleet: E2EFleet) -> None:
    upload = requests.post(f"{fleet.url}/predict", files={"file": ("cat.jpg", CAT)}, timeout=60).json()
    b64 = base64.b64encode(CAT).decode()
    plain = requests.post(f"{fleet.url}/predict", data={"image": b64}, timeout=60).json()
    prefixed = requests.post(
        f"{fleet.url}/predict", data={"image": f"data:image/jpeg;base64,{b64}"}, timeout=60
    ).json()
    assert upload == plain == prefixed
    assert len(upload["predictions"]) == 3 and set(upload["predictions"][0]) == {"label", "prob"}
    batch = requests.post(
        f"{fleet.url}/batch_predict",
        timeout=60,
        files=[("files", ("a.jpg", CAT)), ("files", ("b.jpg", COFFEE))],
    ).json()
    assert [r["filename"] for r in batch["results"]] == ["a.jpg", "b.jpg"]
    batched = batch["results"][0]["predictions"]  # a batch of two: equal up to float rounding
    assert [p["label"] for p in batched] == [p["label"] for p in upload["predictions"]]
    assert [p["prob"] for p in batched] == pytest.approx([p["prob"] for p in upload["predictions"]], rel=1e-4)


def test_unknown_model_is_404_listing_the_models(fleet: E2EFleet) -> None:
    body = assert_json_error(
        post(fleet, "model=alexnet", data=CAT, headers={"Content-Type": "image/jpeg"}), 404, "unknown_model"
    )
    assert all(name in body["error"]["message"] for name in (*IMAGENET_MODELS, "shapes", "ensemble"))


def test_a_multi_megabyte_photo_goes_through(fleet: E2EFleet) -> None:
    """Bodies over Nginx's in-memory buffer (1 MB) spill to its temp folder and still arrive."""
    noise = np.random.default_rng(3).integers(0, 256, (1500, 2000, 3), dtype=np.uint8)
    big = encode(Image.fromarray(noise), "JPEG", quality=90)
    assert len(big) > 2 * 1024 * 1024
    response = post(fleet, "model=resnet50&top_k=1", data=big, headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"]) == 1


def test_oversized_body_is_413_json_from_nginx(fleet: E2EFleet) -> None:
    response = post(
        fleet, "model=vgg16", data=b"\xff" * (11 * 1024 * 1024), headers={"Content-Type": "image/jpeg"}
    )
    body = assert_json_error(response, 413, "payload_too_large")
    assert response.headers["Server"] == "nginx" and "10m" in body["error"]["message"]
    assert response.headers["X-Request-ID"] == body["error"]["request_id"]


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        (
            {"data": b"this is not an image", "headers": {"Content-Type": "image/jpeg"}},
            415,
            "unsupported_media_type",
        ),
        ({"data": b"[]", "headers": {"Content-Type": "application/json"}}, 400, "bad_request"),
        ({"data": b"hello", "headers": {"Content-Type": "text/plain"}}, 415, "unsupported_media_type"),
    ],
)
def test_non_images_get_4xx_json(fleet: E2EFleet, kwargs: dict, status: int, code: str) -> None:
    assert_json_error(post(fleet, "model=resnet50", **kwargs), status, code)


def test_request_id_travels_end_to_end(fleet: E2EFleet) -> None:
    response = post(
        fleet, "model=resnet50", data=CAT, headers={"Content-Type": "image/jpeg", "X-Request-ID": "trace-42"}
    )
    assert response.json()["request_id"] == "trace-42" and response.headers["X-Request-ID"] == "trace-42"


def test_ensemble_degrades_with_a_member_stopped_and_recovers(fleet: E2EFleet) -> None:
    fleet.ctl("stop", "vgg16")
    try:
        response = post(fleet, "model=ensemble", data=CAT, headers={"Content-Type": "image/jpeg"})
        body = response.json()
        assert response.status_code == 200, body
        assert body["degraded"] is True and [f["model"] for f in body["failed_members"]] == ["vgg16"]
        assert set(body["member_predictions"]) == {"resnet50", "inceptionv3"}
        single = post(fleet, "model=vgg16", data=CAT, headers={"Content-Type": "image/jpeg"})
        assert_json_error(single, 503, "model_unavailable")
        assert single.headers["Retry-After"]
        assert (
            post(fleet, "model=resnet50", data=CAT, headers={"Content-Type": "image/jpeg"}).status_code == 200
        )
    finally:
        fleet.ctl("start", "vgg16")
        fleet.wait_ready()
    body = post(fleet, "model=ensemble", data=CAT, headers={"Content-Type": "image/jpeg"}).json()
    assert body["degraded"] is False


def test_a_crashed_service_is_restarted_alone(fleet: E2EFleet) -> None:
    before = fleet.pids()
    os.kill(before["inceptionv3"], signal.SIGKILL)
    wait_until(
        lambda: fleet.pids().get("inceptionv3") not in (None, before["inceptionv3"]),
        60,
        "supervisord to restart inceptionv3",
    )
    fleet.wait_ready()
    after = fleet.pids()
    assert {k: v for k, v in after.items() if k != "inceptionv3"} == {
        k: v for k, v in before.items() if k != "inceptionv3"
    }
    assert (
        post(fleet, "model=inceptionv3", data=CAT, headers={"Content-Type": "image/jpeg"}).status_code == 200
    )


def test_gateway_down_is_a_json_502_from_nginx(fleet: E2EFleet) -> None:
    fleet.ctl("stop", "gateway")
    try:
        response = post(fleet, "model=resnet50", data=CAT, headers={"Content-Type": "image/jpeg"})
        assert_json_error(response, 502, "bad_gateway")
        assert "Retry-After" not in response.headers  # only 429 and 503 say when to come back
    finally:
        fleet.ctl("start", "gateway")
        wait_until(
            lambda: requests.get(f"{fleet.url}/health/ready", timeout=5).status_code == 200,
            60,
            "the gateway to come back",
        )


def test_metrics_sum_every_gateway_worker_and_stay_off_the_public_port(fleet: E2EFleet) -> None:
    gateway = f"http://{fleet.fleet.settings.host}:{fleet.fleet.settings.gateway_port}/metrics"
    replicas = [f"{fleet.service_url('shapes', k)}/metrics" for k in (0, 1)]

    def counted() -> tuple[float, float]:
        edge = requests.get(gateway, timeout=10).text
        served = [requests.get(url, timeout=10).text for url in replicas]
        labels = {"component": "gateway", "route": "/v1/predict", "model": "shapes", "status": "200"}
        return (
            metric_value(edge, "imagerec_requests_total", **labels),
            sum(metric_value(text, "imagerec_inference_images_total", model="shapes") for text in served),
        )

    before = counted()
    with ThreadPoolExecutor(8) as pool:  # concurrent, so both gateway workers take some
        statuses = list(
            pool.map(lambda _: post(fleet, "model=shapes", data=CAT, headers=JPEG).status_code, range(40))
        )
    assert statuses == [200] * 40
    after = counted()
    assert (after[0] - before[0], after[1] - before[1]) == (40, 40)
    public = requests.get(f"{fleet.url}/metrics", timeout=10)
    assert_json_error(public, 404, "not_found")


def test_every_process_writes_one_json_line_per_request(fleet: E2EFleet) -> None:
    rid = "json-log-7"
    response = post(fleet, "model=resnet50", data=CAT, headers={**JPEG, "X-Request-ID": rid})
    assert response.status_code == 200
    folder = fleet.fleet.run_dir / "logs"

    def lines(program: str) -> list[dict]:
        text = (folder / f"{program}.log").read_text()
        return [json.loads(line) for line in text.splitlines() if f'"{rid}"' in line]

    wait_until(
        lambda: all(lines(p) for p in ("nginx", "gateway", "resnet50")), 15, "a request line in every log"
    )
    for program, component in (("nginx", "nginx"), ("gateway", "gateway"), ("resnet50", "resnet50")):
        [line] = lines(program)
        assert (line["component"], line["request_id"], line["status"]) == (component, rid, 200)
    # The gateway never imports TensorFlow: everything it writes, Gunicorn's own lines included, is JSON.
    for text in (folder / "gateway.log").read_text().splitlines():
        assert isinstance(json.loads(text), dict), text


def test_answers_carry_parents_and_a_hedged_node_whose_probabilities_are_the_services(
    fleet: E2EFleet,
) -> None:
    """Real services, through Nginx: a node's probability is the sum of its classes' in the
    distribution the service computed, for every node on the path, single model and ensemble."""
    graph = hierarchy.imagenet()

    def node_sum(synset: str, p: np.ndarray) -> float:
        return float(p.astype(np.float64)[graph.under[graph.position[synset]]].sum())

    for model in IMAGENET_MODELS:  # an earlier test may have stopped one and let it restart
        url = f"{fleet.service_url(model)}/health/ready"
        wait_until(lambda url=url: requests.get(url, timeout=5).ok, 120, f"{model} to be ready")
    single = probabilities(fleet, "resnet50", CAT)
    merged = np.mean([probabilities(fleet, m, CAT).astype(np.float64) for m in IMAGENET_MODELS], axis=0)
    for query, p in (("model=resnet50", single), ("model=ensemble", merged)):
        response = post(fleet, f"{query}&parents=true&confidence=0.3&top_k=3", data=CAT, headers=JPEG)
        assert response.status_code == 200, response.text
        body = response.json()
        hedged = body["hedged"]
        assert hedged["score"] >= 0.3 and hedged["score"] == pytest.approx(
            node_sum(hedged["class_id"], p), abs=1e-6
        )
        assert hedged == graph.hedge(p, 0.3).to_json() | {"score": hedged["score"]}
        for prediction in body["predictions"]:
            assert prediction["parents"][-1]["class_id"] == "n00001740"
            for node in prediction["parents"]:
                assert node["score"] == pytest.approx(node_sum(node["class_id"], p), abs=1e-6), node
        assert body["weights"] in ("random", {m: "random" for m in IMAGENET_MODELS})


def test_an_explanation_through_the_edge_costs_exactly_its_stated_passes(fleet: E2EFleet) -> None:
    """Real Nginx, gateway and ResNet50 service: the grid and the overlay come back, and the
    service computed exactly the forward passes the answer states (the fleet is idle otherwise)."""
    url = f"{fleet.service_url('resnet50')}/metrics"

    def computed() -> float:
        return metric_value(
            requests.get(url, timeout=10).text, "imagerec_inference_images_total", model="resnet50"
        )

    before = computed()
    response = requests.post(
        f"{fleet.url}/v1/explain?model=resnet50&grid=4", data=CAT, headers=JPEG, timeout=60
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["passes"] == 17 and np.array(body["drops"]).shape == (4, 4)
    assert computed() - before == 17
    assert body["weights"] == "random" and "untrained" in body["note"]
    overlay = Image.open(io.BytesIO(base64.b64decode(body["overlay_png"])))
    assert overlay.size == (448, 448)
    assert body["class"]["index"] == int(probabilities(fleet, "resnet50", CAT).argmax())
