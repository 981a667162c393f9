"""Secrets and the shared Redis URL, as every process reads them."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.jobs.settings import JobSettings
from common.settings import secret, with_password
from common.tenancy.settings import AuthSettings
from gateway.settings import GatewaySettings


def test_a_secret_comes_from_its_variable_or_the_file_its_file_variable_names(tmp_path: Path) -> None:
    (tmp_path / "key").write_text("from-a-file\n")
    assert secret({"X": "plain"}, "X") == "plain"
    assert secret({"X_FILE": str(tmp_path / "key")}, "X") == "from-a-file"
    assert secret({}, "X") == ""
    with pytest.raises(OSError):  # a named file that is missing stops the process at start-up
        secret({"X_FILE": str(tmp_path / "missing")}, "X")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://redis:6379/0", "redis://:p%40ss%2Fw@redis:6379/0"),
        ("redis://:own@redis:6379/0", "redis://:own@redis:6379/0"),  # its own password wins
        ("memory://", "memory://"),
        ("", ""),
    ],
)
def test_the_redis_password_goes_into_a_url_without_one(url: str, expected: str) -> None:
    assert with_password(url, {"REDIS_PASSWORD": "p@ss/w"}) == expected


def test_every_redis_user_gets_redis_url_and_its_password(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("s3cret")
    env = {"REDIS_URL": "redis://r:6379/0", "REDIS_PASSWORD_FILE": str(tmp_path / "pw")}
    assert JobSettings.from_env(env).redis_url == "redis://:s3cret@r:6379/0"
    assert AuthSettings.from_env(env).redis_url == "redis://:s3cret@r:6379/0"
    gateway = GatewaySettings.from_env({**env, "GATEWAY_CACHE_REDIS_URL": "redis://cache:6379/0"})
    assert gateway.cache_redis_url == "redis://:s3cret@cache:6379/0"
    assert gateway.rate_limit_storage == "redis://:s3cret@r:6379/0"
    own = JobSettings.from_env({**env, "JOBS_REDIS_URL": "redis://jobs:6379/1"})
    assert own.redis_url == "redis://:s3cret@jobs:6379/1"  # its own URL, still with the password
    assert JobSettings.from_env({}).redis_url == ""


def test_the_admin_key_and_the_callback_secret_may_be_files(tmp_path: Path) -> None:
    (tmp_path / "admin").write_text("admin-from-file")
    (tmp_path / "callback").write_text("callback-from-file")
    assert (
        AuthSettings.from_env({"IMAGEREC_ADMIN_KEY_FILE": str(tmp_path / "admin")}).admin_key
        == "admin-from-file"
    )
    jobs = JobSettings.from_env({"JOBS_CALLBACK_SECRET_FILE": str(tmp_path / "callback")})
    assert jobs.callback_secret == "callback-from-file"
