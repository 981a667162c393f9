"""The quota book on a real Redis: places and bytes reserved before anything is written, so requests
of one key sent at once can never together pass a quota; released on failure, lapsed when the
process that held them died, and admission that never walks other tenants' jobs."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from common.errors import InsufficientStorage, QuotaExceeded, ServiceError
from common.tenancy.keys import ADMIN, Principal
from common.tenancy.quotas import QuotaBook, Reservation
from common.tenancy.settings import QuotaSettings
from deploy.local.running import wait_until

KIB = 1024
CAROL = Principal("carol-id", "carol", frozenset({"jobs"}))


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    found = redis.Redis.from_url(redis_url, decode_responses=True)
    found.flushall()
    yield found
    found.flushall()


def book(client: redis.Redis, **settings: float) -> QuotaBook:
    defaults = {"reservation_step_bytes": 4 * KIB, "min_free_bytes": 0}
    return QuotaBook(QuotaSettings(**{**defaults, **settings}), client)  # type: ignore[arg-type]


def held(client: redis.Redis, owner: str = CAROL.id) -> tuple[int, int]:
    """The ledger's running totals: the owner's and the fleet's."""
    return int(client.get(f"imagerec:held:total:{owner}") or 0), int(client.get("imagerec:held:total") or 0)


def upload(reservation: Reservation, size: int, piece: int = KIB) -> None:
    for _ in range(size // piece):
        reservation.grow(piece)


def test_uploads_sent_at_once_by_one_key_never_keep_more_than_its_job_bytes(
    client: redis.Redis, tmp_path: Path
) -> None:
    """Eight uploads of 30 KiB at once against 100 KiB, each reserving its declared size first:
    three fit, the others are refused before they write a byte. Past its declaration (an archive
    unpacks) an upload grows its reservation as it writes: refused part-way when there is no room,
    giving back what it held."""
    quotas = book(client, job_bytes=100 * KIB, active_jobs=8)
    start = threading.Barrier(8)
    kept: list[int] = []
    refused: list[ServiceError] = []

    def send(n: int) -> None:
        start.wait()
        try:
            with quotas.reserve(CAROL, tmp_path, 100, training=False, declared=30 * KIB) as reservation:
                upload(reservation, 30 * KIB)
                reservation.commit(f"{n:032x}", reservation.used, time.time() + 3600)
                kept.append(reservation.used)
        except QuotaExceeded as exc:
            refused.append(exc)

    threads = [threading.Thread(target=send, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert kept == [30 * KIB] * 3, kept  # four would be 120 KiB
    assert len(refused) == 5 and {exc.to_dict()["quota"] for exc in refused} == {"job_bytes"}
    assert held(client) == (sum(kept), sum(kept))  # the refused gave back all they held
    assert (
        client.zcard(f"imagerec:kept:{CAROL.id}") == client.scard(f"imagerec:active:{CAROL.id}") == len(kept)
    )


def test_an_upload_past_its_declared_size_is_refused_part_way_and_gives_everything_back(
    client: redis.Redis, tmp_path: Path
) -> None:
    quotas = book(client, job_bytes=100 * KIB)
    with quotas.reserve(CAROL, tmp_path, 100, training=False, declared=60 * KIB) as first:
        with pytest.raises(QuotaExceeded) as refused:
            upload(first, 200 * KIB)  # an archive that unpacks to more than its quota allows
        assert first.used <= 100 * KIB + KIB and held(client)[0] <= 100 * KIB
    assert refused.value.to_dict()["quota"] == "job_bytes"
    assert held(client) == (0, 0) and not client.zcard(f"imagerec:kept:{CAROL.id}")


def test_a_key_at_its_quota_is_refused_before_anything_is_read(client: redis.Redis, tmp_path: Path) -> None:
    quotas = book(client, job_bytes=8 * KIB)
    with quotas.reserve(CAROL, tmp_path, 100, training=False) as first:
        upload(first, 8 * KIB)
        first.commit("a" * 32, first.used, time.time() + 3600)
    with pytest.raises(QuotaExceeded) as refused:
        quotas.reserve(CAROL, tmp_path, 100, training=False)
    assert refused.value.to_dict()["quota"] == "job_bytes"
    assert client.zrange(f"imagerec:kept:{CAROL.id}", 0, -1) == ["a" * 32]  # the refused one left nothing


def test_a_full_fleet_or_disk_refuses_every_key(client: redis.Redis, tmp_path: Path) -> None:
    quotas = book(client, total_job_bytes=10 * KIB)
    with quotas.reserve(ADMIN, tmp_path, 100, training=False) as admins:
        upload(admins, 10 * KIB)
        with pytest.raises(QuotaExceeded) as refused:
            quotas.reserve(CAROL, tmp_path, 100, training=False)
        assert refused.value.to_dict()["quota"] == "total_job_bytes"
    disk = book(client, min_free_bytes=10**15)  # more than any disk has
    with pytest.raises(InsufficientStorage):
        disk.reserve(CAROL, tmp_path, 100, training=False)


def test_kept_jobs_count_ended_ones_until_they_expire(client: redis.Redis, tmp_path: Path) -> None:
    quotas = book(client, kept_jobs=3)
    for n in range(3):
        with quotas.reserve(CAROL, tmp_path, 100, training=False) as reservation:
            reservation.commit(f"{n:032x}", 0, time.time() + (3600 if n else 1))
    # None of them is active (no record says pending or running): they are kept all the same.
    with pytest.raises(QuotaExceeded) as refused:
        quotas.reserve(CAROL, tmp_path, 100, training=False)
    assert (refused.value.to_dict()["quota"], refused.value.to_dict()["used"]) == ("kept_jobs", 3)
    # The first one expires: its place comes back.
    wait_until(lambda: _reserves(quotas, tmp_path), 10, "the expired job's place to come back")


def _reserves(quotas: QuotaBook, folder: Path) -> bool:
    try:
        quotas.reserve(CAROL, folder, 100, training=False).release()
    except QuotaExceeded:
        return False
    return True


def test_a_reservation_of_a_process_that_died_lapses(client: redis.Redis, tmp_path: Path) -> None:
    quotas = book(client, active_jobs=1, reservation_s=1)
    abandoned = quotas.reserve(CAROL, tmp_path, 100, training=False)
    upload(abandoned, 8 * KIB)  # then nothing: neither commit nor release
    with pytest.raises(QuotaExceeded):
        quotas.reserve(CAROL, tmp_path, 100, training=False)
    wait_until(lambda: _reserves(quotas, tmp_path), 10, "the abandoned reservation to lapse")
    assert held(client) == (0, 0)


def test_a_discarded_job_gives_back_what_it_took_over(client: redis.Redis, tmp_path: Path) -> None:
    quotas = book(client, active_jobs=1)
    with quotas.reserve(CAROL, tmp_path, 100, training=True) as reservation:
        upload(reservation, 4 * KIB)
        reservation.commit("b" * 32, 4 * KIB, time.time() + 3600)
        reservation.forget("b" * 32)
    assert held(client) == (0, 0)
    assert not client.scard(f"imagerec:active:{CAROL.id}") and not client.scard("imagerec:trainings")
    quotas.reserve(CAROL, tmp_path, 100, training=True).release()


def test_admission_never_walks_other_tenants_jobs(client: redis.Redis, tmp_path: Path) -> None:
    """Another key's 300 kept jobs cost this key's upload nothing: the Redis commands it runs
    (Redis's own statistics, a script's calls included) are as many as with none, give or take one
    pass over the fleet's full active set (16 here)."""
    quotas = book(client, total_active_jobs=16)

    def commands_of_one_upload(job_id: str) -> int:
        client.config_resetstat()
        with quotas.reserve(CAROL, tmp_path, 100, training=False) as reservation:
            upload(reservation, 16 * KIB)
            reservation.commit(job_id, 16 * KIB, time.time() + 3600)
        return sum(stats["calls"] for stats in client.info("commandstats").values())

    alone = commands_of_one_upload("c" * 32)
    other = Principal("dave-id", "dave", frozenset({"jobs"}))
    for n in range(300):
        with quotas.reserve(other, tmp_path, 100, training=False) as reservation:
            upload(reservation, KIB)
            reservation.commit(f"{n:032x}", KIB, time.time() + 3600)
    assert commands_of_one_upload("d" * 32) <= alone + 2 * 16
    assert held(client, "dave-id") == (300 * KIB, 332 * KIB)
