"""The response cache: hits skip the models, keys follow weights and parameters, Redis is shared."""

from __future__ import annotations

import io
import time

import redis
import responses
from flask.testing import FlaskClient

from common.errors import ModelUnavailable
from fleet.client import new_session
from fleet.registry import Registry
from gateway import cache as response_cache
from gateway.app import create_app
from gateway.settings import GatewaySettings
from tests.gateway.fakes import FakeModelClient
from tests.helpers import ADMIN_KEY, bearer, gateway_settings, photo

CAT, COFFEE = photo("chelsea.jpg"), photo("coffee.jpg")


def gateway(**settings: object) -> tuple[FlaskClient, FakeModelClient]:
    config = gateway_settings(**settings)
    fake = FakeModelClient(config)
    for name in fake.registry.models:
        for replica in fake.registry.replicas(name):
            replica.ready = True
            # the hash the fake's answers carry
            replica.metadata = {"ready": True, "weights": "random", "weights_hash": f"hash-{name}"}
    return create_app(config, client=fake, poll_health=False).test_client(), fake  # type: ignore[arg-type]


def ask(client: FlaskClient, query: str = "model=resnet50", image: bytes = CAT):  # type: ignore[no-untyped-def]
    return client.post(f"/v1/predict?{query}", data=image, content_type="image/jpeg")


def test_a_repeated_request_is_served_from_the_cache() -> None:
    client, fake = gateway()
    first, second = ask(client), ask(client)
    assert (first.headers["X-Cache"], second.headers["X-Cache"]) == ("MISS", "HIT")
    assert len(fake.calls) == 1  # the hit never reached a model
    assert second.get_json()["predictions"] == first.get_json()["predictions"]
    assert second.get_json()["request_id"] != first.get_json()["request_id"]
    assert ask(client, "model=resnet50&top_k=3").headers["X-Cache"] == "MISS"  # parameters are in the key
    assert ask(client, image=COFFEE).headers["X-Cache"] == "MISS"
    assert ask(client, "model=vgg16").headers["X-Cache"] == "MISS"
    ensemble = [ask(client, "model=ensemble&vote=hard").headers["X-Cache"] for _ in range(2)]
    assert ensemble == ["MISS", "HIT"]
    seed = client.post("/predict", data=CAT, content_type="image/jpeg")  # the seed route shares it
    assert seed.status_code == 200 and "X-Cache" in seed.headers


def test_no_caller_learns_from_the_cache_what_another_sent() -> None:
    """Entries are per key, or per address for anonymous callers: a hit (its header, its speed)
    says only that this caller sent the same photo before."""
    client, fake = gateway()

    def from_address(address: str, headers: dict[str, str] | None = None) -> str:
        answer = client.post(
            "/v1/predict?model=resnet50",
            data=CAT,
            content_type="image/jpeg",
            headers=headers or {},
            environ_base={"REMOTE_ADDR": address},
        )
        return str(answer.headers["X-Cache"])

    assert from_address("10.0.0.1") == "MISS"
    assert from_address("10.0.0.2") == "MISS"  # another anonymous caller
    assert from_address("10.0.0.1", bearer(ADMIN_KEY)) == "MISS"  # a key, from the same address
    assert [from_address("10.0.0.1"), from_address("10.0.0.3", bearer(ADMIN_KEY))] == ["HIT", "HIT"]
    assert len(fake.calls) == 3


def test_new_weights_are_never_answered_from_old_entries() -> None:
    client, fake = gateway()
    ask(client)
    for replica in fake.registry.replicas("resnet50"):
        replica.metadata["weights_hash"] = "hash-resnet50-v2"
    assert ask(client).headers["X-Cache"] == "MISS"
    # Mid-rollout the probe already sees v2 but the answer came from old weights: it is stored
    # under the old weights' key, so a v2 lookup still misses rather than serving it.
    assert ask(client).headers["X-Cache"] == "MISS"
    assert len(fake.calls) == 3


def test_batches_failures_and_degraded_answers_are_not_cached() -> None:
    client, fake = gateway()
    files = {"files": [(io.BytesIO(CAT), "a.jpg"), (io.BytesIO(CAT), "b.jpg")]}
    batch = client.post("/v1/predict?model=resnet50", data=files)
    assert batch.status_code == 200 and len(batch.get_json()["results"]) == 2
    assert "X-Cache" not in batch.headers
    fake.failures["vgg16"] = ModelUnavailable("down")
    assert ask(client, "model=ensemble").get_json()["degraded"] is True
    del fake.failures["vgg16"]
    assert ask(client, "model=ensemble").headers["X-Cache"] == "MISS"  # the degraded answer was not kept


