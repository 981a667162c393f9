"""The settings reference, docs/reference/settings.md, generated from the settings classes.

``python -m deploy.settings_reference`` writes the page; ``--check`` exits 1 when the file on disk
differs from what :func:`render` makes (``make test`` runs the same check as a test).

Every class is named once, in :data:`CLASSES`, by module path and class name, and imported inside
:func:`render`: when a module moves, its line here is the one thing to change. What a class's
``from_env`` reads besides ``<PREFIX><FIELD>`` is written by hand in :data:`NOTES`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "reference" / "settings.md"


@dataclass(frozen=True)
class Entry:
    module: str
    name: str
    prefix: str
    title: str


# (module, class, env prefix, section title), in the order of the page.
CLASSES = (
    Entry("serving.settings", "ServiceSettings", "", "Model services"),
    Entry("common.draining", "DrainSettings", "", "Model services: stopping"),
    Entry("services.keras_file", "KerasFileSettings", "KERAS_FILE_", "A .keras file service"),
    Entry("fleet.settings", "FleetSettings", "GATEWAY_", "Fleet client: routing, replicas, URL fetching"),
    Entry("gateway.settings", "GatewaySettings", "GATEWAY_", "Gateway"),
    Entry("common.jobs.settings", "JobSettings", "JOBS_", "Asynchronous jobs"),
    Entry("common.training.settings", "TrainingSettings", "TRAINING_", "Custom classes: training"),
    Entry("common.tenancy.settings", "AuthSettings", "AUTH_", "Keys"),
    Entry("common.tenancy.settings", "QuotaSettings", "QUOTA_", "Quotas"),
    Entry("deploy.local.fleet", "LocalFleetSettings", "FLEET_", "Local fleet (make run)"),
    Entry("deploy.settings", "NginxSettings", "FLEET_NGINX_", "Nginx"),
)

# Fields that from_env reads from another variable than <PREFIX><FIELD>: (class, field) -> variable.
READ_FROM = {
    ("TrainingSettings", "models_dir"): "CUSTOM_MODELS_DIR",
    ("AuthSettings", "admin_key"): "IMAGEREC_ADMIN_KEY",
}

# Defaults written by hand where the value depends on the machine (cpu count, home folder...):
# (class, field) -> what the page says. Paths inside the checkout are written <repo>/... anyway.
DEFAULTS: dict[tuple[str, str], str] = {}

# Per class: who reads it and what its from_env reads besides <PREFIX><FIELD>, as Markdown.
NOTES = {
    "ServiceSettings": """\
Read by each model service (`services/vgg16`, `resnet50`, `inceptionv3`, `keras_file`; `serving/`):
`<FIELD>` applies to every service, `<MODEL>_<FIELD>` to one and wins (e.g.
`RESNET50_WEIGHTS=random`, `RESNET50_MODEL_REPOSITORY=/models`).

Also read:

- `KERAS_HOME` is the field below; the Keras cache root falls back to `~/.keras`, so the weights are
  looked for in `$KERAS_HOME/models/`.
- `MODEL_CACHE` empty means `$XDG_CACHE_HOME/imagerec/converted` (else `~/.cache/imagerec/converted`);
  compose and Kubernetes set `/keras/converted`.
- `CUSTOM_MODELS_DIR`: `make run` sets `run/custom-models` for every process.
- `CUDA_VISIBLE_DEVICES`: with an NVIDIA device visible and not hidden by it, `BACKEND=auto` serves
  Keras (on the GPU).
