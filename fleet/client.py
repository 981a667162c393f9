"""The gateway's client for the model services: one member call, whichever replicas it takes.

``ModelClient.predict`` splits a batch the member cannot read in one body (``chunks.py``), and for
each call walks the replicas (``failover.py``), makes one exchange at a time (``transport.py``) and
settles each with the replica's circuit breaker (``accounting.py``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import requests

from common import metrics
from common.errors import ModelUnavailable
from common.labels import Labels, from_json
from common.wire import PRIORITY_HEADER, REQUEST_ID_HEADER, Priority
from fleet import accounting, chunks
from fleet.answers import MemberReply
from fleet.breaker import Breaker
from fleet.failover import Failover
from fleet.registry import Registry
from fleet.settings import FleetSettings
from fleet.transport import NoAnswer, NotSent, ReplyLost, Transport, new_session

__all__ = ["ModelClient", "build_client", "fanout_size", "new_session"]

log = logging.getLogger(__name__)


def fanout_size(settings: FleetSettings) -> int:
    """Member calls one gateway worker may have in flight: every request thread's every member."""
    return settings.fanout_threads or settings.request_threads * len(settings.models)


def build_client(settings: FleetSettings) -> ModelClient:
    """The client a gateway worker uses: replicas from settings (names re-resolved by the poller)."""
    session = new_session(fanout_size(settings))
    registry = Registry(
        settings.replicas,
        session,
        probe_timeout_s=settings.connect_timeout_s,
        dns_refresh_s=settings.dns_refresh_s,
        unknown_probe_s=settings.unknown_model_probe_s,
    )
    return ModelClient(
        registry,
        session,
        connect_timeout_s=settings.connect_timeout_s,
        read_timeout_s=settings.member_timeout_s,
        connect_retries=settings.connect_retries,
        retry_backoff_s=settings.retry_backoff_s,
        breaker_fail_max=settings.breaker_fail_max,
        breaker_reset_s=settings.breaker_reset_s,
    )


