"""``POST /v1/explain``: where in one photo a class's score comes from, by occlusion sensitivity.

The photo is decoded and fitted to the model's input once; a grey square (pixel value 128) twice a
cell's side is centred on each cell of a ``grid`` x ``grid`` division of it in turn (Zeiler and
Fergus' occlusion, with overlapping patches), and every copy, with the photo itself, goes through
the model: ``grid² + 1`` forward passes, nothing else (no gradients), so it
works on every backend, precision and custom model. A cell's value is how much the class's
probability drops when that cell is hidden (negative: hiding it helps the class).

The copies run in the service's own batcher at background priority, in calls of at most the
batch size: interactive requests wait behind at most one of those calls. The request is admitted
by what it costs (``grid² + 1`` images against its deadline, before the body is read) and
``EXPLAIN_MAX_PASSES`` bounds that cost.
"""

from __future__ import annotations

import time
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import numpy as np
from flask import request

from common import imaging, web
from common.errors import BadRequest, DeadlineExceeded, ModelNotReady
from common.wire import Priority
from serving.batching import BatcherClosed
from serving.predict import Predict, Route, request_images, route

GREY = 128


def occluded(pixels: np.ndarray, grid: int) -> np.ndarray:
    """``pixels`` (``(s, s, 3)`` uint8) and, after it, one copy per cell of a ``grid`` x ``grid``
    division, row by row, each with a grey square twice a cell's side centred on that cell (clipped
    at the edges): the patches overlap, so an object on a cell border is still hidden whole by
    the patch of the cell nearest its centre. ``(grid² + 1, s, s, 3)``."""
    side = pixels.shape[0]
    cell = side / grid
    copies = np.repeat(pixels[None], grid * grid + 1, axis=0)
    for row in range(grid):
        for col in range(grid):
            top, left = round((row - 0.5) * cell), round((col - 0.5) * cell)
            bottom, right = round((row + 1.5) * cell), round((col + 1.5) * cell)
            copies[1 + row * grid + col, max(0, top) : bottom, max(0, left) : right] = GREY
    return copies


class Explain:
    def __init__(self, predict: Predict) -> None:
        self.predict = predict
        self.spec, self.settings, self.models = predict.spec, predict.settings, predict.models

    def __call__(self) -> dict[str, Any]:
        started = time.perf_counter()
        deadline = web.deadline(self.settings.default_deadline_s)
        most = max(2, int((self.settings.explain_max_passes - 1) ** 0.5))
        grid = web.query_int("grid", min(self.settings.explain_grid, most), 2, most)
        passes = grid * grid + 1
        name = request.args.get("model", "")
        found = route(self.models, self.spec, name)
        found.target.batcher.check(passes, deadline)  # what it costs, before the body is read
        images, _ = request_images()
        if len(images) != 1:
            raise BadRequest(f"an explanation is of one image, got {len(images)}")
        crop = self.settings.center_crop
        pixels = imaging.load_pixels(images[0], self.spec.input_size, self.predict.limits, crop)
        decoded_at = time.perf_counter()
        probabilities = self._run(found, name, occluded(pixels, grid), deadline)
        index = self._class(found.labels.class_ids, len(found.labels), probabilities[0])
        drops = probabilities[0, index] - probabilities[1:, index]
        body = self.predict.served_by(found)
        body.update(
            {
                "class": {
                    "label": found.labels.names[index],
                    "class_id": found.labels.class_ids[index],
                    "index": index,
                    "score": float(probabilities[0, index]),
                },
                "grid": grid,
                "drops": drops.reshape(grid, grid).round(6).tolist(),
                "passes": passes,
                "timing_ms": {
                    "decode": round((decoded_at - started) * 1000, 2),
                    "total": round((time.perf_counter() - started) * 1000, 2),
                },
            }
        )
        return body

    @staticmethod
    def _class(class_ids: tuple[str, ...], classes: int, scores: np.ndarray) -> int:
        """The class asked for (``index`` or ``class_id``), else the photo's top class."""
        class_id = request.args.get("class_id")
        if class_id:
            if class_id not in class_ids:
                raise BadRequest(
                    f"class_id {class_id[:40]!r} is none of this model's classes", code="unknown_class"
                )
            return class_ids.index(class_id)
        if request.args.get("index"):
            return web.query_int("index", 0, 0, classes - 1)
        return int(np.argmax(scores))

    def _run(self, found: Route, name: str, copies: np.ndarray, deadline: float) -> np.ndarray:
        """Every copy's probabilities, in calls of at most the batch size at background priority."""
        batcher = found.target.batcher
        size = batcher.max_batch
        try:
            waiting = [
                batcher.submit(copies[i : i + size], deadline=deadline, priority=Priority.BACKGROUND)
                for i in range(0, len(copies), size)
            ]
        except BatcherClosed:
            raise ModelNotReady(
                f"{name or self.spec.name} was replaced just now: send the request again"
            ) from None
        rows = []
        for each in waiting:
            try:
                outputs = each.future.result(timeout=max(0.0, deadline - time.monotonic()))
            except FutureTimeout:
                raise DeadlineExceeded(
                    "the explanation did not finish before the request's deadline"
                ) from None
            rows.append(found.probabilities(outputs))
        return np.concatenate(rows)
