"""Keys, scopes, owners and quotas on the gateway, over a real Redis, tried as a hostile client
would: the anonymous caller, the key without the scope, the second principal who guesses an id,
the client who brings too much."""

from __future__ import annotations

import io
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
from werkzeug.datastructures import FileStorage, MultiDict
from werkzeug.test import encode_multipart

from common.jobs.settings import JobSettings
from common.tenancy.owners import Owners
from common.training.settings import TrainingSettings
from deploy.local.running import wait_until
from gateway.app import create_app
from tests import colours
from tests.gateway.fakes import FakeModelClient, redis_gateway
from tests.helpers import ADMIN_KEY, auth_settings, bearer, gateway_settings, photo

CAT = photo("chelsea.jpg")
URLS = {"urls": ["https://e.com/a.jpg"]}


@pytest.fixture
def keyed_gateway(redis_url: str, tmp_path: Path) -> Any:
    """A gateway app, its fake model client and a function that makes keys through the API."""
    fake = FakeModelClient(gateway_settings(rate_limit=""))
    jobs = JobSettings(redis_url=redis_url, dir=str(tmp_path / "jobs"), max_uncompressed_bytes=300_000)
    training = TrainingSettings(models_dir=str(tmp_path / "models"), min_images_per_class=3)
    return redis_gateway(redis_url, jobs, training, fake, key_cache_s=0.2).test_client(), fake


def make_key(client: Any, name: str, scopes: list[str], **quotas: int) -> str:
    answer = client.post(
        "/v1/keys", json={"name": name, "scopes": scopes, "quotas": quotas}, headers=bearer(ADMIN_KEY)
    )
    assert answer.status_code == 201, answer.json
    return str(answer.json["key"])


def code(answer: Any) -> tuple[int, str]:
    return answer.status_code, answer.json["error"]["code"]


def test_anonymous_callers_predict_and_nothing_else(keyed_gateway: Any) -> None:
    client, _ = keyed_gateway
    assert client.post("/v1/predict?model=vgg16", data=CAT, content_type="image/jpeg").status_code == 200
    assert code(client.post("/v1/jobs?model=vgg16", json=URLS)) == (401, "unauthorized")
    assert code(client.get("/v1/jobs")) == (401, "unauthorized")
    assert code(client.delete("/v1/models/pets")) == (401, "unauthorized")
    assert code(client.get("/v1/keys")) == (401, "unauthorized")
    assert code(client.post("/v1/keys", json={"name": "me", "scopes": ["admin"]})) == (401, "unauthorized")


def test_a_key_without_the_scope_is_403_and_a_bad_key_401_everywhere(keyed_gateway: Any) -> None:
    client, _ = keyed_gateway
    predict_only = bearer(make_key(client, "viewer", ["predict"]))
    assert (
        client.post(
            "/v1/predict?model=vgg16", data=CAT, content_type="image/jpeg", headers=predict_only
        ).status_code
        == 200
    )
    assert code(client.post("/v1/jobs?model=vgg16", json=URLS, headers=predict_only)) == (403, "forbidden")
    assert code(client.post("/v1/training", headers=predict_only)) == (403, "forbidden")
    assert code(client.delete("/v1/models/pets", headers=predict_only)) == (403, "forbidden")
    assert code(client.get("/v1/keys", headers=predict_only)) == (403, "forbidden")
    for header in ("Bearer irk_000000000000_" + "x" * 43, "Bearer nonsense", "Basic dXNlcjpwdw=="):
        answer = client.post(
            "/v1/predict?model=vgg16", data=CAT, content_type="image/jpeg", headers={"Authorization": header}
        )
        assert code(answer) == (401, "unauthorized")
    assert client.get("/health/ready", headers={"Authorization": "Bearer nonsense"}).status_code == 200


