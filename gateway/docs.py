"""The pages: ``GET /`` (the web page, gateway/static/index.html), ``GET /openapi.json`` (OpenAPI 3,
from gateway/openapi.yaml) and ``GET /docs`` (Swagger UI from the swagger-ui-bundle package: no
CDN, works offline)."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import yaml
from flask import Blueprint, Response, send_from_directory
from swagger_ui_bundle import swagger_ui_path

SPEC = Path(__file__).with_name("openapi.yaml")
STATIC = Path(__file__).with_name("static")
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>imagerec API</title>
<link rel="stylesheet" href="/docs/static/swagger-ui.css"></head>
<body><div id="ui"></div>
<script src="/docs/static/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({url: "/openapi.json", dom_id: "#ui"});</script>
</body></html>
"""


@functools.cache
def spec() -> dict[str, Any]:
    return yaml.safe_load(SPEC.read_text())


def create_blueprint() -> Blueprint:
    docs = Blueprint("docs", __name__)

    @docs.get("/")
    def index() -> Response:
        return send_from_directory(STATIC, "index.html", max_age=60)

    @docs.get("/openapi.json")
    def openapi() -> Response:
        return Response(json.dumps(spec()), mimetype="application/json")

    @docs.get("/docs")
    def page() -> Response:
        return Response(PAGE, mimetype="text/html")

    @docs.get("/docs/static/<path:name>")
    def static(name: str) -> Response:
        return send_from_directory(swagger_ui_path, name, max_age=86400)

    return docs