- The model image runs `services.${MODEL}:create_app()` on `${PORT}` with `${THREADS}` Gunicorn threads
  (`MODEL`, `PORT`, `THREADS`: the Dockerfile's, default `resnet50`, `8502`, `96`).""",
    "KerasFileSettings": """\
Read by `services.keras_file` (a `.keras` file plus a labels file, served by the same code as the
ImageNet models); its model file is `<NAME>_WEIGHTS` (or `WEIGHTS`), like any service, and every
model-service setting above applies to it too.""",
    "FleetSettings": """\
How the gateway and the job workers reach the model services: `fleet/`, no Flask. The variables are
the gateway's (`GATEWAY_<FIELD>`), and the job workers read the same ones.

Also read: `<MODEL>_URLS`, comma-separated replica base URLs of one model (a DNS name is resolved
into one replica per address every `GATEWAY_DNS_REFRESH_S`). Defaults:""",
    "GatewaySettings": """\
What only the HTTP gateway has (`gateway/`): its body limit, rate limits, trusted proxies, response
cache and the seed article's routes. Every fleet-client setting above is a gateway setting too.

Also read: `GATEWAY_CACHE_REDIS_URL` and `GATEWAY_RATE_LIMIT_STORAGE` fall back to `REDIS_URL`, and
`REDIS_PASSWORD` (or the file `REDIS_PASSWORD_FILE` names) is put into whichever URL is used, unless
it names a password of its own.""",
    "JobSettings": """\
The gateway (which accepts jobs) and the job workers (which run them) read the same `JOBS_*`.

Also read: `JOBS_REDIS_URL` falls back to `REDIS_URL` (with `REDIS_PASSWORD` / `REDIS_PASSWORD_FILE`
put in); without either, the job routes answer 503 `jobs_unavailable`. `JOBS_CALLBACK_SECRET` may
come from the file `JOBS_CALLBACK_SECRET_FILE` names (compose and Kubernetes do so).
`JOBS_CHUNK_BUDGET_S` must be below `JOBS_VISIBILITY_TIMEOUT_S`, and `JOBS_CHUNK_IMAGES` at least
`JOBS_BATCH_IMAGES`, or start-up fails.""",
    "TrainingSettings": """\
The gateway (which checks and accepts training jobs) and the trainer (which runs them) read the
`TRAINING_*`; the gateway, the trainer and the model services read `CUSTOM_MODELS_DIR`.

Also read: `CUSTOM_MODELS_DIR` (not `TRAINING_MODELS_DIR`), where custom models are published;
without it, `POST /v1/training` answers 503 `training_unavailable`.""",
    "AuthSettings": """\
Read by the gateway and the job workers.

Also read: `IMAGEREC_ADMIN_KEY`, else the file `IMAGEREC_ADMIN_KEY_FILE` names (compose and
Kubernetes pass it from a secret): the admin's key. When both are empty the first process that needs
it generates one into `AUTH_ADMIN_KEY_FILE` (`make run` sets `run/admin.key`). `AUTH_REDIS_URL` falls
back to `REDIS_URL` (with `REDIS_PASSWORD` / `REDIS_PASSWORD_FILE` put in); without either, keys live
in the process's memory (one process only: tests). `AUTH_KEY_CACHE_S` must be in (0, 4].""",
    "QuotaSettings": """\
Each principal's defaults (the first six) and the fleet's totals, which bind the admin too; a key
may override any of the six (`POST /v1/keys` `{"quotas": {...}}`, or `client keys create --quota
name=value`). Read by the gateway and the job workers.""",
    "LocalFleetSettings": """\
`python -m deploy.local.fleet` (`make run`); model and gateway settings pass through unchanged.

It sets for the processes it starts, on top of the caller's environment: `<MODEL>_URLS` (every
replica), `GATEWAY_MODELS`, `GATEWAY_ENSEMBLE_MODELS` (unless set), `GATEWAY_REQUEST_THREADS`
(`FLEET_GATEWAY_THREADS`), `REDIS_URL` (with `FLEET_REDIS`), `GATEWAY_CACHE_REDIS_URL` (the cache's
own Redis, unless set), `JOBS_DIR` (`run/jobs`), `AUTH_ADMIN_KEY_FILE` (`run/admin.key`),
`CUSTOM_MODELS_DIR` (`run/custom-models`) and one `PROMETHEUS_MULTIPROC_DIR` per program, each
unless already set where the code says so.""",
    "NginxSettings": """\
The limits of `deploy/nginx/imagerec.conf.template`, rendered from `FLEET_NGINX_<FIELD>` locally
and from the nginx container's `NGINX_<FIELD>` (`NGINX_MAX_BODY_SIZE`...) in compose; the
Kubernetes renderer writes the defaults into the nginx Deployment. Bodies up to 1 MB are buffered in
memory because the default buffer stalled every upload ~44 ms behind a keep-alive upstream. The
template also keeps keep-alive connections to the gateway (64 idle ones), sends `X-Request-Start`
on every request (deadlines count from it), and answers its own 400/408/413/414/502/503/504 with
JSON bodies (and 400 for oversized headers). Timeout order: Nginx read (60 s) > the gateway's
default deadline (30 s) ≥ a service's (30 s); Gunicorn's own `timeout` (120 s) is only a worker
heartbeat for `gthread` workers.""",
}

