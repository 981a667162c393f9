"""HTTP client for the model services: replica choice, failover on connect errors, strict replies."""

from __future__ import annotations

import math
import random
import threading
import time
from typing import Any

import requests

from common import metrics
from common.errors import (
    BadUpstreamResponse,
    DeadlineExceeded,
    ModelUnavailable,
    Overloaded,
    ServiceError,
    UpstreamTimeout,
)
from common.labels import Labels, from_json
from common.web import DEADLINE_HEADER, REQUEST_ID_HEADER
from gateway.breaker import Breaker
from gateway.registry import Registry


def _valid_prediction(prediction: object) -> bool:
    if not isinstance(prediction, dict):
        return False
    score, index = prediction.get("score"), prediction.get("index")
    return (
        isinstance(score, int | float)
        and math.isfinite(score)
        and -1e-6 <= score <= 1 + 1e-6
        and isinstance(index, int)
        and isinstance(prediction.get("label"), str)
    )


def _valid_result(result: object) -> bool:
    """A member's per-image result: an error, or finite, well-formed predictions (never NaN)."""
    if not isinstance(result, dict):
        return False
    if "error" in result:
        return isinstance(result["error"], dict)
    predictions = result.get("predictions")
    return isinstance(predictions, list) and bool(predictions) and all(map(_valid_prediction, predictions))


