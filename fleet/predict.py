"""The prediction core: one call, ``Predictor.predict(selection, items, ...) -> Prediction``, that
every protocol and the job workers make. It checks each image from its header, re-encodes large
photos once for an ensemble, calls the members (in parallel for an ensemble) and merges their
answers into typed outcomes (``common.outcomes``); an image's own error stays on its outcome."""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import numpy as np

from common import imaging
from common.errors import BadRequest, BadUpstreamResponse, ServiceError, UpstreamTimeout
from common.imaging import ImageInfo
from common.labels import Labels
from common.outcomes import (
    Failed,
    Outcome,
    Predicted,
    Prediction,
    Selection,
)
from common.wire import Priority
from fleet import ensemble, refine
from fleet.answers import MemberReply, MemberResult
from fleet.client import ModelClient, fanout_size
from fleet.refine import PLAIN, Refinement
from fleet.settings import FleetSettings


@dataclass
class ImageInput:
    """One image of a request: its bytes, or why it could not be read."""

    name: str
    data: bytes = b""
    error: ServiceError | None = None
    info: ImageInfo | None = None  # format and size, once the header has been checked


def _probabilities(result: MemberResult, model: str, classes: int) -> np.ndarray:
    vector = result.probabilities
    if vector is None:
        raise BadUpstreamResponse(f"{model} sent no usable probability vector")
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

    def predict(
        self,
        selection: Selection,
        items: list[ImageInput],
        *,
        top_k: int,
        request_id: str,
        deadline: float = float("inf"),
        priority: Priority = Priority.INTERACTIVE,
        whole: bool = False,
        refinement: Refinement = PLAIN,
    ) -> Prediction:
        """Answer ``items`` with ``selection``: an outcome per image, in order.

        ``deadline`` (``time.monotonic()``) is the client's: members get what is left of it.
        ``priority`` ``background`` (the job workers') lets every interactive request go first.
        ``whole``: the request is answered whole or not at all (a v2 tensor): its first image that
        is not one refuses it, named, before any member is called or any photo decoded.
        ``refinement``: parents, filters and the hedged answer (``fleet.refine``).

        Raises:
            UnknownModel: a member the fleet no longer serves.
            ServiceError: what the request itself met (a member's 4xx verdict, no quorum, no replica).
        """
        started = time.perf_counter()
        refinement.check_vote(selection.vote)
        for member in selection.members:  # a stored selection's model may be gone since
            self.client.registry.replicas(member)
        self._validate(items)
        if whole and (bad := next((item for item in items if item.error is not None), None)):
            assert bad.error is not None
            error = bad.error
            raise ServiceError(f"{bad.name}: {error.message}", code=error.code, status=error.status)
        self._canonicalize(selection, items)
        prepared_ms = (time.perf_counter() - started) * 1000
        return self._run(selection, items, top_k, request_id, deadline, priority, prepared_ms, refinement)

    def _validate(self, items: list[ImageInput]) -> None:
        """Reject non-images and oversized images from their headers, before any member sees them."""
        for item in items:
            if item.error is None:
                try:
                    item.info = imaging.probe(item.data, self.limits)
                except ServiceError as exc:
                    item.error = exc

    def _canonicalize(self, selection: Selection, items: list[ImageInput]) -> None:
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
        priority: Priority,
        vectors: bool,
    ) -> tuple[dict[str, MemberReply], dict[str, ServiceError]]:
        """Each member's answer or failure; ``vectors``: with each image's probability vector."""
        if len(selection.members) == 1:  # no fan-out: call in this thread, skip the hand-off
            member = selection.members[0]
            try:
                reply = self.client.predict(
                    member,
                    images,
                    top_k=top_k,
                    probabilities=vectors,
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
                probabilities=vectors,
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
        replies: dict[str, MemberReply] = {}
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

    def _run(
        self,
        selection: Selection,
        items: list[ImageInput],
        top_k: int,
        request_id: str,
        deadline: float,
        priority: Priority,
        prepared_ms: float,
        refinement: Refinement,
    ) -> Prediction:
        """Call the members for every valid item and merge; item errors stay on their items."""
        started = time.perf_counter()
        valid = [i for i, item in enumerate(items) if item.error is None]
        vectors = selection.vote is not None or refinement.needs_distribution
        replies, failures = (
            self._call_members(
                selection, [items[i].data for i in valid], top_k, request_id, deadline, priority, vectors
            )
            if valid
            else ({}, {})
        )
        upstream_ms = (time.perf_counter() - started) * 1000
        if valid:  # a batch of only bad images asks nobody, so it cannot miss a quorum
            self._check_quorum(selection, replies, failures)
        labels = self._shared_labels(selection, replies)
        if labels is None and refinement.asked:
            labels = self._own_labels(selection, replies)
        sent = {index: position for position, index in enumerate(valid)}  # where each went in the call
        outcomes = [
            Failed(i, item.name, item.error)
            if item.error
            else self._merge(
                selection,
                i,
                item.name,
                {m: r.results[sent[i]] for m, r in replies.items()},
                labels,
                top_k,
                refinement,
            )
            for i, item in enumerate(items)
        ]
        return Prediction(
            selection,
            tuple(outcomes),
            {member: reply.served for member, reply in replies.items()},
            failures,
            {
                "ingest": round(prepared_ms, 2),
                # the slowest member's own figures: the ensemble waits for it
                **{
                    key: max((r.timing_ms.get(key, 0) for r in replies.values()), default=0)
                    for key in ("decode", "queue", "inference")
                },
                "upstream": round(upstream_ms, 2),
            },
        )

    def _shared_labels(self, selection: Selection, replies: dict[str, MemberReply]) -> Labels | None:
        """For a vote: the one label set every answering member has (else they cannot vote)."""
        answering = {  # a reply of only item errors (e.g. every image too large) votes on nothing
            m: reply for m, reply in replies.items() if any(r.labels is not None for r in reply.results)
        }
        if selection.vote is None or not answering:
            return None
        hashes = {reply.labels_hash for reply in answering.values()}
        if len(hashes) != 1:
            raise BadRequest(
                "these models have different label sets and cannot vote together", code="incompatible_members"
            )
        return self.client.labels(next(iter(answering)), str(hashes.pop()))

    def _own_labels(self, selection: Selection, replies: dict[str, MemberReply]) -> Labels | None:
        """A single model's classes, for a refinement: ImageNet's shipped, else fetched once."""
        reply = replies.get(selection.members[0])
        if reply is None or reply.labels_hash is None:
            return None
        if reply.labels_hash == refine.imagenet_labels().digest:
            return refine.imagenet_labels()
        return self.client.labels(selection.members[0], reply.labels_hash)

    @staticmethod
    def _merge(
        selection: Selection,
        index: int,
        name: str,
        answers: dict[str, MemberResult],
        labels: Labels | None,
        top_k: int,
        refinement: Refinement,
    ) -> Outcome:
        """One image's outcome from its members' results (each already checked well-formed)."""
        answered = {m: a.labels for m, a in answers.items() if a.labels is not None}
        if not answered:  # every member refused the image: the first one's reason
            return Failed(index, name, next(iter(answers.values())).error or _UNANSWERED)
        if selection.vote is None:
            predicted = Predicted(index, name, next(iter(answered.values())))
            if not refinement.asked:
                return predicted
            member = next(iter(answered))
            vector = None
            if refinement.needs_distribution and labels is not None:
                vector = _probabilities(answers[member], member, len(labels))
            return refine.refine(predicted, vector, labels, refinement, top_k, model=member)
        assert labels is not None
        vectors = [_probabilities(answers[m], m, len(labels)) for m in answered]
        weights = [selection.weights[m] for m in answered]
        merged = ensemble.merge(selection.vote, vectors, weights, labels, top_k)
        predicted = Predicted(index, name, tuple(merged), answered)
        if not refinement.asked:
            return predicted
        distribution = ensemble.distribution(selection.vote, vectors, weights)
        ranked = selection.vote != "hard"
        return refine.refine(
            predicted, distribution, labels, refinement, top_k, ranked=ranked, model=selection.name
        )


# Never seen: a member's result without labels carries its error.
_UNANSWERED = ServiceError("no answer", code="unanswered", status=500)
