"""A model service with no model: the same HTTP surface, a canned answer. Measures the gateway and
Nginx on their own (``make bench``, part 4)."""

from __future__ import annotations

import numpy as np
from flask import Flask, Response, request

from common import labels, web
from common.wire import IMAGE_LENGTHS_HEADER, encode_vector

INDEX = labels.load()
VECTOR = np.full(len(INDEX), 1 / len(INDEX), np.float32)


def create_app(name: str = "stub") -> Flask:
    app = Flask(name)
    web.install(app, drain_max_bytes=32 * 1024 * 1024)
    meta = {
        "name": name,
        "ready": True,
        "state": "ready",
        "input_size": 224,
        "preprocessing": "caffe",
        "weights": "none",
        "weights_hash": "0",
        "backend": "stub",
        "classes": len(INDEX),
        "labels_hash": INDEX.digest,
        "center_crop": 0.875,
    }

    @app.get("/v1/model")
    def model() -> Response:
        return web.json_ok(meta)

    @app.get("/v1/labels")
    def labels_() -> Response:
        return web.json_ok({"labels_hash": INDEX.digest, "labels": INDEX.to_json()})

    @app.get("/health/ready")
    def ready() -> Response:
        return web.json_ok({"status": "ready"})

    @app.post("/v1/predict")
    def predict() -> Response:
        parts = request.files.getlist("files") or request.files.getlist("file")
        framed = request.headers.get(IMAGE_LENGTHS_HEADER)  # the gateway's several images in one body
        count = len(framed.split(",")) if framed else len(parts) or 1
        top = INDEX.top_k(VECTOR, 5)
        results = [
            {
                "index": i,
                "predictions": top,
                **({"probabilities": encode_vector(VECTOR)} if web.query_flag("probabilities") else {}),
            }
            for i in range(count)
        ]
        body = {
            "model": name,
            "weights": "none",
            "weights_hash": "0",
            "backend": "stub",
            "labels_hash": INDEX.digest,
            "timing_ms": {"decode": 0, "queue": 0, "inference": 0, "total": 0},
        }
        if framed or request.files.getlist("files"):
            body["results"] = results
        else:
            body.update(results[0])
        return web.json_ok(body)

    return app
