"""One HTTP exchange with one replica, and how far it got.

``Transport.predict`` returns the member's parsed answer (``replies.parse``) or raises one outcome:
``NotSent`` (no connection: refused, unresolvable, connect time-out), ``ReplyLost`` (the request went
out, the answer did not come back whole), ``NoAnswer`` (read time-out: it may still be running),
``NotReady`` (503 while loading or draining), or the member's own verdicts: ``Overloaded`` (503 with
its ``Retry-After``), ``DeadlineExceeded`` (504: the request's budget ran out there), a 4xx
``ServiceError``, or ``BadUpstreamResponse``. What an outcome means for the replica's circuit and
for the next try is decided elsewhere (``accounting.py``, ``failover.py``).
"""

from __future__ import annotations

import contextlib
import http.client
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

import requests
from requests import PreparedRequest
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError, ProtocolError, ReadTimeoutError

from common.errors import DeadlineExceeded, Overloaded
from common.wire import DEADLINE_HEADER, IMAGE_LENGTHS_HEADER, REQUEST_START_HEADER
from fleet import answers as replies
from fleet.answers import MemberReply
from fleet.replica import Replica

MEMBER_DEADLINE_CODES = frozenset({"deadline_exceeded", "inference_timeout"})
_NOT_CONNECTED = (NewConnectionError, ConnectTimeoutError, ConnectionRefusedError)
_CONNECTION_USED = (
    ProtocolError,
    http.client.HTTPException,  # RemoteDisconnected, IncompleteRead
    ConnectionResetError,
    ConnectionAbortedError,
    BrokenPipeError,
)


class NotSent(Exception):
    """No connection was made: nothing reached the replica."""


class ReplyLost(Exception):
    """The request went out; the answer was reset, cut off or garbled on its way back."""


class NotReady(Exception):
    """The replica answered 503 without ``overloaded``: it is loading or shutting down."""


class NoAnswer(Exception):
    """No answer within the read time-out; ``clipped`` when that was the request's own deadline."""

    def __init__(self, message: str, *, clipped: bool) -> None:
        super().__init__(message)
        self.clipped = clipped


