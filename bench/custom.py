"""Custom classes on the fleet ``make run`` starts: what training costs, what it learns, and what
serving custom models costs.

1. a ResNet50 custom model trained through Nginx on 4 colour classes x 25 photos (the dataset the
   tests generate: colour-level classes, what a random backbone can learn), default options: the
   job's time from its ``started_at`` to ``finished_at``, its held-out accuracy, and the accuracy on
   100 fresh photos sent to ``/v1/predict?model=<name>``;
2. ten more custom models on ResNet50 (copies of that one under other names): the resident memory
   of the processes that hold them (the ResNet50 service and the gateway) before and after;
3. the same photos with ``fine_tune_layers=11`` (ResNet50's last block trained with the head): the
   training's time to publication and the time until the fleet serves it (the ResNet50 service
   converts and warms it), its accuracies, the ResNet50 service's resident memory before and after
   it is served (its own copy of the backbone), and batch-1 latency through Nginx, median of 20
   sequential requests each with a photo of its own, beside the base model's.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import requests

from bench import jobs
from bench.fleets import admin_session
from bench.jobs import moment
from deploy.local.running import RunningFleet, rss_mb, wait_until
from tests import colours

NAME, TUNED = "bench-colours", "bench-colours-tuned"


def _listed(session: requests.Session, url: str) -> set[str]:
    return {m["name"] for m in session.get(f"{url}/v1/models", timeout=10).json()["models"]}


def _train(
    session: requests.Session,
    url: str,
    name: str,
    per_class: int,
    fresh: list[tuple[str, bytes]],
    **fields: Any,
) -> dict[str, Any]:
    """Train ``name`` through Nginx as ``session``'s principal, wait for it, and score it on the
    fresh photos."""
    answer = session.post(
        f"{url}/v1/training",
        files={"dataset": ("photos.zip", colours.archive(per_class, seed=1))},
        data={"name": name, "base": "resnet50", **{k: str(v) for k, v in fields.items()}},
        timeout=300,
    )
    answer.raise_for_status()
    last = jobs.wait_finished(session, url, answer.json()["job_id"], 1800)
    trained = {
        "status": last["status"],
        "images": last["total"],
        "epochs": last.get("epochs_total") or last["options"]["epochs"],
        "seconds": round(jobs.duration_s(last), 1),
        "held_out_accuracy": (last.get("evaluation") or {}).get("accuracy"),
        "held_out_images": (last.get("evaluation") or {}).get("images"),
        "serving": (last.get("served") or {}).get("serving"),
    }
    if last.get("published_at"):
        trained["to_published_s"] = round(moment(last["published_at"]) - moment(last["started_at"]), 1)
        trained["published_to_served_s"] = round(
            moment(last["finished_at"]) - moment(last["published_at"]), 1
        )
    right = 0
    for label, image in fresh:
        reply = classify(session, url, name, image)
        right += reply.status_code == 200 and reply.json()["predictions"][0]["label"] == label
    trained["fresh_accuracy"] = round(right / len(fresh), 4)
    trained["fresh_images"] = len(fresh)
    return trained


def classify(session: requests.Session, url: str, model: str, image: bytes) -> requests.Response:
    return session.post(
        f"{url}/v1/predict?model={model}&top_k=1",
        data=image,
        headers={"Content-Type": "image/jpeg"},
        timeout=60,
    )


def _p50_ms(session: requests.Session, url: str, model: str, photos: list[tuple[str, bytes]]) -> float:
    times = []
    for _, image in photos:
        started = time.perf_counter()
        classify(session, url, model, image).raise_for_status()
        times.append((time.perf_counter() - started) * 1000)
    return round(float(sorted(times)[len(times) // 2]), 1)


def measure_on(fleet: RunningFleet, per_class: int = 25, fresh: int = 25) -> dict[str, Any]:
    url, session = fleet.url, admin_session(fleet)  # custom models are their owner's: train as one
    photos = colours.images(fresh, seed=1234)
    trained = _train(session, url, NAME, per_class, photos)

    pids = fleet.pids()
    holders = ("resnet50", "gateway")
    before = {name: rss_mb(pids[name]) for name in holders}
    repository = Path(fleet.fleet.environment()["CUSTOM_MODELS_DIR"])
    source = repository / NAME / "1"
    names = [f"bench-copy-{n}" for n in range(10)]
    for name in names:
        shutil.copytree(source, repository / name / "1")
    wait_until(lambda: set(names) <= _listed(session, url), 60, "ten more custom models to be listed")
    for name in names:
        classify(session, url, name, photos[0][1])
    time.sleep(1)
    after = {name: rss_mb(pids[name]) for name in holders}
    for name in [*names, NAME]:
        session.delete(f"{url}/v1/models/{name}", timeout=10)

    service_before = rss_mb(pids["resnet50"])
    tuned = _train(session, url, TUNED, per_class, photos, fine_tune_layers=11)
    latency = {  # each request a photo of its own: the response cache never answers
        "resnet50_p50_ms": _p50_ms(session, url, "resnet50", colours.images(5, seed=4321)),
        "fine_tuned_p50_ms": _p50_ms(session, url, TUNED, colours.images(5, seed=5432)),
    }
    tuned |= {
        "fine_tune_layers": 11,
        "resnet50_service_mb": {"before": service_before, "after": rss_mb(pids["resnet50"])},
        **latency,
    }
    tuned["added_mb"] = round(tuned["resnet50_service_mb"]["after"] - service_before, 1)
    session.delete(f"{url}/v1/models/{TUNED}", timeout=10)
    # The service closes a removed model once requests that hold it are answered (the default
    # deadline + 5 s): the copy's memory goes back then - and before the benchmark measures on.
    deleted = time.monotonic()
    try:
        wait_until(lambda: rss_mb(pids["resnet50"]) <= service_before + 50, 120, "the copy to be released")
        tuned["released_after_s"] = round(time.monotonic() - deleted, 1)
    except TimeoutError:
        tuned["released_after_s"] = None
    tuned["resnet50_service_mb"]["released"] = rss_mb(pids["resnet50"])
    return {
        "training": trained,
        "ten_models_mb": {
            "before": before,
            "after": after,
            "added": round(sum(after.values()) - sum(before.values()), 1),
        },
        "fine_tuned": tuned,
    }
