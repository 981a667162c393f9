"""Custom classes on the fleet ``make run`` starts: what training costs, what it learns, and what
serving custom models costs.

1. a ResNet50 custom model trained through Nginx on 4 colour classes x 25 photos (the dataset the
   tests generate: colour-level classes, what a random backbone can learn), default options: the
   job's time from its ``started_at`` to ``finished_at``, its held-out accuracy, and the accuracy on
   100 fresh photos sent to ``/v1/predict?model=<name>``;
2. ten more custom models on ResNet50 (copies of that one under other names): the resident memory
   of the processes that hold them (the ResNet50 service and the gateway) before and after.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import requests

from bench import jobs
from deploy.local.running import RunningFleet, rss_mb, wait_until
from tests import colours

NAME = "bench-colours"


def _listed(url: str) -> set[str]:
    return {m["name"] for m in requests.get(f"{url}/v1/models", timeout=10).json()["models"]}


def measure_on(fleet: RunningFleet, per_class: int = 25, fresh: int = 25) -> dict[str, Any]:
    url = fleet.url
    answer = requests.post(
        f"{url}/v1/training",
        files={"dataset": ("photos.zip", colours.archive(per_class, seed=1))},
        data={"name": NAME, "base": "resnet50"},
        timeout=300,
    )
    answer.raise_for_status()
    last = jobs.wait_finished(url, answer.json()["job_id"], 1800)
    trained = {
        "status": last["status"],
        "images": last["total"],
        "epochs": last["options"]["epochs"],
        "seconds": round(jobs.duration_s(last), 1),
        "held_out_accuracy": (last.get("evaluation") or {}).get("accuracy"),
        "held_out_images": (last.get("evaluation") or {}).get("images"),
    }
    right = 0
    photos = colours.images(fresh, seed=1234)
    for label, image in photos:
        reply = requests.post(
            f"{url}/v1/predict?model={NAME}&top_k=1",
            data=image,
            headers={"Content-Type": "image/jpeg"},
            timeout=60,
        )
        right += reply.status_code == 200 and reply.json()["predictions"][0]["label"] == label
    trained["fresh_accuracy"] = round(right / len(photos), 4)
    trained["fresh_images"] = len(photos)

    pids = fleet.pids()
    holders = ("resnet50", "gateway")
    before = {name: rss_mb(pids[name]) for name in holders}
    repository = Path(fleet.fleet.environment()["CUSTOM_MODELS_DIR"])
    source = repository / NAME / "1"
    names = [f"bench-copy-{n}" for n in range(10)]
    for name in names:
        shutil.copytree(source, repository / name / "1")
    wait_until(lambda: set(names) <= _listed(url), 60, "ten more custom models to be listed")
    for name in names:
        requests.post(
            f"{url}/v1/predict?model={name}",
            data=photos[0][1],
            headers={"Content-Type": "image/jpeg"},
            timeout=60,
        )
    time.sleep(1)
    after = {name: rss_mb(pids[name]) for name in holders}
    for name in [*names, NAME]:
        requests.delete(f"{url}/v1/models/{name}", timeout=10)
    return {
        "training": trained,
        "ten_models_mb": {
            "before": before,
            "after": after,
            "added": round(sum(after.values()) - sum(before.values()), 1),
        },
    }