def test_keys_are_shown_once_listed_without_secrets_and_revoked_everywhere_within_the_cache(
    keyed_gateway: Any,
) -> None:
    client, _ = keyed_gateway
    key = make_key(client, "batch team", ["jobs"], active_jobs=2)
    listed = client.get("/v1/keys", headers=bearer(ADMIN_KEY)).json["keys"]
    assert [k["name"] for k in listed] == ["batch team"] and listed[0]["quotas"] == {"active_jobs": 2}
    assert key not in str(listed) and "hash" not in listed[0]
    assert client.get("/v1/jobs", headers=bearer(key)).status_code == 200
    revoked = client.delete(f"/v1/keys/{listed[0]['id']}", headers=bearer(ADMIN_KEY))
    assert revoked.status_code == 200 and revoked.json["revoked"]["name"] == "batch team"
    assert code(client.get("/v1/jobs", headers=bearer(key))) == (401, "unauthorized")
    assert code(client.delete(f"/v1/keys/{listed[0]['id']}", headers=bearer(ADMIN_KEY))) == (
        404,
        "unknown_key",
    )


@pytest.mark.parametrize(
    "body",
    [
        {"name": "", "scopes": ["jobs"]},
        {"name": "x" * 65, "scopes": ["jobs"]},
        {"name": "ok", "scopes": ["root"]},
        {"name": "ok", "scopes": []},
        {"name": "ok", "scopes": ["jobs"], "quotas": {"active_jobs": -1}},
        {"name": "ok", "scopes": ["jobs"], "quotas": {"disk": 1}},
        ["not", "an", "object"],
    ],
)
def test_a_bad_key_request_is_a_400_naming_it(keyed_gateway: Any, body: Any) -> None:
    client, _ = keyed_gateway
    answer = client.post("/v1/keys", json=body, headers=bearer(ADMIN_KEY))
    assert answer.status_code == 400 and client.get("/v1/keys", headers=bearer(ADMIN_KEY)).json["keys"] == []


def test_jobs_belong_to_their_owner_and_others_get_404(keyed_gateway: Any) -> None:
    client, _ = keyed_gateway
    alice, bob = bearer(make_key(client, "alice", ["jobs"])), bearer(make_key(client, "bob", ["jobs"]))
    job = client.post("/v1/jobs?model=vgg16", json=URLS, headers=alice).json["job_id"]
    assert client.get(f"/v1/jobs/{job}", headers=alice).status_code == 200
    for method, path in (("get", ""), ("get", "/results"), ("delete", "")):
        answer = getattr(client, method)(f"/v1/jobs/{job}{path}", headers=bob)
        assert code(answer) == (404, "unknown_job")
        assert answer.json["error"]["message"] == getattr(client, method)(
            f"/v1/jobs/{'0' * 32}{path}", headers=bob
        ).json["error"]["message"].replace("0" * 32, job)
    assert client.get("/v1/jobs", headers=bob).json["jobs"] == []
    assert [j["job_id"] for j in client.get("/v1/jobs", headers=alice).json["jobs"]] == [job]
    assert [j["job_id"] for j in client.get("/v1/jobs", headers=bearer(ADMIN_KEY)).json["jobs"]] == [job]
    assert (
        client.get(f"/v1/jobs/{job}", headers=alice).json["status"] == "pending"
    )  # bob's cancel did nothing


def test_a_quota_refuses_with_its_figures_and_leaves_nothing(keyed_gateway: Any, tmp_path: Path) -> None:
    client, _ = keyed_gateway
    carol = bearer(make_key(client, "carol", ["jobs"], active_jobs=1, job_images=2))
    assert client.post("/v1/jobs?model=vgg16", json=URLS, headers=carol).status_code == 202
    refused = client.post("/v1/jobs?model=vgg16", json=URLS, headers=carol)
    assert refused.status_code == 429 and refused.headers["Retry-After"]
    assert {k: refused.json["error"][k] for k in ("code", "quota", "limit", "used")} == {
        "code": "quota_exceeded",
        "quota": "active_jobs",
        "limit": 1,
        "used": 1,
    }
    assert len(client.get("/v1/jobs", headers=carol).json["jobs"]) == 1
    assert [p.name for p in (tmp_path / "jobs").iterdir() if not p.name.startswith(".")].__len__() == 1
    dave = bearer(make_key(client, "dave", ["jobs"], job_images=2))
    many = client.post("/v1/jobs?model=vgg16", json={"urls": ["https://e.com/a.jpg"] * 3}, headers=dave)
    assert code(many) == (429, "quota_exceeded") and many.json["error"]["quota"] == "job_images"


def zipped(count: int, size: int) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for n in range(count):
            archive.writestr(f"{n}.jpg", bytes([n % 256]) * size)
    return buffer.getvalue()


