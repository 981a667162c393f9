"""Routing a request to one model or an ensemble, and shaping the merged answer."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common import imaging, wire
from common.errors import BadRequest, BadUpstreamResponse, ServiceError, UpstreamTimeout
from common.imaging import ImageInfo
from fleet import ensemble
from fleet.client import ModelClient, fanout_size
from fleet.settings import FleetSettings


@dataclass
class ImageInput:
    """One image of a request: its bytes, or why it could not be read."""

    name: str
    data: bytes = b""
    error: ServiceError | None = None
    info: ImageInfo | None = None  # format and size, once the header has been checked


@dataclass(frozen=True)
class Selection:
    """Which models answer: one (``vote`` is None) or an ensemble."""

    name: str
    members: tuple[str, ...]
    vote: str | None = None
    weights: dict[str, float] = field(default_factory=dict)


def select(args: Mapping[str, str], settings: FleetSettings, client: ModelClient) -> Selection:
    """Parse ``model``/``models``/``vote``/``member_weights``; unknown names are a 404."""
    if args.get("models"):
        members = tuple(dict.fromkeys(m.strip() for m in args["models"].split(",") if m.strip()))
        name = "ensemble"
    elif args.get("model") == "ensemble":
        members, name = settings.ensemble_members, "ensemble"
    elif args.get("model"):
        members = (args["model"],)
        name = members[0]
    else:
        raise BadRequest(f"choose a model: ?model=<{'|'.join(settings.models)}|ensemble> or ?models=a,b")
    for member in members:
        client.registry.replicas(member)  # raises UnknownModel listing what exists
    if name != "ensemble":
        return Selection(name, members)
    vote = args.get("vote", "soft")
    if vote not in ensemble.VOTES:
        raise BadRequest(f"vote must be one of {', '.join(ensemble.VOTES)}, got {vote!r}")
    if args.get("member_weights") and vote == "soft":
        raise BadRequest("member_weights needs vote=weighted or vote=hard")
    weights = ensemble.parse_member_weights(args.get("member_weights", ""), list(members))
    return Selection(name, members, vote, weights)


def item_error(outcome: dict[str, Any]) -> ServiceError:
    """The error recorded on one image's outcome, to raise when that image was the whole request."""
    error = outcome["error"]
    return ServiceError(
        str(error.get("message", "invalid image")),
        code=str(error.get("code")),
        status=int(error.get("status", 400)),
    )


def _probabilities(result: dict[str, Any], model: str, classes: int) -> np.ndarray:
    try:
        vector = wire.decode_vector(result["probabilities"])
    except (KeyError, TypeError, ValueError):
        raise BadUpstreamResponse(f"{model} sent no usable probability vector") from None
    if vector.shape != (classes,) or not np.all(np.isfinite(vector)):
        raise BadUpstreamResponse(f"{model} sent a malformed probability vector")
    return vector


