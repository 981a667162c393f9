"""Receiving a job's images onto disk: nothing of an upload is held in memory.

Accepted bodies: multipart with an ``archive`` part (zip or tar, compressed or not; the path inside
is each item's name) and/or repeated ``files`` parts, read as a stream (werkzeug's sans-IO decoder)
and written part by part into the job's staging folder, one open file at a time; JSON
``{"images": [<base64> | {"image": ...} | {"url": ...}]}`` or ``{"urls": [...]}``, held in memory
under its own, smaller limit. Form fields and JSON may carry ``callback_url``.

Limits are checked as bytes arrive: the upload's size (``JOBS_MAX_ARCHIVE_BYTES``; Nginx enforces
it first), images per job, each file's size, the inputs' size (``JOBS_MAX_UNCOMPRESSED_BYTES``) and
the archive's own limits (``common.jobs.archive``). Every byte written to disk - an archive as it
arrives, then the files unpacked from it - is reserved first against the caller's quotas
(``common.tenancy.quotas.Reservation``). A refusal is a JSON 4xx and leaves nothing behind: the
caller removes the staging folder and releases the reservation.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from flask import Request
from werkzeug.http import parse_options_header
from werkzeug.sansio.multipart import Data, Epilogue, Field, File, MultipartDecoder, NeedData

from common.errors import (
    BadRequest,
    ImageTooLarge,
    PayloadTooLarge,
    ServiceError,
    UnsupportedMediaType,
)
from common.jobs.settings import JobSettings
from common.outcomes import error_json
from common.tenancy.quotas import Reservation
from gateway import archive
from gateway.inputs import decode_base64

READ_BYTES = 1024 * 1024
FIELD_BYTES = 8 * 1024  # a form field (callback_url) is short


@dataclass
class Received:
    """A job's items, in input order: ``{"name", "file"}`` (relative to the job folder),
    ``{"name", "url"}`` or ``{"name", "error"}`` (failed at submission; fails its item alone)."""

    items: list[dict[str, Any]] = field(default_factory=list)
    fields: dict[str, str] = field(default_factory=dict)
    bytes: int = 0
    """Bytes written into the job's ``inputs/`` (what the job keeps on disk)."""