def _error_code(response: requests.Response) -> str:
    try:
        return str(response.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return ""


def new_session(pool_size: int) -> requests.Session:
    """A keep-alive session with a connection pool sized for the fan-out threads."""
    session = requests.Session()
    # NOTE: member traffic is internal: no proxies or .netrc from the environment. Looking them up
    # also cost ~0.7 ms per call (requests scans os.environ every time).
    session.trust_env = False
    adapter = requests.adapters.HTTPAdapter(pool_connections=16, pool_maxsize=pool_size, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


class ModelClient:
    """Calls ``POST /v1/predict`` on one replica of a model and returns its per-image results."""

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
    ) -> None:
        self.registry = registry
        self.session = session
        self.timeout = (connect_timeout_s, read_timeout_s)
        self.connect_retries = connect_retries
        self.retry_backoff_s = retry_backoff_s
        self.breaker_fail_max = breaker_fail_max
        self.breaker_reset_s = breaker_reset_s
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
    ) -> dict[str, Any]:
        """One call for all ``images``. Connect failures move on to the next replica (nothing was sent).

        One image travels as the raw body (cheapest for both sides), several as multipart ``files``.
        A replica at capacity (503 ``overloaded``) passes the call on to the next one; when every
        replica is, the caller gets that 503 at once - overload is never retried after a back-off.
        """
        params = {"top_k": str(top_k), **({"probabilities": "true"} if probabilities else {})}
        headers = {REQUEST_ID_HEADER: request_id} if request_id else {}
        body: dict[str, Any]
        if len(images) == 1:
            body = {"data": images[0], "headers": {**headers, "Content-Type": "application/octet-stream"}}
        else:
            files = [
                ("files", (f"image{i}", data, "application/octet-stream")) for i, data in enumerate(images)
            ]
            body = {"files": files, "headers": headers}
        reason = "no replicas configured"
        overloaded = False
        for attempt in range(self.connect_retries + 1):
            if overloaded:  # busy replicas are not retried after a back-off
                break
            if attempt:  # every replica refused: back off (jittered, growing), then one more round
                time.sleep(self.retry_backoff_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.5))
            for replica in self.registry.candidates(model):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DeadlineExceeded(f"the request's deadline passed before {model} answered")
                timeout = (self.timeout[0], min(self.timeout[1], remaining))
                if remaining < float("inf"):  # pass the rest of the budget on: the member drops late work
                    body["headers"] = {**body["headers"], DEADLINE_HEADER: str(max(1, int(remaining * 1000)))}
                breaker = self._breaker(replica.url)
                if not breaker.allow():  # open: this replica is skipped, not hammered
                    metrics.MEMBER_FAILURES.labels(model, "circuit_open").inc()
                    reason = "replica failing repeatedly (circuit open)"
                    continue
                started = time.perf_counter()
                try:
                    result = self._exchange(replica.url, model, len(images), params, timeout, body)
                except Overloaded:  # busy, not broken: leave it in rotation, try the next one
                    breaker.success()
                    metrics.MEMBER_FAILURES.labels(model, "overloaded").inc()
                    overloaded = True
                    continue
                except requests.ConnectionError as exc:  # includes ConnectTimeout: nothing was sent
                    breaker.failure()
                    metrics.MEMBER_FAILURES.labels(model, "unreachable").inc()
                    self.registry.mark_down(replica)
                    reason = f"replica unreachable ({type(exc).__name__})"
                    continue
                except (
                    requests.exceptions.ChunkedEncodingError,
                    requests.exceptions.ContentDecodingError,
                ) as exc:
                    # The answer was cut off or garbled in transit: a prediction is a pure function
                    # of the image, so asking the next replica (or this one again) is safe. Not a
                    # reason to take the replica out of rotation; its circuit counts it.
                    breaker.failure()
                    metrics.MEMBER_FAILURES.labels(model, "broken_response").inc()
                    reason = f"replica answered with a broken response ({type(exc).__name__})"
                    continue
                except requests.Timeout:  # sent and maybe running: never retried
                    breaker.failure()
                    metrics.MEMBER_FAILURES.labels(model, "timeout").inc()
                    if timeout[1] < self.timeout[1]:
                        raise DeadlineExceeded(
                            f"{model} did not answer before the request's deadline"
                        ) from None
                    raise UpstreamTimeout(f"{model} did not answer within {timeout[1]:g}s") from None
                except ServiceError as exc:
                    # the client's own mistakes (4xx) say nothing about the replica's health
                    if exc.status < 500:
                        breaker.success()
                    else:
                        breaker.failure()
                        metrics.MEMBER_FAILURES.labels(model, exc.code).inc()
                    raise
                except BaseException:
                    breaker.failure()
                    metrics.MEMBER_FAILURES.labels(model, "error").inc()
                    raise
                breaker.success()
                metrics.MEMBER_SECONDS.labels(model).observe(time.perf_counter() - started)
                if result is None:  # loading or shutting down: try another replica
                    metrics.MEMBER_FAILURES.labels(model, "not_ready").inc()
                    self.registry.mark_down(replica)
                    reason = "replica not ready"
                    continue
                return result
        if overloaded:
            raise Overloaded(f"every replica of {model} is at capacity; retry shortly")
        raise ModelUnavailable(f"{model} is unavailable: {reason}")

    def _breaker(self, url: str) -> Breaker:
        with self._labels_lock:
            if url not in self._breakers:
                self._breakers[url] = Breaker(self.breaker_fail_max, self.breaker_reset_s)
            return self._breakers[url]

    def _exchange(
        self,
        url: str,
        model: str,
        count: int,
        params: dict[str, str],
        timeout: tuple[float, float],
        body: dict[str, Any],
    ) -> dict[str, Any] | None:
        """One call to one replica: its parsed answer, or None when it is not ready (503)."""
        response = self.session.post(f"{url}/v1/predict", params=params, timeout=timeout, **body)
        if response.status_code == 503:
            if _error_code(response) == Overloaded.code:
                raise Overloaded(f"{model} replica {url} is at capacity")
            return None
        return self._parse(model, response, count)

    @staticmethod
    def _parse(model: str, response: requests.Response, count: int) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise BadUpstreamResponse(f"{model} answered {response.status_code} without a JSON object")
        if 400 <= response.status_code < 500 and isinstance(body.get("error"), dict):
            error = body["error"]  # the member judged the request itself: pass its verdict on
            raise ServiceError(
                str(error.get("message", "rejected")),
                status=response.status_code,
                code=str(error.get("code", "bad_request")),
            )
        if count == 1 and "results" not in body and "predictions" in body:  # a raw-body answer
            body["results"] = [
                {"index": 0, **{k: body[k] for k in ("predictions", "probabilities") if k in body}}
            ]
        results = body.get("results")
        if response.status_code != 200 or not isinstance(results, list) or len(results) != count:
            raise BadUpstreamResponse(f"{model} answered {response.status_code} with an unexpected body")
        if not all(_valid_result(result) for result in results):
            raise BadUpstreamResponse(f"{model} answered with malformed predictions")
        return body

    def labels(self, model: str, labels_hash: str) -> Labels:
        """The label set with this hash, fetched once from a replica of ``model`` and cached."""
        with self._labels_lock:
            if labels_hash in self._labels:
                return self._labels[labels_hash]
        for replica in self.registry.candidates(model):
            try:
                response = self.session.get(f"{replica.url}/v1/labels", timeout=self.timeout)
                body = response.json()
                labels = from_json(body["labels"])
            except (requests.RequestException, ValueError, KeyError, TypeError):
                continue
            if labels.digest == labels_hash:
                with self._labels_lock:
                    self._labels[labels_hash] = labels
                return labels
        raise ModelUnavailable(f"cannot fetch the labels of {model}")