class Predictor:
    def __init__(self, client: ModelClient, settings: FleetSettings) -> None:
        self.client = client
        self.settings = settings
        self.limits = imaging.ImageLimits(settings.max_image_bytes, settings.max_image_pixels)
        # Every request thread's every member at once: a member call never queues behind another.
        self.pool = ThreadPoolExecutor(fanout_size(settings), thread_name_prefix="fanout")

    def validate(self, items: list[ImageInput]) -> None:
        """Reject non-images and oversized images from their headers, before any member sees them."""
        for item in items:
            if item.error is None:
                try:
                    item.info = imaging.probe(item.data, self.limits)
                except ServiceError as exc:
                    item.error = exc

    def canonicalize(self, selection: Selection, items: list[ImageInput]) -> None:
        """For ensembles: decode each large photo once and send members a small canonical PNG.

        Only when every member's input size is known and the photo is over twice the size the
        largest of them needs; members still validate what they get.
        """
        if len(selection.members) < 2:
            return
        needs = []
        for member in selection.members:
            meta = self.client.registry.metadata(member)
            if not meta.get("input_size") or not meta.get("center_crop"):
                return
            needs.append(imaging.keep_side(int(meta["input_size"]), float(meta["center_crop"])))
        side = max(needs)
        for item in items:
            if item.error is None and item.info and min(item.info.width, item.info.height) > 2 * side:
                try:
                    item.data = imaging.canonical(item.data, self.limits, side)
                except ServiceError as exc:
                    item.error = exc

    def _call_members(
        self,
        selection: Selection,
        images: list[bytes],
        top_k: int,
        request_id: str,
        deadline: float,
        priority: str,
    ) -> tuple[dict[str, dict[str, Any]], dict[str, ServiceError]]:
        if len(selection.members) == 1:  # no fan-out: call in this thread, skip the hand-off
            member = selection.members[0]
            try:
                reply = self.client.predict(
                    member,
                    images,
                    top_k=top_k,
                    probabilities=selection.vote is not None,
                    request_id=request_id,
                    deadline=deadline,
                    priority=priority,
                )
            except ServiceError as exc:
                return {}, {member: exc}
            return {member: reply}, {}
        futures = {
            m: self.pool.submit(
                self.client.predict,
                m,
                images,
                top_k=top_k,
                probabilities=selection.vote is not None,
                request_id=request_id,
                deadline=deadline,
                priority=priority,
            )
            for m in selection.members
        }
        budget = min(
            self.settings.connect_timeout_s * 2 + self.settings.member_timeout_s,
            max(0.0, deadline - time.monotonic()),
        )
        wait(futures.values(), timeout=budget)
        replies: dict[str, dict[str, Any]] = {}
        failures: dict[str, ServiceError] = {}
        for member, future in futures.items():
            if not future.done():
                future.cancel()
                failures[member] = UpstreamTimeout(f"{member} did not answer within {budget:g}s")
            elif isinstance(future.exception(), ServiceError):
                failures[member] = future.exception()  # type: ignore[assignment]
            elif future.exception() is not None:
                raise future.exception()  # type: ignore[misc]
            else:
                replies[member] = future.result()
        return replies, failures

    def _check_quorum(
        self, selection: Selection, replies: dict[str, Any], failures: dict[str, ServiceError]
    ) -> None:
        client_errors = [f for f in failures.values() if 400 <= f.status < 500]
        if client_errors:
            raise client_errors[0]  # the request itself is wrong: every member would say so
        if selection.vote is None:
            if failures:
                raise next(iter(failures.values()))
            return
        needed = max(1, math.ceil(self.settings.ensemble_quorum * len(selection.members)))
        if len(replies) < needed:
            reasons = "; ".join(f"{m}: {e.message}" for m, e in failures.items())
            raise ServiceError(
                f"only {len(replies)} of {len(selection.members)} members answered "
                f"(quorum {needed}): {reasons}",
                code="ensemble_quorum_not_met",
                status=503,
                retry_after=2,
            )

    def run(
        self,
        selection: Selection,
        items: list[ImageInput],
        *,
        top_k: int,
        request_id: str,
        deadline: float = float("inf"),
        priority: str = "interactive",
    ) -> dict[str, Any]:
        """Call the members for every valid item and merge; item errors stay on their items.

        ``deadline`` (``time.monotonic()``) is the client's: members get what is left of it.
        ``priority`` ``batch`` (the job workers') lets every interactive request go first.
        """
        started = time.perf_counter()
        valid = [i for i, item in enumerate(items) if item.error is None]
        replies, failures = (
            self._call_members(
                selection, [items[i].data for i in valid], top_k, request_id, deadline, priority
            )
            if valid
            else ({}, {})
        )
        upstream_ms = (time.perf_counter() - started) * 1000
        if valid:  # a batch of only bad images asks nobody, so it cannot miss a quorum
            self._check_quorum(selection, replies, failures)

        labels = None
        answering = {  # a reply of only item errors (e.g. every image too large) votes on nothing
            m: reply for m, reply in replies.items() if any("predictions" in r for r in reply["results"])
        }
        if selection.vote is not None and answering:
            hashes = {reply.get("labels_hash") for reply in answering.values()}
            if len(hashes) != 1:
                raise BadRequest(
                    "these models have different label sets and cannot vote together",
                    code="incompatible_members",
                )
            first = next(iter(answering))
            labels = self.client.labels(first, str(hashes.pop()))

        outcomes: list[dict[str, Any]] = [
            {"index": i, "name": item.name, "error": {**item.error.to_dict(), "status": item.error.status}}
            if item.error
            else {"index": i, "name": item.name}
            for i, item in enumerate(items)
        ]
        for position, index in enumerate(valid):
            answers = {m: reply["results"][position] for m, reply in replies.items()}
            answered = {m: a for m, a in answers.items() if "predictions" in a}
            if not answered:
                outcomes[index]["error"] = next(iter(answers.values())).get("error", {})
            elif labels is None:
                outcomes[index]["predictions"] = next(iter(answered.values()))["predictions"]
            else:
                vote = selection.vote or "soft"
                vectors = [_probabilities(a, m, len(labels)) for m, a in answered.items()]
                outcomes[index]["predictions"] = ensemble.merge(
                    vote, vectors, [selection.weights[m] for m in answered], labels, top_k
                )
                outcomes[index]["member_predictions"] = {m: a["predictions"] for m, a in answered.items()}

        return {
            "outcomes": outcomes,
            "replies": replies,
            "failures": failures,
            "timing_ms": {
                # the slowest member's own figures: the ensemble waits for it
                **{
                    key: max((r.get("timing_ms", {}).get(key, 0) for r in replies.values()), default=0)
                    for key in ("decode", "queue", "inference")
                },
                "upstream": round(upstream_ms, 2),
            },
        }
