"""The job routes on a real Redis (the broker and the record) with a fake model gateway: what a
submission writes and queues, what a refusal leaves behind (nothing), and how results read."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import pytest
import redis

from common.errors import InvalidImage
from common.jobs.settings import JobSettings
from common.jobs.store import JobStore, connect
from common.outcomes import Failed, Label, Predicted
from gateway.app import create_app
from tests.gateway.fakes import FakeModelClient, redis_gateway
from tests.helpers import gateway_settings, keyed_client, metric_value, photo

CAT, COFFEE = photo("chelsea.jpg"), photo("coffee.jpg")


@pytest.fixture
def jobs_dir(tmp_path: Path) -> Path:
    return tmp_path / "jobs"


@pytest.fixture
def jobs_gateway(redis_url: str, jobs_dir: Path) -> Any:
    jobs = JobSettings(redis_url=redis_url, dir=str(jobs_dir), chunk_images=4, max_images=10)
    return keyed_client(redis_gateway(redis_url, jobs))


def zipped(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def queued(redis_url: str) -> list[list[Any]]:
    """The (job id, chunk) of every task waiting in the Celery queue, oldest first."""
    raw = redis.Redis.from_url(redis_url).lrange("jobs", 0, -1)
    return [json.loads(json.loads(m)["headers"]["argsrepr"].replace("'", '"')) for m in reversed(raw)]


def test_an_archive_is_unpacked_chunked_and_queued(jobs_gateway: Any, redis_url: str, jobs_dir: Path) -> None:
    archive = zipped({f"b/{i}.jpg": CAT for i in range(5)} | {"a.jpg": COFFEE, ".DS_Store": b"x"})
    answer = jobs_gateway.post(
        "/v1/jobs?model=resnet50&top_k=3", data={"archive": (io.BytesIO(archive), "photos.zip")}
    )
    assert answer.status_code == 202, answer.json
    body = answer.json
    assert answer.headers["Location"] == f"/v1/jobs/{body['job_id']}"
    assert (body["status"], body["total"], body["model"], body["top_k"]) == ("pending", 6, "resnet50", 3)
    assert queued(redis_url) == [[body["job_id"], 0], [body["job_id"], 1]]  # 6 images, 4 a chunk
    folder = jobs_dir / body["job_id"]
    first = json.loads((folder / "chunks" / "000000.json").read_text())
    assert [item["name"] for item in first] == ["a.jpg", "b/0.jpg", "b/1.jpg", "b/2.jpg"]
    assert (folder / first[0]["file"]).read_bytes() == COFFEE
    assert not list(folder.glob("upload*"))  # the archive itself is not kept once unpacked
    status = jobs_gateway.get(f"/v1/jobs/{body['job_id']}").json
    assert (status["status"], status["done"], status["progress"], status["eta_s"]) == (
        "pending",
        0,
        0.0,
        None,
    )


def test_files_and_json_bodies(jobs_gateway: Any, redis_url: str) -> None:
    files = jobs_gateway.post("/v1/jobs?model=vgg16", data={"files": [(io.BytesIO(CAT), "cat.jpg")] * 3})
    assert files.status_code == 202 and files.json["total"] == 3
    urls = jobs_gateway.post(
        "/v1/jobs?models=vgg16,resnet50&vote=hard", json={"urls": ["https://example.com/a.jpg"]}
    )
    assert urls.status_code == 202, urls.json
    assert (urls.json["model"], urls.json["members"], urls.json["vote"]) == (
        "ensemble",
        ["vgg16", "resnet50"],
        "hard",
    )
    assert len(queued(redis_url)) == 2


@pytest.mark.parametrize(
    ("query", "kwargs", "status", "code"),
    [
        ("model=nope", {"json": {"urls": ["https://e.com/a.jpg"]}}, 404, "unknown_model"),
        ("", {"json": {"urls": ["https://e.com/a.jpg"]}}, 400, "bad_request"),
        ("model=vgg16", {"json": {"urls": []}}, 400, "bad_request"),
        ("model=vgg16", {"json": {"urls": ["https://e.com/a.jpg"] * 11}}, 400, "too_many_images"),
        ("model=vgg16", {"json": [1, 2]}, 400, "bad_request"),
        ("model=vgg16", {"data": b"{", "content_type": "application/json"}, 400, "invalid_json"),
        ("model=vgg16", {"data": CAT, "content_type": "image/jpeg"}, 415, "unsupported_media_type"),
        ("model=vgg16", {"data": {"files": [(io.BytesIO(CAT), "c.jpg")] * 11}}, 400, "too_many_images"),
        (
            "model=vgg16",
            {"data": {"archive": (io.BytesIO(b"PK\x03\x04junk"), "a.zip")}},
            400,
            "invalid_archive",
        ),
        (
            "model=vgg16",
            {"data": {"archive": (io.BytesIO(zipped({"../x.jpg": CAT})), "a.zip")}},
            400,
            "unsafe_archive",
        ),
        (
            "model=vgg16",
            {"json": {"urls": ["https://e.com/a.jpg"], "callback_url": "ftp://e.com/"}},
            400,
            "bad_request",
        ),
        (
            "model=vgg16&callback_url=https://e.com/q",
            {"json": {"urls": ["https://e.com/a.jpg"], "callback_url": "https://e.com/b"}},
            400,
            "bad_request",
        ),
        ("model=vgg16", {"json": {"urls": ["https://e.com/a.jpg"], "images": []}}, 400, "bad_request"),
    ],
)
def test_a_refusal_is_a_json_4xx_and_leaves_nothing(
    jobs_gateway: Any,
    redis_url: str,
    jobs_dir: Path,
    query: str,
    kwargs: dict[str, Any],
    status: int,
    code: str,
) -> None:
    answer = jobs_gateway.post(f"/v1/jobs?{query}", **kwargs)
    assert (answer.status_code, answer.json["error"]["code"]) == (status, code), answer.json
    assert queued(redis_url) == [] and jobs_gateway.get("/v1/jobs").json["jobs"] == []
    assert not jobs_dir.exists() or list(jobs_dir.iterdir()) == []


def test_results_read_in_input_order_in_three_formats(
    jobs_gateway: Any, redis_url: str, jobs_dir: Path
) -> None:
    job_id = jobs_gateway.post(
        "/v1/jobs?model=vgg16&top_k=2", json={"urls": ["https://e.com/a.jpg"] * 6}
    ).json["job_id"]
    store = JobStore(connect(redis_url, retries=1), jobs_dir, 3600)
    prediction = (Label("tabby", 281, 0.5), Label("tiger_cat", 282, 0.25))
    store.write_results(job_id, 1, [Predicted(i, f"n{i}", prediction) for i in (4, 5)])
    store.record(job_id, 1, 2, 0, {"vgg16": "random"})
    store.write_results(
        job_id,
        0,
        [Failed(0, "n0", InvalidImage("bad"))] + [Predicted(i, f"n{i}", prediction) for i in (1, 2, 3)],
    )
    store.record(job_id, 0, 3, 1, None)
    status = jobs_gateway.get(f"/v1/jobs/{job_id}").json
    assert (status["status"], status["done"], status["failed"]) == ("completed", 5, 1)
    as_json = jobs_gateway.get(f"/v1/jobs/{job_id}/results").json
    assert [r["index"] for r in as_json["results"]] == list(range(6)) and as_json["status"] == "completed"
    lines = jobs_gateway.get(f"/v1/jobs/{job_id}/results?format=jsonl").data.decode().splitlines()
    assert [json.loads(line)["index"] for line in lines] == list(range(6))
    table = jobs_gateway.get(f"/v1/jobs/{job_id}/results?format=csv")
    assert table.headers["Content-Type"] == "text/csv; charset=utf-8"
    rows = table.data.decode().splitlines()
    assert rows[:3] == [
        "index,name,status,label_1,score_1,label_2,score_2,error_code,error_message",
        "0,n0,error,,,,,invalid_image,bad",
        "1,n1,ok,tabby,0.5,tiger_cat,0.25,,",
    ]
    assert jobs_gateway.get(f"/v1/jobs/{job_id}/results?format=xml").status_code == 400


def test_cancel_and_unknown_jobs(jobs_gateway: Any) -> None:
    job_id = jobs_gateway.post("/v1/jobs?model=vgg16", json={"urls": ["https://e.com/a.jpg"]}).json["job_id"]
    assert jobs_gateway.delete(f"/v1/jobs/{job_id}").json["status"] == "cancelled"
    assert jobs_gateway.delete(f"/v1/jobs/{job_id}").status_code == 200  # twice is harmless
    for path in (f"/v1/jobs/{'0' * 32}", "/v1/jobs/../../etc", f"/v1/jobs/{'f' * 32}/results"):
        answer = jobs_gateway.get(path)
        assert answer.status_code == 404 and answer.json["error"]["code"] in ("unknown_job", "not_found")


def test_a_finished_job_cannot_be_cancelled(jobs_gateway: Any, redis_url: str, jobs_dir: Path) -> None:
    job_id = jobs_gateway.post("/v1/jobs?model=vgg16", json={"urls": ["https://e.com/a.jpg"]}).json["job_id"]
    store = JobStore(connect(redis_url, retries=1), jobs_dir, 3600)
    store.write_results(job_id, 0, [Predicted(0, "a", ())])
    store.record(job_id, 0, 1, 0, None)
    answer = jobs_gateway.delete(f"/v1/jobs/{job_id}")
    assert answer.status_code == 409 and answer.json["error"]["code"] == "job_not_active"


def test_the_listing_pages_newest_first(jobs_gateway: Any) -> None:
    ids = [
        jobs_gateway.post("/v1/jobs?model=vgg16", json={"urls": ["https://e.com/a.jpg"]}).json["job_id"]
        for _ in range(5)
    ]
    first = jobs_gateway.get("/v1/jobs?limit=3").json
    assert [j["job_id"] for j in first["jobs"]] == ids[::-1][:3]
    second = jobs_gateway.get(first["next"]).json
    assert [j["job_id"] for j in second["jobs"]] == ids[::-1][3:] and second["next"] is None
    for cursor in ("nan", "1e400", "-1", "1_000"):
        assert jobs_gateway.get(f"/v1/jobs?before={cursor}").status_code == 400


def test_without_redis_the_job_routes_say_so(tmp_path: Path) -> None:
    settings = gateway_settings(rate_limit="")
    app = create_app(
        settings,
        client=FakeModelClient(settings),  # type: ignore[arg-type]
        poll_health=False,
        job_settings=JobSettings(redis_url="", dir=str(tmp_path)),
    )
    answer = keyed_client(app).post("/v1/jobs?model=vgg16", json={"urls": ["https://e.com/a.jpg"]})
    assert answer.status_code == 503 and answer.json["error"]["code"] == "jobs_unavailable"
    down = create_app(
        settings,
        client=FakeModelClient(settings),  # type: ignore[arg-type]
        poll_health=False,
        job_settings=JobSettings(redis_url="redis://127.0.0.1:1", dir=str(tmp_path)),
    )
    answer = keyed_client(down).get("/v1/jobs")
    assert answer.status_code == 503 and answer.json["error"]["code"] == "jobs_unavailable"


def test_metrics_count_jobs_by_state_and_the_queue(jobs_gateway: Any) -> None:
    for _ in range(2):
        jobs_gateway.post("/v1/jobs?model=vgg16", json={"urls": ["https://e.com/a.jpg"] * 5})
    text = jobs_gateway.get("/metrics").data.decode()
    assert metric_value(text, "imagerec_jobs", state="pending") == 2
    assert metric_value(text, "imagerec_job_queue_length") == 4  # 2 chunks each
    assert metric_value(text, "imagerec_job_images_total", outcome="done") == 0


def test_csv_cells_that_look_like_formulas_are_defused() -> None:
    from gateway.job_results import _cell

    assert [_cell(v) for v in ("=SUM(A1)", "+1", "-x", "@cmd", "cat", 0.5, -0.5)] == [
        "'=SUM(A1)",
        "'+1",
        "'-x",
        "'@cmd",
        "cat",
        0.5,
        -0.5,
    ]
