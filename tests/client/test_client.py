"""The Python client and its CLI against a local HTTP server that answers like the fleet."""

from __future__ import annotations

import csv
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from client import Client, ImagerecError
from client.__main__ import main

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
def fleet() -> Iterator[str]:
    Fleet.script, Fleet.seen = [], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Fleet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_predict_sends_the_image_and_parameters(fleet: str) -> None:
    body = Client(fleet).predict(b"jpeg bytes", model="ensemble", top_k=3, vote="hard")
    assert body["predictions"][0]["label"] == "tabby"
    [(_, path, sent)] = Fleet.seen
    assert path == "/v1/predict?model=ensemble&top_k=3&vote=hard" and sent == b"jpeg bytes"


def test_429_and_503_are_retried_after_retry_after(fleet: str) -> None:
    busy = {"error": {"code": "overloaded", "message": "at capacity"}}
    Fleet.script = [(503, {"Retry-After": "1"}, busy), (429, {"Retry-After": "1"}, busy)]
    assert Client(fleet).predict(b"x")["model"] == "resnet50"
    times = [t for t, _, _ in Fleet.seen]
    assert len(times) == 3
    assert times[1] - times[0] >= 0.9 and times[2] - times[1] >= 0.9  # it waited as told


def test_errors_carry_the_fleets_json_error(fleet: str) -> None:
    Fleet.script = [
        (
            415,
            {},
            {"error": {"code": "unsupported_media_type", "message": "not an image", "request_id": "r1"}},
        )
    ]
    with pytest.raises(ImagerecError) as info:
        Client(fleet).predict(b"x")
    assert (info.value.status, info.value.code, info.value.request_id) == (
        415,
        "unsupported_media_type",
        "r1",
    )


def test_giving_up_after_the_retries(fleet: str) -> None:
    busy = {"error": {"code": "overloaded", "message": "at capacity"}}
    Fleet.script = [(503, {"Retry-After": "0"}, busy)] * 3
    with pytest.raises(ImagerecError) as info:
        Client(fleet, retries=2).predict(b"x")
    assert info.value.code == "overloaded" and len(Fleet.seen) == 3


def test_classify_dir_writes_one_row_per_image(
    fleet: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
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
        ["--url", fleet, "classify-dir", str(tmp_path), "--out", str(out), "--concurrency", "1", "--quiet"]
    )
    with out.open() as written:
        rows = list(csv.DictReader(written))
    assert code == 1  # one image failed
    assert [Path(r["path"]).name for r in rows] == ["a.jpg", "b.png", "c.jpeg"]
    assert rows[0]["label"] == "tabby" and rows[1]["error"] == "invalid_image: truncated"
    assert "2 classified, 1 failed" in capsys.readouterr().err


def test_predict_command_flags_random_weights(
    fleet: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photo = tmp_path / "cat.jpg"
    photo.write_bytes(b"image")
    assert main(["--url", fleet, "predict", str(photo)]) == 0
    printed = capsys.readouterr().out
    assert "RANDOM weights" in printed and "tabby" in printed