def test_one_meter_counts_every_archive_part_of_a_request(keyed_gateway: Any, tmp_path: Path) -> None:
    """Each archive is under JOBS_MAX_UNCOMPRESSED_BYTES (300 kB here), the request is not."""
    client, _ = keyed_gateway
    part = zipped(2, 100_000)  # 200 kB unpacked, well compressed
    answer = client.post(
        "/v1/jobs?model=vgg16",
        data={"archive": [(io.BytesIO(part), "a.zip"), (io.BytesIO(part), "b.zip")]},
        headers=bearer(ADMIN_KEY),
    )
    assert answer.status_code == 413, answer.json
    assert not [p for p in (tmp_path / "jobs").iterdir() if not p.name.startswith(".")]
    parts = {"archive": [(io.BytesIO(zipped(1, 10)), f"{n}.zip") for n in range(5)]}
    assert code(client.post("/v1/jobs?model=vgg16", data=parts, headers=bearer(ADMIN_KEY))) == (
        400,
        "too_many_parts",
    )


def job_folders(root: Path) -> list[Path]:
    """Jobs written, staging folders of uploads under way or left behind included."""
    return sorted(root.iterdir()) if root.exists() else []


def test_four_uploads_at_once_under_one_key_keep_no_more_than_its_job_bytes(
    keyed_gateway: Any, redis_url: str, tmp_path: Path
) -> None:
    """Each upload reserves the bytes it declares before a byte is read: of four 120 kB uploads
    against 300 kB, two are kept; the others are refused unread, and so is a fifth."""
    client, _ = keyed_gateway
    erin = bearer(make_key(client, "erin", ["jobs"], job_bytes=300_000, active_jobs=8))
    start = threading.Barrier(4)

    def send(n: int) -> Any:
        files = {"files": (io.BytesIO(bytes([n]) * 120_000), f"{n}.jpg")}
        start.wait()
        return client.application.test_client().post("/v1/jobs?model=vgg16", data=files, headers=erin)

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(send, range(4)))
    assert sorted(a.status_code for a in answers) == [202, 202, 429, 429], [a.json for a in answers]
    assert {a.json["error"]["quota"] for a in answers if a.status_code == 429} == {"job_bytes"}
    server = redis.Redis.from_url(redis_url)
    kept = [
        int(server.hget(f"imagerec:job:{a.json['job_id']}", "input_bytes"))
        for a in answers
        if a.status_code == 202
    ]
    assert kept == [120_000, 120_000]
    assert len(job_folders(tmp_path / "jobs")) == 2  # the refused wrote nothing, not even a staging folder
    fifth = client.post(
        "/v1/jobs?model=vgg16", data={"files": (io.BytesIO(b"5" * 120_000), "5.jpg")}, headers=erin
    )
    assert code(fifth) == (429, "quota_exceeded") and fifth.json["error"]["quota"] == "job_bytes"


def test_an_archive_counts_while_it_is_on_disk(keyed_gateway: Any, tmp_path: Path) -> None:
    """A stored (uncompressed) archive of 280 kB unpacks to 280 kB: both are on disk at once, so
    a 500 kB job_bytes quota refuses it part-way, and what it wrote is gone."""
    client, _ = keyed_gateway
    frank = bearer(make_key(client, "frank", ["jobs"], job_bytes=500_000))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for n in range(2):
            archive.writestr(f"{n}.jpg", bytes([n + 1]) * 140_000)
    photos = {"archive": (io.BytesIO(buffer.getvalue()), "photos.zip")}
    answer = client.post("/v1/jobs?model=vgg16", data=photos, headers=frank)
    assert code(answer) == (429, "quota_exceeded") and answer.json["error"]["quota"] == "job_bytes"
    assert job_folders(tmp_path / "jobs") == []
    small = client.post(
        "/v1/jobs?model=vgg16", data={"archive": (io.BytesIO(zipped(2, 50_000)), "a.zip")}, headers=frank
    )
    assert small.status_code == 202, small.json  # and nothing of the refused one is still counted