def test_the_cache_can_be_turned_off() -> None:
    client, _ = gateway(cache_size=0)
    assert "X-Cache" not in ask(client).headers


def test_memory_drop_removes_every_entry_of_a_model() -> None:
    cache = response_cache.MemoryCache(16, 60)
    for members in ({"resnet50": "a"}, {"vgg16": "b"}, {"resnet50": "a", "vgg16": "b"}):
        cache.put(response_cache.key(response_cache.digest(CAT, "ip:1.2.3.4"), members, {}), {"body": {}})
    assert cache.drop("vgg16") == 2
    assert (
        cache.get(response_cache.key(response_cache.digest(CAT, "ip:1.2.3.4"), {"resnet50": "a"}, {}))
        is not None
    )


@responses.activate
def test_the_registry_reports_a_weights_change() -> None:
    url = "http://r1:8502"
    responses.get(f"{url}/v1/model", json={"ready": True, "weights_hash": "one"})
    registry = Registry({"resnet50": [url]}, new_session(2))
    changed: list[str] = []
    registry.on_weights_change = changed.append
    registry.refresh()
    registry.refresh()
    assert changed == []
    responses.replace(responses.GET, f"{url}/v1/model", json={"ready": True, "weights_hash": "two"})
    registry.refresh()
    assert changed == ["resnet50"]


def test_redis_is_shared_by_gateways_and_dropped_on_new_weights(redis_url: str) -> None:
    store = redis.Redis.from_url(redis_url)
    store.flushall()
    first, _ = gateway(cache_redis_url=redis_url)
    second, fake = gateway(cache_redis_url=redis_url)  # another worker or gateway replica
    assert ask(first).headers["X-Cache"] == "MISS"
    assert ask(second).headers["X-Cache"] == "HIT" and fake.calls == []
    assert ask(second, "model=vgg16").headers["X-Cache"] == "MISS"
    assert len(store.keys(f"{response_cache.PREFIX}*")) == 2
    assert response_cache.RedisCache(redis_url, 60).drop("resnet50") == 1
    assert [k.decode() for k in store.keys("*")][0].startswith(f"{response_cache.PREFIX}vgg16@")
    assert 0 < store.pttl(store.keys("*")[0]) <= 300_000  # entries expire (GATEWAY_CACHE_TTL_S)


def test_a_redis_outage_is_a_miss_not_an_error() -> None:
    """With Redis down, answers are computed (and what this worker stored still answers)."""
    client, fake = gateway(cache_redis_url="redis://127.0.0.1:1")  # nothing listens there
    responses_ = [ask(client), ask(client, "model=vgg16"), ask(client)]
    assert [r.status_code for r in responses_] == [200, 200, 200]
    assert [r.headers["X-Cache"] for r in responses_] == ["MISS", "MISS", "HIT"] and len(fake.calls) == 2


def test_a_worker_answers_its_repeats_from_memory_no_longer_than_redis_keeps_them(redis_url: str) -> None:
    store = redis.Redis.from_url(redis_url)
    store.flushall()
    first, _ = gateway(cache_redis_url=redis_url)
    second, fake = gateway(cache_redis_url=redis_url, rate_limit="")  # it asks as fast as it can below
    assert ask(first).headers["X-Cache"] == "MISS"
    (entry,) = store.keys(f"{response_cache.PREFIX}*")
    store.pexpire(entry, 400)  # the shared entry has 0.4 s left when the second worker reads it
    assert ask(second).headers["X-Cache"] == "HIT"  # from Redis, into the second worker's memory
    store.delete(entry)
    assert ask(second).headers["X-Cache"] == "HIT" and fake.calls == []  # memory: no round trip
    deadline = time.monotonic() + 5
    while ask(second).headers["X-Cache"] == "HIT":  # until the copy's 0.4 s are over
        assert time.monotonic() < deadline, "the worker's copy outlived its Redis entry"
    assert len(fake.calls) == 1


def test_redis_url_configures_every_redis_user_unless_each_says_otherwise() -> None:
    both = GatewaySettings.from_env({"REDIS_URL": "redis://r:6379"})
    assert both.cache_redis_url == both.rate_limit_storage == "redis://r:6379"
    own = GatewaySettings.from_env({"REDIS_URL": "redis://r:6379", "GATEWAY_RATE_LIMIT_STORAGE": "memory://"})
    assert own.rate_limit_storage == "memory://" and own.cache_redis_url == "redis://r:6379"
