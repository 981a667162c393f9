"""One classification as the v1 routes run it: read the images, answer from the response cache
when the policy allows, else run the selection on the fleet and say what answered."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flask import g, request

from common import web
from common.outcomes import Failed, Outcome, Selection, outcome_from_json
from fleet.predict import ImageInput, Predictor
from fleet.refine import PLAIN, Refinement
from gateway import cache as response_cache
from gateway import shaping
from gateway.cache import Policy
from gateway.inputs import InputReader
from gateway.settings import GatewaySettings


@dataclass
class Classified:
    body: dict[str, Any]  # request id, model, what answered, timings
    outcomes: tuple[Outcome, ...]  # one per image: predictions or an error
    batch: bool  # the client sent several images (or one, the batch way)


class Classifier:
    def __init__(
        self,
        settings: GatewaySettings,
        predictor: Predictor,
        reader: InputReader,
        cache: Policy | None,
        caller: Callable[[], str],
    ) -> None:
        """``caller``: who the request counts as (``Auth.caller``), whose cache entries these are."""
        self.settings = settings
        self.predictor = predictor
        self.reader = reader
        self.cache = cache
        self.caller = caller

    def __call__(self, selection: Selection, top_k: int, refinement: Refinement = PLAIN) -> Classified:
        """The request's images answered by ``selection``; a single image's error is the request's.
        A refined answer (``fleet.refine``) is computed each time, never cached."""
        started = time.perf_counter()
        deadline = web.deadline(self.settings.default_deadline_ms / 1000)
        items, batch = self._read()
        cacheable = self.cache is not None and not batch and not refinement.asked
        # The key is the caller and the client's bytes, before any canonical re-encoding, hashed once.
        image = response_cache.digest(items[0].data, self.caller()) if cacheable else ""
        if cacheable and (hit := self._cached(selection, image, top_k, started)):
            return hit
        read_ms = (time.perf_counter() - started) * 1000
        prediction = self.predictor.predict(
            selection,
            items,
            top_k=top_k,
            request_id=web.request_id(),
            deadline=deadline,
            refinement=refinement,
        )
        if not batch and isinstance(prediction.outcomes[0], Failed):
            raise prediction.outcomes[0].error
        body = {"request_id": web.request_id(), "model": selection.name, **shaping.head(prediction)}
        if cacheable and self.cache and not prediction.degraded:
            entry = {"body": dict(body), "outcomes": [o.to_json() for o in prediction.outcomes]}
            self.cache.store(selection, image, top_k, prediction.served, entry)
        timing = dict(prediction.timing_ms)
        body["timing_ms"] = {
            "ingest": round(read_ms + timing.pop("ingest"), 2),
            **timing,
            "total": round((time.perf_counter() - started) * 1000, 2),
        }
        return Classified(body, prediction.outcomes, batch)

    def _read(self) -> tuple[list[ImageInput], bool]:
        """The request's images, read; a single image that could not be read is the request's error."""
        items, batch = self.reader.read(request)
        if not batch and items[0].error:
            raise items[0].error
        return items, batch

    def _cached(self, selection: Selection, image: str, top_k: int, started: float) -> Classified | None:
        assert self.cache is not None
        hit = self.cache.lookup(selection, image, top_k)
        g.cache = "HIT" if hit else "MISS"  # the X-Cache header (gateway.v1)
        if not hit:
            return None
        body = {**hit["body"], "request_id": web.request_id()}
        body["timing_ms"] = {"total": round((time.perf_counter() - started) * 1000, 2)}
        return Classified(body, tuple(outcome_from_json(o) for o in hit["outcomes"]), False)