def new_session(pool_size: int, hosts: int = 64) -> requests.Session:
    """A keep-alive session keeping ``pool_size`` connections to each of up to ``hosts`` replicas."""
    session = requests.Session()
    # NOTE: member traffic is internal: no proxies or .netrc from the environment. Looking them up
    # also cost ~0.7 ms per call (requests scans os.environ every time).
    session.trust_env = False
    adapter = requests.adapters.HTTPAdapter(pool_connections=hosts, pool_maxsize=pool_size, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and everything it wraps: arguments, ``reason`` (urllib3) and explicit causes."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        error = todo.pop()
        if id(error) in seen:
            continue
        seen.add(id(error))
        yield error
        wrapped = (*error.args, getattr(error, "reason", None), error.__cause__)
        todo.extend(e for e in wrapped if isinstance(e, BaseException))


def sent_nothing(exc: requests.ConnectionError) -> bool:
    """Did this error happen before the request reached the replica?

    A connect time-out or a failed connect among its causes says so; a used connection that broke
    (reset, closed without an answer, protocol error) says the request went out. An error that
    names neither counts as a failed connect, the reading failover has always given it.
    """
    causes = list(_causes(exc))
    if isinstance(exc, requests.ConnectTimeout) or any(isinstance(c, _NOT_CONNECTED) for c in causes):
        return True
    return not any(isinstance(c, _CONNECTION_USED) for c in causes)


def prepared(
    url: str, params: dict[str, str], images: list[bytes], headers: dict[str, str]
) -> PreparedRequest:
    """The member request, ready for an adapter. One image travels as the raw body (cheapest for
    both sides), several one after another with their lengths in ``X-Image-Lengths`` (a multipart
    body costs ~0.2 ms per image to write here and to parse there), set down as they are: a URL, its
    headers and the bytes need none of ``prepare``'s checks (0.08 ms a call)."""
    request = PreparedRequest()
    request.method = "POST"
    request.url = f"{url}?{urlencode(params)}" if params else url
    request.headers = CaseInsensitiveDict(headers)
    request.headers["Content-Type"] = "application/octet-stream"
    if len(images) == 1:
        request.body = images[0]
    else:
        request.headers[IMAGE_LENGTHS_HEADER] = ",".join(str(len(image)) for image in images)
        request.body = b"".join(images)
    request.headers["Content-Length"] = str(len(request.body))
    return request


class Transport:
    """``POST /v1/predict`` to one replica, with the request's remaining budget."""

    def __init__(self, session: requests.Session, connect_timeout_s: float, read_timeout_s: float) -> None:
        self.session = session
        self.adapter = session.get_adapter("http://")
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s

    def predict(
        self,
        replica: Replica,
        model: str,
        images: list[bytes],
        params: dict[str, str],
        headers: dict[str, str],
        deadline: float,
        fresh: bool = False,
    ) -> MemberReply:
        """One exchange; the member's answer with one result per image, or an outcome (see module).

        ``fresh``: on a new connection, not a pooled one. The retry of a lost reply goes out so: a
        replica shutting down closes its idle keep-alive connections, and a request written onto one
        of those is lost, where a new connection is refused unsent and the next replica asked."""
        response = self._exchange(replica, model, "/v1/predict", images, params, headers, deadline, fresh)
        return replies.parse(model, response, len(images))

    def explain(
        self,
        replica: Replica,
        model: str,
        images: list[bytes],
        params: dict[str, str],
        headers: dict[str, str],
        deadline: float,
        fresh: bool = False,
    ) -> dict[str, Any]:
        """``POST /v1/explain`` of one image: the member's checked explanation (``replies.explanation``)."""
        response = self._exchange(replica, model, "/v1/explain", images, params, headers, deadline, fresh)
        return replies.explanation(model, response)

    def _exchange(
        self,
        replica: Replica,
        model: str,
        path: str,
        images: list[bytes],
        params: dict[str, str],
        headers: dict[str, str],
        deadline: float,
        fresh: bool,
    ) -> requests.Response:
        """One request to ``path``; the answer, once a 503 or a deadline 504 has been raised."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded(f"the request's deadline passed before {model} answered")
        read_s = min(self.read_timeout_s, remaining)
        headers = {**replica.headers, **headers}
        if remaining < float("inf"):  # pass the rest of the budget on: the member drops late work
            headers[DEADLINE_HEADER] = str(max(1, int(remaining * 1000)))
            # from now: time the call then waits for one of the member's threads counts against it
            headers[REQUEST_START_HEADER] = f"t={time.time():.3f}"
        request = prepared(f"{replica.url}{path}", params, images, headers)
        try:
            # NOTE: straight to the session's adapter (its connection pool), not session.post: the
            # session's cookies, hooks, redirects and settings merging cost ~0.1 ms a call, of no
            # use between the gateway and its replicas; read whole here, as session.post would.
            new = contextlib.closing(HTTPAdapter(max_retries=0)) if fresh else None
            with new or contextlib.nullcontext(self.adapter) as adapter:
                response = adapter.send(request, timeout=(self.connect_timeout_s, read_s))
                response.content  # noqa: B018 - the body is read here, its errors caught below
        except requests.ConnectionError as exc:  # ConnectTimeout included
            if any(isinstance(c, ReadTimeoutError) for c in _causes(exc)):  # while reading the body
                raise NoAnswer(f"{model} stopped answering", clipped=read_s < self.read_timeout_s) from exc
            if sent_nothing(exc):
                raise NotSent(f"replica unreachable ({type(exc).__name__})") from exc
            raise ReplyLost(f"replica answered with a broken response ({type(exc).__name__})") from exc
        except requests.Timeout as exc:
            raise NoAnswer(
                f"{model} did not answer within {read_s:g}s", clipped=read_s < self.read_timeout_s
            ) from exc
        except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError) as exc:
            raise ReplyLost(f"replica answered with a broken response ({type(exc).__name__})") from exc
        self._verdict(model, replica, response)
        return response

    @staticmethod
    def _verdict(model: str, replica: Replica, response: requests.Response) -> None:
        """Raise what a 503 or a deadline 504 says; other answers are read by the caller."""
        if response.status_code == 503:
            if replies.error_code(response) == Overloaded.code:
                raise Overloaded(
                    f"{model} replica {replica.url} is at capacity", retry_after=replies.retry_after(response)
                )
            raise NotReady(f"{model} replica {replica.url} is not ready")
        if response.status_code == 504 and replies.error_code(response) in MEMBER_DEADLINE_CODES:
            raise DeadlineExceeded(f"{model} could not answer within the request's deadline")