class ModelClient:
    """Calls ``POST /v1/predict`` on replicas of a model and returns its per-image results."""

    def __init__(
        self,
        registry: Registry,
        session: requests.Session,
        *,
        connect_timeout_s: float = 1.0,
        read_timeout_s: float = 30.0,
        connect_retries: int = 1,
        retry_backoff_s: float = 0.05,
        breaker_fail_max: int = 5,
        breaker_reset_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``clock``: what the circuit breakers time their resets by (a test's, or monotonic)."""
        self.registry = registry
        self.session = session
        self.transport = Transport(session, connect_timeout_s, read_timeout_s)
        self.timeout = (connect_timeout_s, read_timeout_s)
        self.connect_retries = connect_retries
        self.retry_backoff_s = retry_backoff_s
        self.breaker_fail_max = breaker_fail_max
        self.breaker_reset_s = breaker_reset_s
        self.clock = clock
        self._breakers: dict[str, Breaker] = {}
        self._labels: dict[str, Labels] = {}
        self._labels_lock = threading.Lock()

    def predict(
        self,
        model: str,
        images: list[bytes],
        *,
        top_k: int,
        probabilities: bool = False,
        request_id: str = "",
        deadline: float = float("inf"),
        priority: Priority = Priority.INTERACTIVE,
        features: bool = False,
    ) -> MemberReply:
        """The member's answer for ``images``: one result per image, in order.

        Usually one call; a batch over the member's body limit goes out as several calls, one
        after another, and an image too large for any call gets a 413 result of its own.
        ``deadline`` (``time.monotonic()``) is the request's: the member gets what is left of it.
        ``priority=Priority.BACKGROUND`` (asynchronous jobs and training only) asks the member to
        run each call after every interactive request waiting, as a batch of its own
        (``X-Priority``). ``features=True`` asks
        for the vectors custom models are trained on, with each result.
        """
        params = {"top_k": str(top_k), **({"probabilities": "true"} if probabilities else {})}
        if features:
            params["features"] = "true"
        if self.registry.is_custom(model):  # served by its base model's replicas, named in the query
            params["model"] = model
        headers = {REQUEST_ID_HEADER: request_id} if request_id else {}
        if priority != Priority.INTERACTIVE:
            headers[PRIORITY_HEADER] = priority
        limit = self.registry.body_limit(model)
        plan = chunks.split([len(image) for image in images], limit)
        if plan.whole:
            return self._call(model, images, params, headers, deadline)
        replies = [
            self._call(model, [images[i] for i in part], params, headers, deadline) for part in plan.parts
        ]
        return chunks.merge(model, len(images), plan, replies, limit)

    def explain(
        self, model: str, image: bytes, params: dict[str, str], *, request_id: str = "", deadline: float
    ) -> dict[str, Any]:
        """The member's occlusion explanation of one image (``serving.explain``; ``params``:
        ``grid``, ``class_id`` or ``index``), with the failover and breakers of a prediction."""
        if self.registry.is_custom(model):
            params = {**params, "model": model}
        headers = {REQUEST_ID_HEADER: request_id} if request_id else {}
        return self._call(model, [image], params, headers, deadline, exchange=self.transport.explain)

    def _call(
        self,
        model: str,
        images: list[bytes],
        params: dict[str, str],
        headers: dict[str, str],
        deadline: float,
        exchange: Callable[..., Any] | None = None,
    ) -> Any:
        """One member call, over as many replicas as failover allows (``exchange``: the
        transport's call, ``Transport.predict`` unless named)."""
        exchange = exchange or self.transport.predict
        failover = Failover(
            self.registry, model, connect_retries=self.connect_retries, backoff_s=self.retry_backoff_s
        )
        base = self.registry.base_of(model)  # metrics name the base: a custom model may be private
        for replica in failover:
            breaker = self._breaker(replica.url)
            if not breaker.allow():  # open: this replica is skipped, not hammered
                metrics.MEMBER_FAILURES.labels(base, "circuit_open").inc()
                failover.skip("replica failing repeatedly (circuit open)")
                continue
            started = time.perf_counter()
            try:
                reply = exchange(
                    replica, model, images, params, headers, deadline, fresh=failover.retrying_lost_reply
                )
            except BaseException as exc:
                if isinstance(exc, NotSent | ReplyLost | NoAnswer):  # the replica's fault, maybe: say which
                    log.warning(
                        "%s replica %s%s: %s (%r)",
                        model,
                        replica.url,
                        " on a new connection" if failover.retrying_lost_reply else "",
                        exc,
                        exc.__cause__,
                    )
                accounting.record(breaker, base, exc)
                failover.failed(replica, exc)  # raises when the call ends here
                continue
            accounting.record(breaker, base, None)
            metrics.MEMBER_SECONDS.labels(base).observe(time.perf_counter() - started)
            return reply
        raise failover.give_up()

    def _breaker(self, url: str) -> Breaker:
        with self._labels_lock:
            if url not in self._breakers:
                self._breakers[url] = Breaker(self.breaker_fail_max, self.breaker_reset_s, self.clock)
            return self._breakers[url]

    def labels(self, model: str, labels_hash: str) -> Labels:
        """The label set with this hash, fetched once from a replica of ``model`` and cached."""
        with self._labels_lock:
            if labels_hash in self._labels:
                return self._labels[labels_hash]
        for replica in self.registry.candidates(model):
            try:
                response = self.session.get(
                    f"{replica.url}/v1/labels",
                    params={"model": model} if self.registry.is_custom(model) else None,
                    timeout=self.timeout,
                    headers=replica.headers,
                )
                labels = from_json(response.json()["labels"])
            except (requests.RequestException, ValueError, KeyError, TypeError):
                continue
            if labels.digest == labels_hash:
                with self._labels_lock:
                    self._labels[labels_hash] = labels
                return labels
        raise ModelUnavailable(f"cannot fetch the labels of {model}")
