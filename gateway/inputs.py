"""Every way a client can hand us images, normalised to a list of byte strings.

Accepted: multipart ``file`` (one) or repeated ``files`` (batch); a form field ``image`` (base64)
or ``url``; JSON ``{"image": "<base64 or data: URI>"}``, ``{"url": "..."}`` or
``{"images": [<base64> | {"image": ...} | {"url": ...}, ...]}``; a raw body with an ``image/*``
(or ``application/octet-stream``) Content-Type. Counts are capped before anything is decoded. The
URLs of a request are read first and then fetched together, by the client's deadline if it gave
one (``X-Deadline-Ms`` or ``?timeout_ms=``): a URL that fails, or misses it, fails its item alone.
Requests that fetch are admitted by a ``UrlGate``: a bounded share of the worker's threads, and of
that a bounded share per client, refused at once past either (never parked on a thread).
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from flask import Request

from common import web
from common.errors import BadRequest, ImageTooLarge, ServiceError, UnsupportedMediaType
from fleet.predict import ImageInput

FetchAll = Callable[[Sequence[str], float | None], list[bytes | ServiceError]]
"""URLs and the client's deadline (``time.monotonic()``, or None) -> each URL's bytes or error."""

_DATA_URI = re.compile(r"^data:[\w.+/-]*(;[\w=.+-]+)*;base64,", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class _Url:
    """An item to fetch, once every item of the request has been read."""

    url: str


_Read = tuple[str, bytes | _Url | ServiceError]  # one item: its name, and what was read of it


def decode_base64(text: object, max_bytes: int) -> bytes:
    """Strict base64 (optional ``data:`` prefix, whitespace ignored), length capped first."""
    if not isinstance(text, str):
        raise BadRequest("image must be a base64 string")
    text = _WHITESPACE.sub("", _DATA_URI.sub("", text.strip(), count=1))
    if text.startswith("data:"):
        raise BadRequest("data: URIs must be base64-encoded (data:image/...;base64,...)")
    if len(text) > (max_bytes // 3 + 1) * 4:
        raise ImageTooLarge(f"base64 image decodes to more than {max_bytes} bytes")
    if "-" in text or "_" in text:
        text = text.replace("-", "+").replace("_", "/")  # URL-safe alphabet
    if len(text) % 4:
        raise BadRequest("image is not valid base64: bad padding", code="invalid_base64")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("image is not valid base64", code="invalid_base64") from None


class FetchBusy(ServiceError):
    status, code, retry_after = 503, "fetch_busy", 1


class UrlGate:
    """At most ``total`` requests fetching image URLs at once in this process, and ``per_client``
    of one client's: a request past either is refused at once (503 ``fetch_busy`` with
    ``Retry-After``), never parked on a thread, so hosts that never answer hold at most ``total``
    of the worker's threads and one client at most ``per_client``."""

    def __init__(self, total: int, per_client: int) -> None:
        self.total = total
        self.per_client = per_client
        self.in_flight = 0
        self.by_client: dict[str, int] = {}  # only clients fetching now: it does not grow with history
        self._lock = threading.Lock()

    @contextmanager
    def enter(self, client: str) -> Iterator[None]:
        with self._lock:
            if self.in_flight >= self.total:
                raise FetchBusy(
                    f"{self.total} requests are fetching image URLs already (GATEWAY_URL_REQUESTS); "
                    "retry shortly, or send the image itself"
                )
            if self.by_client.get(client, 0) >= self.per_client:
                raise FetchBusy(
                    f"you have {self.per_client} requests fetching image URLs already "
                    "(GATEWAY_URL_REQUESTS_PER_CLIENT); retry when one has answered"
                )
            self.in_flight += 1
            self.by_client[client] = self.by_client.get(client, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                self.in_flight -= 1
                self.by_client[client] -= 1
                if not self.by_client[client]:
                    del self.by_client[client]


class InputReader:
    """Reads a Flask request into ``ImageInput`` items (``fetch_all`` downloads ``url`` items,
    admitted by ``gate`` as ``caller()``'s)."""

    def __init__(
        self,
        *,
        max_images: int,
        max_image_bytes: int,
        fetch_all: FetchAll,
        gate: UrlGate | None = None,
        caller: Callable[[], str] = lambda: "",
    ) -> None:
        self.max_images = max_images
        self.max_image_bytes = max_image_bytes
        self.fetch_all = fetch_all
        self.gate = gate
        self.caller = caller

    def read(self, request: Request) -> tuple[list[ImageInput], bool]:
        """The request's images and whether the client asked for a batch answer."""
        read, batch = self._read(request)
        urls = [value.url for _, value in read if isinstance(value, _Url)]
        fetched = iter(self._fetch(urls) if urls else [])
        items = []
        for name, value in read:
            found = next(fetched) if isinstance(value, _Url) else value
            items.append(
                ImageInput(name, error=found) if isinstance(found, ServiceError) else ImageInput(name, found)
            )
        return items, batch

    def _fetch(self, urls: list[str]) -> list[bytes | ServiceError]:
        if self.gate is None:
            return self.fetch_all(urls, self._deadline())
        with self.gate.enter(self.caller()):
            return self.fetch_all(urls, self._deadline())

    @staticmethod
    def _deadline() -> float | None:
        """The client's deadline as ``time.monotonic()``, if it gave one."""
        budget_s = web.deadline_s()
        return time.monotonic() + budget_s if budget_s else None

    def _read(self, request: Request) -> tuple[list[_Read], bool]:
        mimetype = request.mimetype
        if mimetype == "multipart/form-data" or mimetype == "application/x-www-form-urlencoded":
            return self._form(request)
        if mimetype == "application/json":
            return self._json(request.get_data(cache=False))
        if mimetype.startswith("image/") or mimetype == "application/octet-stream":
            return [("body", request.get_data(cache=False))], False
        if not mimetype and not request.content_length:
            raise BadRequest(
                "send an image: multipart 'file', JSON {'image'|'url'|'images'}, "
                "a form field 'image', or a raw image/* body"
            )
        raise UnsupportedMediaType(
            f"Content-Type {mimetype or 'missing'} is not accepted; use "
            "multipart/form-data, application/json or image/*"
        )

    def _check_count(self, count: int) -> None:
        if count > self.max_images:
            raise BadRequest(
                f"{count} images in one request; the limit is {self.max_images}", code="too_many_images"
            )

    def _form(self, request: Request) -> tuple[list[_Read], bool]:
        batch_files = request.files.getlist("files")
        if batch_files:
            self._check_count(len(batch_files))
            return [(f.filename or f"files[{i}]", f.read()) for i, f in enumerate(batch_files)], True
        single = request.files.get("file")
        if single is not None:
            return [(single.filename or "file", single.read())], False
        if "image" in request.form:
            return [
                self._item("image", lambda: decode_base64(request.form["image"], self.max_image_bytes))
            ], False
        if "url" in request.form:
            return [("url", _Url(request.form["url"]))], False
        raise BadRequest("form has no image: send a 'file' or 'files' part, or an 'image' or 'url' field")

    def _json(self, raw: bytes) -> tuple[list[_Read], bool]:
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            raise BadRequest("body is not valid JSON", code="invalid_json") from None
        if not isinstance(body, dict):
            raise BadRequest("JSON body must be an object with 'image', 'url' or 'images'")
        if "images" in body:
            items = body["images"]
            if not isinstance(items, list) or not items:
                raise BadRequest("'images' must be a non-empty list")
            self._check_count(len(items))
            return [
                self._item(f"images[{i}]", functools.partial(self._json_image, v, bare_string=True))
                for i, v in enumerate(items)
            ], True
        if "image" in body or "url" in body:
            return [self._item("image", lambda: self._json_image(body, bare_string=False))], False
        raise BadRequest("JSON body needs 'image' (base64), 'url', or 'images' (a list)")

    def _json_image(self, value: object, *, bare_string: bool) -> bytes | _Url:
        if isinstance(value, dict) and "url" in value:
            if not isinstance(value["url"], str):
                raise BadRequest("'url' must be a string")
            return _Url(value["url"])
        if isinstance(value, dict) and "image" in value:
            return decode_base64(value["image"], self.max_image_bytes)
        if isinstance(value, str) and bare_string:
            return decode_base64(value, self.max_image_bytes)
        raise BadRequest("each image must be a base64 string or an object with 'image' or 'url'")

    @staticmethod
    def _item(name: str, read: Callable[[], bytes | _Url]) -> _Read:
        """Run one item's reader, keeping its error on the item (one bad image spares the rest)."""
        try:
            return name, read()
        except ServiceError as exc:
            return name, exc
