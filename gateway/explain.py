"""``POST /v1/explain?model=<name>``: where in one photo a class's score comes from.

The gateway reads the photo like a prediction's (every input kind), sends it to one replica of the
model (``ModelClient.explain``: failover, breakers and the deadline of a prediction), which runs
the occlusion grid through its own batcher at background priority (``serving/explain.py``), and
answers with the member's grid of score drops plus a PNG overlay: the photo as the model saw it
(its centre crop) with the cells whose hiding costs the class most in red. ``Accept: image/png``
gets the overlay alone. Ensembles are not explained: each member sees the photo its own way.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
from flask import Response, request
from PIL import Image

from common import imaging, web
from common.errors import BadRequest
from common.outcomes import Selection
from fleet.client import ModelClient
from gateway.inputs import InputReader
from gateway.settings import GatewaySettings

VIEW_SIDE = 448  # the overlay's side in pixels
RANDOM_NOTE = (
    "random weights: the heatmap shows what an untrained network's score for this class reacts to, "
    "not where it recognises anything"
)
PARAMETERS = ("grid", "class_id", "index")


def overlay(photo: bytes, drops: list[list[float]], center_crop: float, limits: imaging.ImageLimits) -> bytes:
    """The photo's centre crop (what the model saw), ``VIEW_SIDE`` square, red over the cells
    whose drop is above the median cell's (and above 0), the largest at 70 % opacity; PNG."""
    view = Image.fromarray(imaging.load_pixels(photo, VIEW_SIDE, limits, center_crop)).convert("RGBA")
    drop = np.asarray(drops, np.float64)
    # red where a cell matters more than the typical one: from the median drop (or 0) up to the largest
    floor = max(0.0, float(np.median(drop)))
    span = float(drop.max()) - floor
    strength = np.clip((drop - floor) / span, 0.0, 1.0) if span > 0 else np.zeros_like(drop)
    alpha = Image.fromarray((strength * 0.7 * 255).astype(np.uint8), "L").resize(
        (VIEW_SIDE, VIEW_SIDE), Image.Resampling.BICUBIC
    )
    red = Image.new("RGBA", (VIEW_SIDE, VIEW_SIDE), (230, 20, 20, 0))
    red.putalpha(alpha)
    buffer = io.BytesIO()
    Image.alpha_composite(view, red).convert("RGB").save(buffer, "PNG", optimize=False)
    return buffer.getvalue()


def explain(
    settings: GatewaySettings,
    client: ModelClient,
    reader: InputReader,
    limits: imaging.ImageLimits,
    selection: Selection,
) -> Response:
    """The explanation of the request's one photo by ``selection``'s one model."""
    if selection.vote is not None:
        raise BadRequest("an explanation is of one model: name it with model=, not an ensemble")
    model = selection.members[0]
    deadline = web.deadline(settings.default_deadline_ms / 1000)
    items, batch = reader.read(request)
    if batch or len(items) != 1:
        raise BadRequest(f"an explanation is of one image, got {len(items)}")
    item = items[0]
    if item.error:
        raise item.error
    imaging.probe(item.data, limits)  # a non-image never reaches a member
    params = {name: request.args[name] for name in PARAMETERS if request.args.get(name)}
    found = client.explain(model, item.data, params, request_id=web.request_id(), deadline=deadline)
    crop = float(client.registry.metadata(model).get("center_crop") or 0.875)
    png = overlay(item.data, found["drops"], crop, limits)
    if request.accept_mimetypes.best == "image/png":
        return Response(png, mimetype="image/png")
    body: dict[str, Any] = {
        "request_id": web.request_id(),
        **{key: found.get(key) for key in ("model", "weights", "weights_hash", "backend", "precision")},
        "class": found["class"],
        "grid": found["grid"],
        "drops": found["drops"],
        "passes": found["passes"],
        "overlay_png": base64.b64encode(png).decode(),
    }
    if found.get("weights") == "random":
        body["note"] = RANDOM_NOTE
    body["timing_ms"] = found.get("timing_ms", {})
    return web.json_ok(body)