def test_job_records_a_key_keeps_are_bounded_and_refusals_store_nothing(
    keyed_gateway: Any, redis_url: str
) -> None:
    """Jobs that store no bytes still count: past ``kept_jobs`` (ended ones too, until they
    expire) a key is refused with the quota named, and a refusal adds nothing to Redis."""
    client, _ = keyed_gateway
    gina = bearer(make_key(client, "gina", ["jobs"], kept_jobs=2, active_jobs=8))
    for _ in range(2):
        assert client.post("/v1/jobs?model=vgg16", json=URLS, headers=gina).status_code == 202
    server = redis.Redis.from_url(redis_url)
    before = server.dbsize()
    for _ in range(50):
        refused = client.post("/v1/jobs?model=vgg16", json=URLS, headers=gina)
        assert code(refused) == (429, "quota_exceeded") and refused.json["error"]["quota"] == "kept_jobs"
    assert server.dbsize() == before


def test_a_multipart_boundary_that_is_not_ascii_is_a_400(keyed_gateway: Any) -> None:
    client, _ = keyed_gateway
    answer = client.post(
        "/v1/jobs?model=vgg16",
        data="--é\r\n".encode(),
        headers={**bearer(ADMIN_KEY), "Content-Type": "multipart/form-data; boundary=é"},
    )
    assert answer.status_code == 400 and answer.json["error"]["code"] == "bad_request"


def train(client: Any, name: str, key: dict[str, str], **fields: str) -> Any:
    archive = colours.archive(3, 1, classes=("red", "blue"))
    return client.post(
        "/v1/training", data={"dataset": (io.BytesIO(archive), "p.zip"), "name": name, **fields}, headers=key
    )


def test_a_custom_model_name_belongs_to_its_owner(keyed_gateway: Any, trainer_removals: Path) -> None:
    client, fake = keyed_gateway
    alice = bearer(make_key(client, "alice", ["train", "predict"], trainings=3))
    bob = bearer(make_key(client, "bob", ["train", "predict"], custom_models=1, trainings=3))
    assert train(client, "pets", alice).status_code == 202
    assert code(train(client, "pets", bob)) == (409, "model_name_taken")
    assert code(train(client, "pets", alice, base="vgg16")) == (409, "model_name_taken")  # one base per name
    assert code(client.delete("/v1/models/pets", headers=bob)) == (404, "unknown_model")
    assert code(client.patch("/v1/models/pets", json={"public": True}, headers=bob)) == (404, "unknown_model")
    # Served now: the base's replicas list it. Bob neither sees nor uses it until it is public.
    fake.registry._custom = {"pets": ("resnet50", {"name": "pets", "version": "1", "state": "ready"})}
    listed = lambda key: [m["name"] for m in client.get("/v1/models", headers=key).json["models"]]  # noqa: E731
    assert "pets" in listed(alice) and "pets" not in listed(bob) and "pets" not in listed({})
    assert code(client.get("/v1/models/pets", headers=bob)) == (404, "unknown_model")
    # nor its v2 metadata or Triton configuration (perf_analyzer's first question)
    for route in ("/v2/models/pets", "/v2/models/pets/config"):
        assert client.get(route, headers=bob).status_code == 404, route
        assert client.get(route, headers=alice).status_code == 200, route
    refused = client.post("/v1/predict?model=pets", data=CAT, content_type="image/jpeg", headers=bob)
    assert code(refused) == (404, "unknown_model") and "pets" in refused.json["error"]["message"]
    # nor explain with it, nor ask for its parents or a hedged answer; its owner may
    calls = len(fake.explained)
    for route in ("/v1/explain?model=pets", "/v1/predict?model=pets&parents=true&confidence=0.5"):
        hidden = client.post(route, data=CAT, content_type="image/jpeg", headers=bob)
        assert code(hidden) == (404, "unknown_model"), route
    assert len(fake.explained) == calls  # refused before any member was called
    assert (
        client.post("/v1/explain?model=pets", data=CAT, content_type="image/jpeg", headers=alice).status_code
        == 200
    )
    assert client.patch("/v1/models/pets", json={"public": True}, headers=alice).json == {
        "name": "pets",
        "public": True,
    }
    assert "pets" in listed(bob) and "pets" in listed({})
    assert client.get("/v1/models/pets", headers=bob).json["public"] is True
    # A quota on names: bob's first is fine, his second is refused with its figures.
    assert train(client, "birds", bob).status_code == 202
    over = train(client, "fish", bob)
    assert code(over) == (429, "quota_exceeded") and over.json["error"]["quota"] == "custom_models"
    assert client.delete("/v1/models/pets", headers=alice).json == {"deleted": "pets"}


