"""The Python client and its CLI against a local HTTP server that answers like the fleet (where the
bytes on the wire matter), or ``responses`` (scripted answers to the job commands)."""

from __future__ import annotations

import base64
import csv
import io
import json
import threading
import time
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import responses

from client import Client, ImagerecError
from client.__main__ import main
from tests.client.helpers import multipart_files

ANSWER = {
    "model": "resnet50",
    "weights": "random",
    "predictions": [{"label": "tabby", "class_id": "n02123045", "index": 281, "score": 0.9}],
}


class Fleet(BaseHTTPRequestHandler):
    """Answers from a script: each POST takes the next (status, headers, body); then 200."""

    script: list[tuple[int, dict[str, str], dict]] = []
    seen: list[tuple[float, str, bytes]] = []

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Fleet.seen.append((time.monotonic(), self.path, body))
        status, headers, payload = Fleet.script.pop(0) if Fleet.script else (200, {}, ANSWER)
        data = json.dumps(payload).encode()
        self.send_response(status)
        for key, value in {"Content-Type": "application/json", **headers}.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def fleet_url() -> Iterator[str]:
    Fleet.script, Fleet.seen = [], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Fleet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_predict_sends_the_image_and_parameters(fleet_url: str) -> None:
    body = Client(fleet_url).predict(b"jpeg bytes", model="ensemble", top_k=3, vote="hard")
    assert body["predictions"][0]["label"] == "tabby"
    [(_, path, sent)] = Fleet.seen
    assert path == "/v1/predict?model=ensemble&top_k=3&vote=hard" and sent == b"jpeg bytes"


def test_429_and_503_are_retried_after_retry_after(fleet_url: str) -> None:
    busy = {"error": {"code": "overloaded", "message": "at capacity"}}
    Fleet.script = [(503, {"Retry-After": "1"}, busy), (429, {"Retry-After": "1"}, busy)]
    assert Client(fleet_url).predict(b"x")["model"] == "resnet50"
    times = [t for t, _, _ in Fleet.seen]
    assert len(times) == 3
    assert times[1] - times[0] >= 0.9 and times[2] - times[1] >= 0.9  # it waited as told


def test_errors_carry_the_fleets_json_error(fleet_url: str) -> None:
    Fleet.script = [
        (
            415,
            {},
            {"error": {"code": "unsupported_media_type", "message": "not an image", "request_id": "r1"}},
        )
    ]
    with pytest.raises(ImagerecError) as info:
        Client(fleet_url).predict(b"x")
    assert (info.value.status, info.value.code, info.value.request_id) == (
        415,
        "unsupported_media_type",
        "r1",
    )


def test_giving_up_after_the_retries(fleet_url: str) -> None:
    busy = {"error": {"code": "overloaded", "message": "at capacity"}}
    Fleet.script = [(503, {"Retry-After": "0"}, busy)] * 3
    with pytest.raises(ImagerecError) as info:
        Client(fleet_url, retries=2).predict(b"x")
    assert info.value.code == "overloaded" and len(Fleet.seen) == 3


