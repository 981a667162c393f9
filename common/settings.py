"""Typed, frozen settings parsed once from the environment at start-up.

A settings class is a frozen dataclass whose fields are declared with :func:`setting`.
:func:`load` reads ``<PREFIX><FIELD>`` for each prefix in turn (later prefixes win), so a fleet-wide
``WEIGHTS=random`` can be overridden for one service with ``RESNET50_WEIGHTS=auto``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar, get_type_hints
from urllib.parse import quote

T = TypeVar("T")


def setting(default: Any, help: str) -> Any:  # noqa: A002 - mirrors argparse's name
    """Declare a settings field with its default and a one-line description."""
    return dataclasses.field(default=default, metadata={"help": help})


def parse_value(raw: str, kind: Any, name: str) -> Any:
    """Convert one environment string to the field's type, with a message naming the variable."""
    if kind is bool:
        value = raw.strip().lower()
        if value in {"1", "true", "yes", "on"}:
            return True
        if value in {"0", "false", "no", "off", ""}:
            return False
        raise ValueError(f"{name}: expected true/false, got {raw!r}")
    if kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            raise ValueError(f"{name}: expected {kind.__name__}, got {raw!r}") from None
    if kind == tuple[str, ...]:
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    return raw


def load(
    cls: type[T], prefixes: Sequence[str], environ: Mapping[str, str] | None = None, **overrides: Any
) -> T:
    """Build ``cls`` from the environment; keyword ``overrides`` win over everything."""
    env = os.environ if environ is None else environ
    hints = get_type_hints(cls)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        for prefix in prefixes:
            key = prefix + field.name.upper()
            if key in env:
                values[field.name] = parse_value(env[key], hints[field.name], key)
    values.update(overrides)
    return cls(**values)


def refuse_renamed(env: Mapping[str, str], renamed: Mapping[str, str], prefixes: Sequence[str]) -> None:
    """Refuse to start with a setting whose name or meaning changed (``renamed``: old name under
    each of ``prefixes`` -> what replaced it), so a deployment that still sets one learns at once
    instead of silently running on the new defaults."""
    for old, new in renamed.items():
        for prefix in prefixes:
            if prefix + old in env:
                raise ValueError(f"{prefix + old} is no longer read: use {new} (docs/reference/settings.md)")


def secret(env: Mapping[str, str], name: str) -> str:
    """``name``'s value, or the contents of the file ``<name>_FILE`` names (Docker and Kubernetes
    secrets are files): a secret need not sit in the environment, where ``ps e`` shows it."""
    if env.get(name):
        return env[name]
    path = env.get(f"{name}_FILE", "")
    if not path:
        return ""
    with open(path, encoding="utf-8") as file:
        return file.read().strip()


def with_password(url: str, env: Mapping[str, str]) -> str:
    """``url`` (redis://...) with ``REDIS_PASSWORD`` (or ``REDIS_PASSWORD_FILE``) in it, unless it
    names a password of its own or is no Redis URL."""
    password = secret(env, "REDIS_PASSWORD")
    if not password or not url.startswith(("redis://", "rediss://")):
        return url
    scheme, _, rest = url.partition("://")
    if "@" in rest.split("/", 1)[0]:
        return url
    return f"{scheme}://:{quote(password, safe='')}@{rest}"


def load_with_redis(
    cls: type[T], prefixes: Sequence[str], environ: Mapping[str, str] | None = None, **overrides: Any
) -> T:
    """:func:`load`, with the ``redis_url`` field falling back to the fleet-wide ``REDIS_URL`` and
    ``REDIS_PASSWORD`` put in whichever URL is used."""
    env = os.environ if environ is None else environ
    url = (
        overrides.pop("redis_url", None)
        or _first(cls, prefixes, env, "redis_url")
        or env.get("REDIS_URL", "")
    )
    return load(cls, prefixes, env, redis_url=with_password(url, env), **overrides)


def _first(cls: type, prefixes: Sequence[str], env: Mapping[str, str], name: str) -> str:
    """The last of ``<PREFIX><NAME>`` that is set (as :func:`load` reads it), else ''."""
    found = ""
    for prefix in prefixes:
        found = env.get(prefix + name.upper(), found)
    return found
