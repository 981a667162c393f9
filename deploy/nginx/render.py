"""Nginx's two configs from the templates beside this file; the local fleet and the nginx image
both render them here, so the edge is configured the same way in both.

``render(values, folder)`` writes ``folder/nginx.conf`` and ``folder/imagerec.conf``. A template's
``${NAME}`` is one of ours; Nginx's own ``$variables`` are left alone. A name of ours without a value
is an error, never an empty directive.

``python3 -m deploy.nginx.render`` is the nginx image's command: the limits and upstreams come from
the environment (``NGINX_*``, ``GATEWAY_UPSTREAM``, ``GATEWAY_GRPC_UPSTREAM``: compose sets each),
every path is under ``NGINX_RUN_DIR`` (``/tmp/nginx``, a tmpfs in compose, so the image's root can
be read-only), logs go to the container's output, and the process becomes nginx in the foreground.
Standard library only: the image has Python but not the project's packages.
"""

from __future__ import annotations

import os
import re
import shutil
import string
from collections.abc import Mapping
from pathlib import Path

TEMPLATES = Path(__file__).resolve().parent
CONFIGS = {"nginx.conf.template": "nginx.conf", "imagerec.conf.template": "imagerec.conf"}
OURS = re.compile(r"\$\{([A-Z][A-Z0-9_]*)\}")


def names() -> set[str]:
    """Every ``${NAME}`` the templates need."""
    return {name for template in CONFIGS for name in OURS.findall((TEMPLATES / template).read_text())}


def render(values: Mapping[str, str], folder: Path) -> Path:
    """Write both configs into ``folder`` (``NGINX_DIR`` must name it); returns the main one's path."""
    missing = sorted(names() - set(values))
    if missing:
        raise ValueError(f"nginx config: no value for {', '.join(missing)}")
    folder.mkdir(parents=True, exist_ok=True)
    for template, target in CONFIGS.items():
        text = string.Template((TEMPLATES / template).read_text()).safe_substitute(values)
        (folder / target).write_text(text)
    return folder / "nginx.conf"


def container_values(environ: Mapping[str, str]) -> dict[str, str]:
    """The nginx image's values: the paths are the image's, the rest is the environment's."""
    run_dir = environ.get("NGINX_RUN_DIR", "/tmp/nginx")
    return {
        "NGINX_WORKERS": "1",
        **{name: value for name, value in environ.items() if name in names()},
        "NGINX_DIR": run_dir,
        "NGINX_TEMP_DIR": f"{run_dir}/tmp",
        "NGINX_ERROR_LOG": "/dev/stderr",
        "NGINX_USER_DIRECTIVE": "",  # never root: the worker runs as the image's user
    }


def main() -> None:
    values = container_values(os.environ)
    conf = render(values, Path(values["NGINX_DIR"]))
    Path(values["NGINX_TEMP_DIR"]).mkdir(parents=True, exist_ok=True)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    os.execv(
        nginx, [nginx, "-p", values["NGINX_DIR"], "-c", str(conf), "-e", "/dev/stderr", "-g", "daemon off;"]
    )


if __name__ == "__main__":
    main()