class Intake:
    def __init__(
        self,
        settings: JobSettings,
        max_image_bytes: int,
        archive_field: str = "archive",
        fields: tuple[str, ...] = ("callback_url",),
    ) -> None:
        """``archive_field``: the multipart part that carries an archive (``dataset`` for training);
        ``fields``: the form fields kept (others are read past, never held)."""
        self.settings = settings
        self.max_image_bytes = max_image_bytes
        self.archive_field = archive_field
        self.fields = fields
        self.limits = archive.ArchiveLimits(
            max_images=settings.max_images,
            max_uncompressed_bytes=settings.max_uncompressed_bytes,
            max_ratio=settings.max_ratio,
            max_file_bytes=max_image_bytes,
        )
        # What a request holds, and the inputs it wrote so far: set on each request's own copy.
        self.reservation: Reservation | None = None
        self.written = 0

    def receive(self, request: Request, staging: Path, reservation: Reservation) -> Received:
        """Read ``request``'s images into ``staging`` (``inputs/``), every byte on disk reserved in
        ``reservation`` first; raises a 4xx ``ServiceError``. ``Received.bytes``: the inputs' bytes."""
        # NOTE: one Intake serves every request thread: each request meters on a copy of its own.
        reading = copy.copy(self)
        reading.reservation = reservation
        reading.written = 0
        received = reading._receive(request, staging)
        received.bytes = reading.written
        return received

    def _receive(self, request: Request, staging: Path) -> Received:
        (staging / "inputs").mkdir()
        mimetype = request.mimetype
        if mimetype == "multipart/form-data":
            received = self._multipart(request, staging)
        elif mimetype == "application/json":
            received = self._json(request, staging)
        else:
            raise UnsupportedMediaType(
                f"Content-Type {mimetype or 'missing'} is not accepted for a job; send multipart/form-data "
                "('archive' and/or 'files') or application/json ('images' or 'urls')"
            )
        if not received.items:
            raise BadRequest("the job has no images: send an 'archive', 'files', 'images' or 'urls'")
        self._check_count(len(received.items))
        return received

    @property
    def _held(self) -> Reservation:
        assert self.reservation is not None, "receive() sets it"
        return self.reservation

    def _check_count(self, count: int) -> None:
        allowed = min(self.settings.max_images, self._held.max_images)
        if count <= allowed:
            return
        if self._held.images_quota:
            raise self._held.over_images(count)
        raise BadRequest(
            f"more than {self.settings.max_images} images in one job (JOBS_MAX_IMAGES)",
            code="too_many_images",
        )

    def _meter(self, size: int) -> None:
        """Count ``size`` more bytes of inputs (files, unpacked archives) before they are written."""
        self.written += size
        if self.written > self.settings.max_uncompressed_bytes:
            raise PayloadTooLarge(
                f"the job's inputs exceed {self.settings.max_uncompressed_bytes} bytes on disk "
                "(JOBS_MAX_UNCOMPRESSED_BYTES)"
            )
        self._held.grow(size)

    # --- multipart --------------------------------------------------------------------------

    def _multipart(self, request: Request, staging: Path) -> Received:
        _, options = parse_options_header(request.headers.get("Content-Type", ""))
        boundary = options.get("boundary", "")
        if not boundary:
            raise BadRequest("multipart body without a boundary")
        if len(boundary) > 200 or not boundary.isascii() or not boundary.isprintable():
            raise BadRequest(
                "the multipart boundary must be printable ASCII (RFC 2046), at most 200 characters"
            )
        # The decoder's memory bound is on its buffer: one read plus what is left of the last.
        decoder = MultipartDecoder(
            boundary.encode("ascii"), 4 * READ_BYTES, max_parts=self.settings.max_images + 16
        )
        received = Received()
        stream = request.stream
        part: _Part | None = None
        total = 0
        try:
            while True:
                event = decoder.next_event()
                if isinstance(event, NeedData):
                    chunk = stream.read(READ_BYTES)
                    total += len(chunk)
                    if total > self.settings.max_archive_bytes:
                        limit = self.settings.max_archive_bytes
                        raise PayloadTooLarge(f"the upload exceeds {limit} bytes (JOBS_MAX_ARCHIVE_BYTES)")
                    decoder.receive_data(chunk or None)
                elif isinstance(event, File):
                    part = self._open_part(event, staging, received)
                elif isinstance(event, Field):
                    part = _Part(event.name, None, FIELD_BYTES) if event.name in self.fields else None
                elif isinstance(event, Data):
                    if part is not None:
                        part.write(event.data)
                        if not event.more_data:
                            part.close(received)
                            part = None
                elif isinstance(event, Epilogue):
                    break
        except ValueError as exc:  # werkzeug: malformed multipart
            raise BadRequest(f"malformed multipart body: {exc}") from None
        finally:
            if part is not None:
                part.close(None)
        return self._expand_archives(received, staging)

    def _open_part(self, event: File, staging: Path, received: Received) -> _Part | None:
        if event.name == self.archive_field:
            archives = sum(1 for item in received.items if "archive" in item)
            if archives >= self.settings.max_archives:
                raise BadRequest(
                    f"more than {self.settings.max_archives} '{self.archive_field}' parts in one request "
                    "(JOBS_MAX_ARCHIVES)",
                    code="too_many_parts",
                )
            path = staging / f"upload-{len(received.items)}"
            received.items.append({"archive": path})
            return _Part("archive", path, self.settings.max_archive_bytes, self._held.grow)  # on disk too
        if event.name == "files":
            self._check_count(len(received.items) + 1)
            relative = f"inputs/{len(received.items):06d}"
            name = (event.filename or f"files[{len(received.items)}]")[: self.settings.max_name_chars]
            received.items.append({"name": name, "file": relative})
            return _Part(event.name, staging / relative, self.max_image_bytes, self._meter)
        return None  # an unknown part is read past and ignored, as a form would

    def _expand_archives(self, received: Received, staging: Path) -> Received:
        """Put each archive's files, in their sorted order, where the archive was in the upload."""
        items: list[dict[str, Any]] = []
        for item in received.items:
            if "archive" not in item:
                items.append(item)
                continue
            upload: Path = item["archive"]
            target = staging / "inputs" / upload.name
            target.mkdir()
            # One meter for the whole request: each archive may use what the parts before it left.
            images_left = min(self.settings.max_images, self._held.max_images) - len(items)
            bytes_left = self.settings.max_uncompressed_bytes - self.written
            limits = replace(
                self.limits,
                max_images=max(0, images_left),
                max_uncompressed_bytes=max(0, min(self.limits.max_uncompressed_bytes, bytes_left)),
            )
            entries = archive.unpack(upload, target, limits, on_write=self._meter)
            upload.unlink()
            items += [
                {"name": e.name[: self.settings.max_name_chars], "file": str(e.path.relative_to(staging))}
                for e in entries
            ]
        return Received(items, received.fields)

    # --- JSON -------------------------------------------------------------------------------

    def _json(self, request: Request, staging: Path) -> Received:
        if (request.content_length or 0) > self.settings.max_json_bytes:
            raise PayloadTooLarge(
                f"a JSON job body is limited to {self.settings.max_json_bytes} bytes (JOBS_MAX_JSON_BYTES); "
                "send large jobs as an archive"
            )
        try:
            body = json.loads(request.get_data(cache=False))
        except (ValueError, RecursionError):
            raise BadRequest("body is not valid JSON", code="invalid_json") from None
        if not isinstance(body, dict):
            raise BadRequest("JSON body must be an object with 'images' or 'urls'")
        received = Received(fields={"callback_url": body["callback_url"]} if "callback_url" in body else {})
        if not isinstance(received.fields.get("callback_url", ""), str):
            raise BadRequest("'callback_url' must be a string")
        if "urls" in body and "images" in body:
            raise BadRequest("send 'images' or 'urls', not both")
        if "urls" in body:
            urls = body["urls"]
            if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
                raise BadRequest("'urls' must be a list of strings")
            self._check_count(len(urls))
            self._check_urls(urls)
            received.items = [{"name": url[: self.settings.max_name_chars], "url": url} for url in urls]
            return received
        images = body.get("images")
        if not isinstance(images, list):
            raise BadRequest("JSON job body needs 'images' (a list) or 'urls' (a list)")
        self._check_count(len(images))
        self._check_urls([v["url"] for v in images if isinstance(v, dict) and isinstance(v.get("url"), str)])
        for index, value in enumerate(images):
            received.items.append(self._json_item(index, value, staging))
        return received

    def _check_urls(self, urls: list[str]) -> None:
        if len(urls) > self.settings.max_urls:
            raise BadRequest(
                f"{len(urls)} URLs in one job; at most {self.settings.max_urls} (JOBS_MAX_URLS): fetching "
                "is slow, send the images themselves in an archive",
                code="too_many_urls",
            )
        if any(len(url) > self.settings.max_url_chars for url in urls):
            raise BadRequest(
                f"a URL is longer than {self.settings.max_url_chars} characters", code="invalid_url"
            )

    def _json_item(self, index: int, value: object, staging: Path) -> dict[str, Any]:
        name = f"images[{index}]"
        if isinstance(value, dict) and isinstance(value.get("name"), str):
            name = value["name"][: self.settings.max_name_chars]
        try:
            if isinstance(value, dict) and "url" in value:
                if not isinstance(value["url"], str):
                    raise BadRequest("'url' must be a string")
                return {"name": name, "url": value["url"]}
            raw = value["image"] if isinstance(value, dict) and "image" in value else value
            if not isinstance(raw, str):
                raise BadRequest("each image must be a base64 string or an object with 'image' or 'url'")
            data = decode_base64(raw, self.max_image_bytes)
        except ServiceError as exc:
            return {"name": name, "error": error_json(exc)}
        self._meter(len(data))
        relative = f"inputs/{index:06d}"
        (staging / relative).write_bytes(data)
        return {"name": name, "file": relative}


class _Part:
    """One multipart part being received: a file written as it arrives, or a short field."""

    def __init__(
        self, name: str, path: Path | None, max_bytes: int, meter: Callable[[int], None] | None = None
    ) -> None:
        self.name = name
        self.path = path
        self.max_bytes = max_bytes
        self.meter = meter
        self.size = 0
        self.buffer = bytearray()
        self.out = path.open("wb") if path is not None else None

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.max_bytes:
            if self.name == "files":
                raise ImageTooLarge(f"a file of the job exceeds {self.max_bytes} bytes")
            if self.name == "archive":
                raise PayloadTooLarge(f"the archive exceeds {self.max_bytes} bytes")
            raise BadRequest(f"form field {self.name!r} is longer than {self.max_bytes} bytes")
        if self.meter is not None:
            self.meter(len(data))
        if self.out is not None:
            self.out.write(data)
        else:
            self.buffer += data

    def close(self, received: Received | None) -> None:
        if self.out is not None:
            self.out.close()
        elif received is not None:  # a form field (callback_url; a training job's options)
            received.fields[self.name] = self.buffer.decode("utf-8", "replace")