def test_classify_dir_writes_one_row_per_image(
    fleet_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("a.jpg", "b.png", "sub/c.jpeg", "notes.txt"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"image")
    Fleet.script = [
        (200, {}, ANSWER),
        (400, {}, {"error": {"code": "invalid_image", "message": "truncated"}}),
    ]
    out = tmp_path / "results.csv"
    code = main(
        [
            "--url",
            fleet_url,
            "classify-dir",
            str(tmp_path),
            "--out",
            str(out),
            "--concurrency",
            "1",
            "--quiet",
        ]
    )
    with out.open() as written:
        rows = list(csv.DictReader(written))
    assert code == 1  # one image failed
    assert [Path(r["path"]).name for r in rows] == ["a.jpg", "b.png", "c.jpeg"]
    assert rows[0]["label"] == "tabby" and rows[1]["error"] == "invalid_image: truncated"
    assert "2 classified, 1 failed" in capsys.readouterr().err


def test_predict_command_flags_random_weights(
    fleet_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photo = tmp_path / "cat.jpg"
    photo.write_bytes(b"image")
    assert main(["--url", fleet_url, "predict", str(photo)]) == 0
    printed = capsys.readouterr().out
    assert "RANDOM weights" in printed and "tabby" in printed


# --- asynchronous jobs ------------------------------------------------------------------------

JOB_ID = "8f14e45fceea167a5a36dedd4bea2543"
URL = "http://fleet.test"


def job(status: str = "pending", done: int = 0, failed: int = 0) -> dict[str, Any]:
    return {
        "job_id": JOB_ID,
        "status": status,
        "model": "shapes",
        "top_k": 1,
        "total": 6,
        "done": done,
        "failed": failed,
        "progress": (done + failed) / 6,
        "images_per_s": 3.0 if done else 0.0,
        "eta_s": 1.0 if status == "running" else None,
        "created_at": "2026-11-20T10:00:00Z",
        "links": {"self": f"/v1/jobs/{JOB_ID}", "results": f"/v1/jobs/{JOB_ID}/results"},
    }


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """A folder of files to send, hidden ones among them."""
    folder = tmp_path / "photos"
    for name in ("b.png", "a.jpg", "sub/c.jpeg", "notes.txt", ".DS_Store", ".git/config"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(f"bytes of {name}".encode())
    return folder


def test_job_submit_sends_a_folder_as_a_zip_archive_part(
    fleet_url: str, photos: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    busy = {"error": {"code": "jobs_unavailable", "message": "Redis is restarting"}}
    Fleet.script = [(503, {"Retry-After": "0"}, busy), (202, {"Location": f"/v1/jobs/{JOB_ID}"}, job())]
    code = main(["--url", fleet_url, "job", "submit", str(photos), "--model", "shapes", "--top-k", "3"])
    assert code == 0 and capsys.readouterr().out == f"{JOB_ID}\n"
    [(_, path, first), (_, _, sent)] = Fleet.seen
    assert path == "/v1/jobs?model=shapes&top_k=3"
    assert sent == first  # the streamed body was rewound and sent whole again after the 503
    [(field, (filename, data))] = multipart_files(sent).items()
    assert (field, filename) == ("archive", "photos.zip")
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.namelist() == ["a.jpg", "b.png", "notes.txt", "sub/c.jpeg"]  # no hidden files
        assert archive.read("sub/c.jpeg") == b"bytes of sub/c.jpeg"


def test_job_submit_sends_an_archive_as_it_is(fleet_url: str, tmp_path: Path) -> None:
    archive = tmp_path / "batch.tar.gz"
    archive.write_bytes(b"\x1f\x8b not really a tarball" * 1000)
    Fleet.script = [(202, {}, job())]
    accepted = Client(fleet_url).submit_job(archive, models=["vgg16", "resnet50"], vote="hard")
    assert accepted["job_id"] == JOB_ID
    [(_, path, sent)] = Fleet.seen
    assert path == "/v1/jobs?models=vgg16%2Cresnet50&vote=hard"
    assert multipart_files(sent) == {"archive": ("batch.tar.gz", archive.read_bytes())}


def test_job_submit_refuses_an_empty_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / ".hidden").write_bytes(b"x")
    assert main(["--url", URL, "job", "submit", str(tmp_path)]) == 1
    assert capsys.readouterr().err == f"error: no files under {tmp_path}\n"


@pytest.mark.parametrize(("final", "code"), [("completed", 0), ("failed", 1), ("cancelled", 1)])
@responses.activate
def test_job_submit_wait_polls_until_the_job_ends(
    photos: Path, capsys: pytest.CaptureFixture[str], final: str, code: int
) -> None:
    responses.post(f"{URL}/v1/jobs", status=202, json=job())
    for state in (job("pending"), job("running", done=3), job(final, done=5, failed=1)):
        responses.get(f"{URL}/v1/jobs/{JOB_ID}", json=state)  # answered in turn, one per poll
    argv = ["--url", URL, "job", "submit", str(photos), "--model", "shapes", "--wait", "--interval", "0"]
    assert main(argv) == code
    printed = capsys.readouterr()
    assert printed.out == f"{JOB_ID}\n"
    assert [call.request.method for call in responses.calls] == ["POST", "GET", "GET", "GET"]
    assert "6/6" in printed.err  # the progress bar reached the end
    assert printed.err.endswith(f"job {JOB_ID} {final}: 5 done, 1 failed of 6\n")


@pytest.mark.parametrize(("status", "note"), [("completed", ""), ("running", "not final")])
@responses.activate
def test_job_results_stream_into_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], status: str, note: str
) -> None:
    table = "index,name,status,label_1,score_1,error_code,error_message\n0,a.jpg,ok,circle,0.9,,\n"
    call = responses.get(f"{URL}/v1/jobs/{JOB_ID}/results", body=table, headers={"X-Job-Status": status})
    out = tmp_path / "results.csv"
    assert main(["--url", URL, "job", "results", JOB_ID, "--format", "csv", "--output", str(out)]) == 0
    assert out.read_text() == table and [p.name for p in tmp_path.iterdir()] == ["results.csv"]
    assert call.calls[0].request.url.endswith("?format=csv")
    assert note in capsys.readouterr().err


@responses.activate
def test_job_cancel_prints_the_cancelled_job(capsys: pytest.CaptureFixture[str]) -> None:
    responses.delete(f"{URL}/v1/jobs/{JOB_ID}", json=job("cancelled", done=2))
    assert main(["--url", URL, "job", "cancel", JOB_ID]) == 0
    assert capsys.readouterr().out == f"job {JOB_ID} cancelled: 2 done, 0 failed of 6\n"


@responses.activate
def test_job_list_prints_a_line_per_job_and_the_next_cursor(capsys: pytest.CaptureFixture[str]) -> None:
    page = {
        "jobs": [job("completed", done=6), job("running", done=3)],
        "next": "/v1/jobs?limit=2&before=17.5",
    }
    responses.get(f"{URL}/v1/jobs", json=page)
    assert main(["--url", URL, "job", "list", "--limit", "2"]) == 0
    printed = capsys.readouterr()
    assert [line.split()[:2] for line in printed.out.splitlines()] == [
        [JOB_ID, "completed"],
        [JOB_ID, "running"],
    ]
    assert "--before 17.5" in printed.err


@pytest.mark.parametrize(
    ("argv", "method", "path", "status", "code"),
    [
        (["job", "status", JOB_ID], "GET", f"/v1/jobs/{JOB_ID}", 404, "unknown_job"),
        (["job", "cancel", JOB_ID], "DELETE", f"/v1/jobs/{JOB_ID}", 409, "job_not_active"),
        (
            ["job", "results", JOB_ID, "--output", "{out}"],
            "GET",
            f"/v1/jobs/{JOB_ID}/results",
            404,
            "unknown_job",
        ),
    ],
)
@responses.activate
def test_job_commands_print_the_fleets_error_message(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    method: str,
    path: str,
    status: int,
    code: str,
) -> None:
    message = f"the fleet says {code}"
    responses.add(method, f"{URL}{path}", status=status, json={"error": {"code": code, "message": message}})
    out = tmp_path / "results.json"
    assert main(["--url", URL, *(arg.format(out=out) for arg in argv)]) == 1
    assert capsys.readouterr().err == f"error: {message}\n"
    assert list(tmp_path.iterdir()) == []  # no results file, not even a partial one


def test_predict_asks_for_parents_a_hedged_answer_and_filters(
    fleet_url: str, capsys: pytest.CaptureFixture
) -> None:
    hedged = {"class_id": "n02121620", "name": "cat", "score": 0.95, "confidence": 0.9, "classes": 13}
    parents = [{"class_id": "n02121808", "name": "domestic cat"}, {"class_id": "n00001740", "name": "entity"}]
    answer = {**ANSWER, "hedged": hedged, "predictions": [{**ANSWER["predictions"][0], "parents": parents}]}
    Fleet.script = [(200, {}, answer)]
    image = Path(__file__).parents[1] / "fixtures" / "chelsea.jpg"
    code = main(
        [
            "--url",
            fleet_url,
            "predict",
            str(image),
            "--parents",
            "--confidence",
            "0.9",
            "--include",
            "animal,n02084071",
        ]
    )
    assert code == 0
    [(_, path, _)] = Fleet.seen
    assert path == "/v1/predict?model=resnet50&top_k=5&parents=true&confidence=0.9&include=animal%2Cn02084071"
    printed = capsys.readouterr().out
    assert "at least 90% sure: cat (95.00%)" in printed and "domestic cat > entity" in printed


def test_explain_writes_the_overlay_and_prints_the_grid(
    fleet_url: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    png = b"\x89PNG\r\n\x1a\n-stand-in"
    answer = {
        "model": "resnet50",
        "class": {"label": "tabby", "class_id": "n02123045", "index": 281, "score": 0.5},
        "grid": 2,
        "drops": [[0.25, 0.0], [-0.125, 0.5]],
        "passes": 5,
        "overlay_png": base64.b64encode(png).decode(),
        "note": "random weights: ...",
    }
    Fleet.script = [(200, {}, answer)]
    out = tmp_path / "heat.png"
    code = main(
        [
            "--url",
            fleet_url,
            "explain",
            str(Path(__file__).parents[1] / "fixtures" / "chelsea.jpg"),
            "--grid",
            "2",
            "--class-id",
            "n02123045",
            "--out",
            str(out),
        ]
    )
    assert code == 0 and out.read_bytes() == png
    [(_, path, _)] = Fleet.seen
    assert path == "/v1/explain?model=resnet50&grid=2&class_id=n02123045"
    printed = capsys.readouterr().out
    assert "5 forward passes" in printed and "+0.250 +0.000" in printed and "-0.125 +0.500" in printed
    assert "note: random weights" in printed