def test_deleting_a_model_in_training_cancels_it_and_holds_its_name_until_it_stops(
    keyed_gateway: Any, trainer_removals: Path, redis_url: str
) -> None:
    """No one may claim a deleted name while a training of it is in flight (it would publish
    into someone else's model); the trainer frees it once the training has stopped."""
    client, _ = keyed_gateway
    alice = bearer(make_key(client, "alice", ["train", "predict", "jobs"], trainings=3))
    bob = bearer(make_key(client, "bob", ["train", "predict"], trainings=3))
    job_id = train(client, "pets", alice).json["job_id"]
    assert client.delete("/v1/models/pets", headers=alice).status_code in (200, 202)
    assert client.get(f"/v1/jobs/{job_id}", headers=alice).json["status"] == "cancelled"
    assert code(train(client, "pets", bob)) == (409, "model_name_taken")
    assert Owners(redis.Redis.from_url(redis_url)).release_if_deleting("pets")  # as the trainer does
    # the gateway trusts what it read of an owner for AUTH_KEY_CACHE_S (0.2 s here)
    wait_until(lambda: train(client, "pets", bob).status_code == 202, 5, "bob to get the freed name")


def test_the_rate_limit_comes_before_the_key_lookup(redis_url: str) -> None:
    """Made-up keys count against their address, before each costs a Redis lookup: past the limit
    they are refused without one. A verified key counts on its own."""
    redis.Redis.from_url(redis_url).flushall()
    settings = gateway_settings(rate_limit="5/minute")
    app = create_app(
        settings, client=FakeModelClient(settings), poll_health=False, auth_settings=auth_settings(redis_url)
    )  # type: ignore[arg-type]
    client, server = app.test_client(), redis.Redis.from_url(redis_url)
    made = client.post("/v1/keys", json={"name": "kim", "scopes": ["predict"]}, headers=bearer(ADMIN_KEY))
    kim = bearer(made.json["key"])

    def predict(headers: dict[str, str]) -> int:
        answer = client.post("/v1/predict?model=vgg16", data=CAT, content_type="image/jpeg", headers=headers)
        return int(answer.status_code)

    assert predict(kim) == 200  # verified here from now on (counted against the address once)
    server.config_resetstat()
    made_up = [bearer(f"irk_{n:012x}_{'A' * 43}") for n in range(10)]
    assert [predict(key) for key in made_up] == [401] * 4 + [429] * 6
    lookups = server.info("commandstats").get("cmdstat_hgetall", {}).get("calls", 0)
    assert lookups == 4  # none for the refused six
    assert [predict(kim) for _ in range(5)] == [200] * 5  # its own count, not the address's


def test_x_real_ip_is_believed_only_from_the_proxy(redis_url: str, tmp_path: Path) -> None:
    """The limiter counts per address: a direct caller cannot pick a fresh address per request."""
    settings = gateway_settings(rate_limit="2/minute", trusted_proxies=("10.9.9.9/32",))
    app = create_app(
        settings, client=FakeModelClient(settings), poll_health=False, auth_settings=auth_settings(redis_url)
    )  # type: ignore[arg-type]
    client = app.test_client()
    statuses = [
        client.post(
            "/v1/predict?model=vgg16",
            data=CAT,
            content_type="image/jpeg",
            headers={"X-Real-IP": f"1.2.3.{n}"},
        ).status_code
        for n in range(3)
    ]
    assert statuses == [200, 200, 429]
    proxied = {"REMOTE_ADDR": "10.9.9.9"}
    assert all(
        client.post(
            "/v1/predict?model=vgg16",
            data=CAT,
            content_type="image/jpeg",
            headers={"X-Real-IP": f"5.6.7.{n}"},
            environ_base=proxied,
        ).status_code
        == 200
        for n in range(3)
    )