INTRO = """\
# Settings reference

<!-- Generated by `python -m deploy.settings_reference` from the settings classes: do not edit. -->

Every limit is a setting, read once at start-up from the environment: a frozen dataclass per part of
the fleet, each field declared with `common.settings.setting(default, help)`. A value that does not
parse (a number, `true`/`false`) fails start-up naming the variable. Lists are comma-separated.
How these settings work together is in [Operations](../operations.md).
"""

# Variables no settings class holds: (variable, default, meaning), on the page's last table.
EVERY_PROCESS = (
    (
        "`REDIS_URL`",
        "*(empty)*",
        "the Redis every user falls back to (jobs, keys, rate limits, response cache); `make run` sets it",
    ),
    (
        "`REDIS_PASSWORD`, `REDIS_PASSWORD_FILE`",
        "*(empty)*",
        "put into every Redis URL that names no password of its own",
    ),
    ("`LOG_FORMAT`", "`json`", "`text` for classic log lines"),
    ("`LOG_LEVEL`", "`INFO`", "the log level"),
    (
        "`PROMETHEUS_MULTIPROC_DIR`",
        "*(empty)*",
        "where Gunicorn workers count their metrics (set by the fleet, the Dockerfile and the manifests; "
        "emptied at start)",
    ),
    ("`IMAGEREC_URL`", "`http://localhost:8080`", "the fleet `python -m client` talks to"),
    ("`IMAGEREC_API_KEY`", "*(empty)*", "the key `python -m client` sends; else the file `run/admin.key`"),
)

_ENV_NAME = re.compile(r"(?<![\w`$])(\$?[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+)(?![\w`])")
_BINARY = (("GiB", 1024**3), ("MiB", 1024**2))


def _text(help_text: str) -> str:
    """A help string as table-cell Markdown: no raw tags or pipes, variable names as code."""
    text = help_text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "&#124;")
    return _ENV_NAME.sub(r"`\1`", text)


def _default(cls: type, field: dataclasses.Field[Any]) -> str:
    """The default as one would write it in the environment, identical on every machine."""
    written = DEFAULTS.get((cls.__name__, field.name))
    if written is not None:
        return written
    value = field.default
    if isinstance(value, bool):
        shown = "true" if value else "false"
    elif isinstance(value, tuple):
        shown = ",".join(str(part) for part in value)
    else:
        shown = str(value).replace(str(ROOT), "<repo>")
    if shown == "":
        return "*(empty)*"
    cell = f"`{shown}`"
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1024**2:
        for unit, size in _BINARY:
            if value % size == 0:
                return f"{cell} ({value // size} {unit})"
    return cell


def load_classes() -> list[tuple[Entry, type, Any]]:
    """(entry, class, module) for every line of :data:`CLASSES`."""
    loaded = []
    for entry in CLASSES:
        module = importlib.import_module(entry.module)
        loaded.append((entry, getattr(module, entry.name), module))
    return loaded


