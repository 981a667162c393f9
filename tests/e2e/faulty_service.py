"""A model service whose faults the tests switch on and off while the fleet runs.

It answers like a real member (ImageNet labels, a uniform probability vector) until told otherwise
with ``POST /chaos {"fault": ..., "delay_s": ...}``:

- ``slow``: every prediction waits ``delay_s`` first (released early when the fault is cleared);
- ``garbage``: 200 with HTML; ``nan``: 200 with NaN scores; ``short``: 200 with too few results.

``GET /chaos`` reports the fault, how many predictions are in flight and how many it has
received. Health probes are never
affected: the gateway must judge the member by its answers.
"""

from __future__ import annotations

import json
import threading

from flask import Flask, Response, request

from bench import stub_service
from common import web

FAULTS = ("none", "slow", "garbage", "nan", "short")


def create_app() -> Flask:
    app = stub_service.create_app("flaky")
    state = {"fault": "none", "delay_s": 0.0, "in_flight": 0, "received": 0}
    lock, cleared = threading.Lock(), threading.Event()

    @app.post("/chaos")
    def set_fault() -> Response:
        body = request.get_json(force=True)
        if body.get("fault") not in FAULTS:
            return web.json_ok({"error": f"fault must be one of {FAULTS}"}, 400)
        with lock:
            state.update(fault=body["fault"], delay_s=float(body.get("delay_s", 0)))
            cleared.set()  # wake sleepers of the previous fault
            cleared.clear()
        return web.json_ok(state)

    @app.get("/chaos")
    def get_fault() -> Response:
        return web.json_ok(state)

    @app.before_request
    def inject() -> Response | None:
        if request.path != "/v1/predict":
            return None
        with lock:
            state["in_flight"] += 1
            state["received"] += 1
            fault, delay_s = state["fault"], state["delay_s"]
        if fault == "slow":
            cleared.wait(delay_s)
        elif fault == "garbage":
            return Response("<html>502 Bad Gateway</html>", 200, content_type="text/html")
        elif fault == "nan":
            prediction = {"label": "tabby", "class_id": "n02123045", "index": 281, "score": float("nan")}
            return Response(json.dumps({"model": "flaky", "predictions": [prediction]}), 200)
        elif fault == "short":
            return Response(json.dumps({"model": "flaky", "results": []}), 200)
        return None

    @app.teardown_request
    def done(_: BaseException | None) -> None:
        if request.path == "/v1/predict":
            with lock:
                state["in_flight"] -= 1

    return app
