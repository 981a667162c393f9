"""Settings every way of deploying the fleet shares; each deployment imports this, never another.

The local fleet (``deploy/local``) reads them from ``FLEET_NGINX_*``; the Kubernetes renderer
(``deploy/k8s``) writes their defaults into the manifests; ``docker-compose.yml`` spells the same
defaults out and a test holds it to them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from common.settings import setting

NGINX_TEMPLATES = Path(__file__).resolve().parent / "nginx"

# Gunicorn threads. A request waiting for its model parks a thread, so a model service needs one
# per image it may queue (MAX_QUEUE_IMAGES, 64) plus the batch running (MAX_BATCH_SIZE, 8) plus
# spares that decode or refuse: with fewer, requests would wait for a thread where admission cannot
# see them, never refused and never counted. The gateway's threads wait on members the same way.
SERVICE_THREADS = 96
GATEWAY_WORKERS = 2
GATEWAY_THREADS = 64


@dataclass(frozen=True)
class NginxLimits:
    """Body and timeout limits of deploy/nginx/imagerec.conf.template (``FLEET_NGINX_<FIELD>``)."""

    max_body_size: str = setting("10m", "largest request body Nginx accepts (413 above)")
    body_buffer_size: str = setting("1m", "request bodies up to this size stay in memory")
    client_timeout: str = setting("30s", "client header/body/send timeout at Nginx")
    proxy_connect_timeout: str = setting("5s", "Nginx -> gateway connect timeout")
    proxy_read_timeout: str = setting("60s", "Nginx -> gateway read timeout")

    def template_values(self) -> dict[str, str]:
        """The limits by the template's variable names, e.g. ``NGINX_MAX_BODY_SIZE``."""
        return {f"NGINX_{field.name.upper()}": getattr(self, field.name) for field in fields(self)}