def test_the_nginx_auth_check_answers_for_the_original_route(keyed_gateway: Any) -> None:
    client, _ = keyed_gateway
    viewer = make_key(client, "viewer", ["predict"])

    def check(method: str, uri: str, key: str | None = None) -> int:
        headers = {"X-Original-Method": method, "X-Original-URI": uri, **(bearer(key) if key else {})}
        return int(client.get("/v1/auth/check", headers=headers).status_code)

    assert check("POST", "/v1/jobs?model=vgg16") == 401
    assert check("POST", "/v1/jobs?model=vgg16", viewer) == 403
    assert check("POST", "/v1/jobs?model=vgg16", ADMIN_KEY) == 204
    assert check("POST", "/v1/training", "irk_bad") == 401
    assert check("POST", "/v1/predict?model=vgg16") == 204
    # Read as Nginx matched its location (decoded, slashes merged, dots resolved): the same route.
    for spelling in ("/v1/%6Aobs", "//v1//jobs", "/v1/./x/../jobs"):
        assert check("POST", spelling) == 401, spelling
        assert check("POST", spelling, ADMIN_KEY) == 204, spelling


def test_the_nginx_auth_check_refuses_what_the_gateway_does_not_serve(keyed_gateway: Any) -> None:
    """Never a 204 for an unknown route or method: Nginx would spool the body for nothing. A 403
    (auth_request passes only 401 and 403) carrying the real status for Nginx to answer."""
    client, _ = keyed_gateway
    for method, uri, refusal, allow in (
        ("PUT", "/v1/jobs", "405", "GET, HEAD, OPTIONS, POST"),
        ("PATCH", "/v1/training", "405", "OPTIONS, POST"),
        ("POST", "/v1/jobs/", "404", None),
        ("POST", "/v1/nothing", "404", None),
    ):
        answer = client.get(
            "/v1/auth/check",
            headers={"X-Original-Method": method, "X-Original-URI": uri, **bearer(ADMIN_KEY)},
        )
        assert (answer.status_code, answer.headers.get("X-Imagerec-Refusal")) == (403, refusal), (method, uri)
        assert answer.headers.get("Allow") == allow and answer.json["error"]["code"] == "forbidden"


def test_a_redis_at_its_memory_bound_is_a_503_and_leaves_nothing(
    keyed_gateway: Any, redis_url: str, tmp_path: Path
) -> None:
    """The fleet's Redis never evicts (noeviction, a maxmemory): past it, writes fail - a clear 503."""
    client, _ = keyed_gateway
    server = redis.Redis.from_url(redis_url)
    server.config_set("maxmemory-policy", "noeviction")
    server.config_set("maxmemory", 1)  # everything is over it
    try:
        answer = client.post("/v1/jobs?model=vgg16", json=URLS, headers=bearer(ADMIN_KEY))
        assert code(answer) == (503, "jobs_unavailable") and answer.headers["Retry-After"]
    finally:
        server.config_set("maxmemory", 0)
    assert list((tmp_path / "jobs").iterdir()) == []  # no job folder, no staging folder
    assert client.get("/v1/jobs", headers=bearer(ADMIN_KEY)).json["jobs"] == []


def test_very_long_file_names_in_a_training_upload_are_cut_before_they_are_stored(
    keyed_gateway: Any, redis_url: str
) -> None:
    """Each filename is cut to JOBS_MAX_NAME_CHARS (255): 26 files named with 100 kB each put 2.6 MB
    into one Redis hash field before; the record stays small now, whatever the names."""
    client, _ = keyed_gateway
    images = colours.images(3, seed=3, classes=("red", "blue"))
    files = [
        (io.BytesIO(data), f"{label}/" + "x" * 100_000 + f"{n}.jpg") for n, (label, data) in enumerate(images)
    ]
    files += [
        (io.BytesIO(b"not an image"), "red/" + "y" * 100_000 + f"{n}.jpg") for n in range(20)
    ]  # skipped
    # NOTE: encoded in memory: werkzeug's test client would spool a body this large to a temporary
    # file it never closes.
    boundary, body = encode_multipart(
        MultiDict([("name", "long-names"), *(("files", FileStorage(f, n)) for f, n in files)])
    )
    answer = client.post(
        "/v1/training",
        data=body,
        content_type=f"multipart/form-data; boundary={boundary}",
        headers=bearer(ADMIN_KEY),
    )
    assert answer.status_code == 202, answer.json
    record = redis.Redis.from_url(redis_url).hgetall(f"imagerec:job:{answer.json['job_id']}")
    size = sum(len(k) + len(v) for k, v in record.items())
    assert size < 26 * 300 + 20_000, size  # names of at most 255 characters, and the rest
    assert all(len(item["name"]) <= 255 for item in answer.json["skipped"])
