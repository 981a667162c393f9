"""One classification as the v1 routes run it: read the images, answer from the response cache
when the policy allows, else run the selection on the fleet and say what answered."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from flask import g, request

from common import web
from fleet.predict import ImageInput, Predictor, Selection
from gateway import cache as response_cache
from gateway import shaping
from gateway.auth import caller
from gateway.cache import Policy
from gateway.inputs import InputReader
from gateway.settings import GatewaySettings


@dataclass
class Classified:
    body: dict[str, Any]  # request id, model, what answered, timings
    outcomes: list[dict[str, Any]]  # one per image: predictions or an error
    batch: bool  # the client sent several images (or one, the batch way)


class Classifier:
    def __init__(
        self, settings: GatewaySettings, predictor: Predictor, reader: InputReader, cache: Policy | None
    ) -> None:
        self.settings = settings
        self.predictor = predictor
        self.reader = reader
        self.cache = cache

    def __call__(self, selection: Selection, top_k: int) -> Classified:
        started = time.perf_counter()
        deadline = web.deadline(self.settings.default_deadline_ms / 1000)
        items, batch = self._read()
        cacheable = self.cache is not None and not batch and items[0].error is None
        # The key is the caller and the client's bytes, before any canonical re-encoding, hashed once.
        image = response_cache.digest(items[0].data, caller()) if cacheable else ""
        if cacheable and (hit := self._cached(selection, image, top_k, started)):
            return hit
        self.predictor.canonicalize(selection, items)  # a hit never pays for the ensemble's re-encoding
        if not batch and items[0].error:
            raise items[0].error
        ingest_ms = (time.perf_counter() - started) * 1000
        result = self.predictor.run(
            selection, items, top_k=top_k, request_id=web.request_id(), deadline=deadline
        )
        body = {"request_id": web.request_id(), "model": selection.name, **shaping.head(selection, result)}
        outcomes = result["outcomes"]
        if cacheable and self.cache and not result["failures"] and "error" not in outcomes[0]:
            entry = {"body": dict(body), "outcomes": outcomes}
            self.cache.store(selection, image, top_k, result["replies"], entry)
        body["timing_ms"] = {
            "ingest": round(ingest_ms, 2),
            **result["timing_ms"],
            "total": round((time.perf_counter() - started) * 1000, 2),
        }
        return Classified(body, outcomes, batch)

    def _read(self) -> tuple[list[ImageInput], bool]:
        """The request's images, checked: a single image's problem is the request's error."""
        items, batch = self.reader.read(request)
        if not batch and items[0].error:
            raise items[0].error
        self.predictor.validate(items)
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
        return Classified(body, hit["outcomes"], False)