def own_fields(cls: type, documented: list[type]) -> list[dataclasses.Field[Any]]:
    """The settings fields of ``cls`` (those made with ``setting``), less those it inherits from
    another documented class (documented there)."""
    inherited = {
        field.name
        for base in documented
        if base is not cls and issubclass(cls, base)
        for field in dataclasses.fields(base)
    }
    return [
        field for field in dataclasses.fields(cls) if "help" in field.metadata and field.name not in inherited
    ]


def variable(entry: Entry, field: dataclasses.Field[Any]) -> str:
    """The environment variable a field is read from."""
    return READ_FROM.get((entry.name, field.name), entry.prefix + field.name.upper())


def _section(entry: Entry, cls: type, module: Any, documented: list[type]) -> str:
    prefix = f"`{entry.prefix}<FIELD>`" if entry.prefix else "`<FIELD>`, or `<MODEL>_<FIELD>` for one model"
    lines = [f"## {entry.title}", "", f"`{entry.module}.{entry.name}`, prefix {prefix}.", ""]
    note = NOTES.get(entry.name, "")
    if note:
        lines += [note, ""]
    urls = getattr(module, "DEFAULT_URLS", None) if entry.prefix == "GATEWAY_" else None
    if urls and "<MODEL>_URLS" in note:
        lines += [f"- `{name.upper()}_URLS`: `{url}`" for name, url in urls.items()] + [""]
    renamed = getattr(module, "RENAMED", None)
    if renamed:
        old_prefix = getattr(module, "RENAMED_PREFIX", entry.prefix)
        also = " (and `<MODEL>_{}`)" if not old_prefix else ""
        lines += ["Settings whose name or meaning changed are refused at start-up, naming the new one:", ""]
        lines += [
            f"- `{old_prefix}{old}`{also.format(old)}: use {_text(new)}" for old, new in renamed.items()
        ]
        lines.append("")
    lines += ["| Variable | Default | Meaning |", "|---|---|---|"]
    for field in own_fields(cls, documented):
        help_text = _text(field.metadata["help"])
        lines.append(f"| `{variable(entry, field)}` | {_default(cls, field)} | {help_text} |")
    return "\n".join(lines) + "\n"


def render() -> str:
    """The whole page."""
    loaded = load_classes()
    documented = [cls for _, cls, _ in loaded]
    contents = ["## Sections", ""]
    contents += [f"- [{entry.title}](#{_anchor(entry.title)})" for entry, _, _ in loaded]
    contents += ["- [Every process](#every-process)", ""]
    sections = [_section(entry, cls, module, documented) for entry, cls, module in loaded]
    last = ["## Every process", "", "Not a settings class; read where named.", ""]
    last += ["| Variable | Default | Meaning |", "|---|---|---|"]
    last += [f"| {name} | {default} | {meaning} |" for name, default, meaning in EVERY_PROCESS]
    return "\n".join([INTRO, "\n".join(contents), *sections, "\n".join(last)]) + "\n"


def _anchor(title: str) -> str:
    """The id MkDocs (Python-Markdown's toc) gives a heading."""
    slug = re.sub(r"[^\w\s-]", "", title).strip().lower()
    return re.sub(r"[-\s]+", "-", slug)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the page on disk is not current")
    args = parser.parse_args(argv)
    page = render()
    if args.check:
        current = PAGE.read_text(encoding="utf-8") if PAGE.exists() else ""
        if current != page:
            stale = PAGE.relative_to(ROOT)
            print(f"{stale} is stale: run python -m deploy.settings_reference", file=sys.stderr)
            return 1
        return 0
    PAGE.parent.mkdir(parents=True, exist_ok=True)
    PAGE.write_text(page, encoding="utf-8")
    print(f"wrote {PAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
