"""Tenancy on the real fleet through Nginx, with the default auth settings, a real Redis and
Celery: two principals and the admin, as a hostile client would try them."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import time
import zipfile
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests

from deploy.local.running import wait_until
from deploy.settings import NginxSettings
from tests.e2e import shapes
from tests.e2e.running import E2EFleet

pytestmark = pytest.mark.e2e


def make_key(fleet: E2EFleet, name: str, scopes: list[str], **quotas: int) -> dict[str, str]:
    body = {"name": name, "scopes": scopes, "quotas": quotas}
    answer = requests.post(f"{fleet.url}/v1/keys", json=body, headers=fleet.admin, timeout=10)
    assert answer.status_code == 201, answer.text
    return {"Authorization": f"Bearer {answer.json()['key']}", "id": answer.json()["id"]}


def headers(key: dict[str, str]) -> dict[str, str]:
    return {"Authorization": key["Authorization"]}


def job_body(count: int) -> dict[str, Any]:
    images, _ = shapes.dataset(count, seed=7)
    return {"images": [base64.b64encode(image).decode() for image in images]}


def error(answer: requests.Response) -> tuple[int, str]:
    assert answer.headers["Content-Type"].startswith("application/json"), answer.text[:200]
    return answer.status_code, answer.json()["error"]["code"]


def test_an_upload_without_a_valid_key_is_refused_by_nginx_before_its_body(fleet: E2EFleet) -> None:
    viewer = make_key(fleet, "e2e-viewer", ["predict"])
    # Nginx would spool this; it is refused on its headers instead. Larger than every other
    # route's body limit, so the error page it is redirected to must not apply that limit again.
    body = b"x" * ((int(NginxSettings().max_body_size.removesuffix("m")) + 2) * 1024 * 1024)
    kinds = {"Content-Type": "multipart/form-data; boundary=b"}
    for extra, expected in (({}, (401, "unauthorized")), (headers(viewer), (403, "forbidden"))):
        for route in ("/v1/jobs?model=shapes", "/v1/training?name=e2e-x"):
            answer = requests.post(f"{fleet.url}{route}", data=body, headers={**kinds, **extra}, timeout=30)
            assert error(answer) == expected, (route, answer.text[:200])
            assert answer.headers["X-Request-ID"]
    bad = {"Authorization": "Bearer irk_000000000000_" + "A" * 43}
    assert error(requests.get(f"{fleet.url}/v1/jobs", headers=bad, timeout=10)) == (401, "unauthorized")
    image = shapes.dataset(1, 3)[0][0]
    anonymous = requests.post(
        f"{fleet.url}/v1/predict?model=shapes", files={"file": ("a.png", image)}, timeout=30
    )
    assert anonymous.status_code == 200  # anonymous callers still predict


def answer_before_the_body(fleet: E2EFleet, method: str, target: str) -> tuple[int, dict[str, Any]]:
    """Declare a 300 MB upload, send 1 MB of it, then wait for the answer: an Nginx that spooled
    the body would wait for the other 299 MB, and this read would time out."""
    address = urlsplit(fleet.url)
    with socket.create_connection((address.hostname, address.port), timeout=30) as sock:
        head = (
            f"{method} {target} HTTP/1.1\r\nHost: {address.netloc}\r\nContent-Length: {300 * 1024 * 1024}\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\n\r\n"
        )
        sock.sendall(head.encode())
        sock.sendall(b"x" * 1024 * 1024)
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    status = int(reply.split(b" ", 2)[1])
    return status, json.loads(reply.split(b"\r\n\r\n", 1)[1])


def test_an_upload_to_a_wrong_method_or_spelling_is_refused_before_its_body(fleet: E2EFleet) -> None:
    """Every way to the upload routes gets the key check (or a route's refusal) before Nginx reads
    the body; every other spelling is held to the 10 MB every other route allows."""
    for method, target, expected in (
        ("PUT", "/v1/jobs?model=shapes", (405, "method_not_allowed")),
        ("PATCH", "/v1/training", (405, "method_not_allowed")),
        ("DELETE", "/v1/jobs", (405, "method_not_allowed")),
        ("POST", "/v1/%6Aobs?model=shapes", (401, "unauthorized")),
        ("POST", "//v1//training", (401, "unauthorized")),
        ("POST", "/v1/jobs/", (413, "payload_too_large")),
        ("POST", "/v1/JOBS", (413, "payload_too_large")),
    ):
        status, body = answer_before_the_body(fleet, method, target)
        assert (status, body["error"]["code"]) == expected, (method, target, body)


def test_a_keyed_upload_larger_than_other_routes_allow_is_taken(fleet: E2EFleet) -> None:
    """Nginx checks the key with a subrequest that carries the upload's Content-Length: above the
    10 MB every other route allows, that check must still run (it answered 503 before)."""
    uploader = make_key(fleet, "e2e-uploader", ["jobs"])
    limit = int(NginxSettings().max_body_size.removesuffix("m")) * 1024 * 1024
    photo = shapes.dataset(1, seed=11)[0][0]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("photo.png", photo)
        for part in range(2):  # not images: each fails alone, under the per-file limit
            archive.writestr(f"padding-{part}.bin", os.urandom(limit // 2 + 1024 * 1024))
    body = buffer.getvalue()
    assert len(body) > limit
    answer = requests.post(
        f"{fleet.url}/v1/jobs?model=shapes",
        files={"archive": ("photos.zip", body, "application/zip")},
        headers=headers(uploader),
        timeout=120,
    )
    assert answer.status_code == 202, answer.text[:300]
    status_url, last = f"{fleet.url}/v1/jobs/{answer.json()['job_id']}", {}

    def finished() -> bool:
        last.update(requests.get(status_url, headers=headers(uploader), timeout=10).json())
        return last["status"] not in ("pending", "running")

    wait_until(finished, 120, "the large job to finish")
    assert (last["status"], last["done"], last["failed"]) == ("completed", 1, 2)  # all of it arrived


def test_a_principal_sees_only_its_own_jobs(fleet: E2EFleet) -> None:
    alice, bob = make_key(fleet, "e2e-alice", ["jobs"]), make_key(fleet, "e2e-bob", ["jobs"])
    submitted = requests.post(
        f"{fleet.url}/v1/jobs?model=shapes", json=job_body(3), headers=headers(alice), timeout=60
    )
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["job_id"]
    for method, path in (("get", ""), ("get", "/results"), ("delete", "")):
        answer = requests.request(
            method, f"{fleet.url}/v1/jobs/{job_id}{path}", headers=headers(bob), timeout=10
        )
        assert error(answer) == (404, "unknown_job")
    assert requests.get(f"{fleet.url}/v1/jobs", headers=headers(bob), timeout=10).json()["jobs"] == []
    mine = requests.get(f"{fleet.url}/v1/jobs", headers=headers(alice), timeout=10).json()["jobs"]
    assert [job["job_id"] for job in mine] == [job_id]
    everyone = requests.get(f"{fleet.url}/v1/jobs?limit=100", headers=fleet.admin, timeout=10).json()["jobs"]
    assert job_id in [job["job_id"] for job in everyone]

    def done() -> bool:
        status = requests.get(f"{fleet.url}/v1/jobs/{job_id}", headers=headers(alice), timeout=10).json()
        return bool(status["status"] == "completed")

    wait_until(done, 60, "alice's job to complete (bob's cancel did nothing)")


def test_quotas_refuse_with_their_figures_and_leave_no_job(fleet: E2EFleet) -> None:
    carol = make_key(fleet, "e2e-carol", ["jobs"], active_jobs=0)
    dave = make_key(fleet, "e2e-dave", ["jobs"], job_images=2)
    refused = requests.post(
        f"{fleet.url}/v1/jobs?model=shapes", json=job_body(1), headers=headers(carol), timeout=60
    )
    assert error(refused) == (429, "quota_exceeded") and refused.headers["Retry-After"]
    assert (refused.json()["error"]["quota"], refused.json()["error"]["limit"]) == ("active_jobs", 0)
    too_many = requests.post(
        f"{fleet.url}/v1/jobs?model=shapes", json=job_body(3), headers=headers(dave), timeout=60
    )
    assert error(too_many) == (429, "quota_exceeded") and too_many.json()["error"]["quota"] == "job_images"
    for key in (carol, dave):
        assert requests.get(f"{fleet.url}/v1/jobs", headers=headers(key), timeout=10).json()["jobs"] == []


def test_a_revoked_key_is_refused_by_every_gateway_worker_within_5_s(fleet: E2EFleet) -> None:
    key = make_key(fleet, "e2e-revoked", ["jobs"])
    for _ in range(8):  # keep-alive off: each request may land on either gateway worker
        assert requests.get(f"{fleet.url}/v1/jobs", headers=headers(key), timeout=10).status_code == 200
    revoked = requests.delete(f"{fleet.url}/v1/keys/{key['id']}", headers=fleet.admin, timeout=10)
    assert revoked.status_code == 200
    started = time.monotonic()

    def refused_everywhere() -> bool:
        statuses = [
            requests.get(f"{fleet.url}/v1/jobs", headers=headers(key), timeout=10).status_code
            for _ in range(8)
        ]
        return statuses == [401] * 8

    wait_until(refused_everywhere, 5, "every gateway worker to refuse the revoked key")
    print(f"revocation effective in {time.monotonic() - started:.2f} s")  # a measurement, not an assertion
