"""Unpack a job's or a training's archive (zip or tar, plain or gzip/bzip2/xz) into a job folder, safely.

Policy: the archive's listing is checked whole before anything is written (names, entry types,
counts, declared sizes) and a hostile or oversized archive is refused with one error naming every
problem. Then each file is copied in 1 MiB chunks while its bytes are counted, and the first chunk
past a limit stops the copy: declared sizes are never the only guard. Files land as ``000000``,
``000001``, ... in the order of their sorted names, so no name from the archive ever reaches the file
system. On any error every file written is removed again.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import re
import stat
import struct
import tarfile
import unicodedata
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, BinaryIO, Protocol

from common.errors import BadRequest, PayloadTooLarge, ServiceError
from common.training.dataset import Entry

_CHUNK = 1 << 20
_RATIO_FLOOR = 1 << 20
"""Ratios are guarded only above this many unpacked bytes: tiny files compress absurdly well."""
_MAX_TAR_READ = 4 << 20
"""The largest single read a tar may ask for: its headers (file data comes in chunks)."""
_MAX_NAME_CHARS = 1024
_MAX_LISTED = 10
_ZIP_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
_DRIVE = re.compile(r"[A-Za-z]:")
_SEVERITY = ("unsafe_archive", "invalid_archive", "too_many_images", "archive_too_large")
# NOTE: what zipfile, tarfile and the decompressors raise on corrupt or truncated input; only reads
# are guarded with it, so a full disk while writing stays a 500.
_CORRUPT = (
    EOFError,
    OSError,
    ValueError,
    NotImplementedError,
    RuntimeError,
    struct.error,
    zlib.error,
    lzma.LZMAError,
    zipfile.BadZipFile,
    tarfile.TarError,
)


@dataclass(frozen=True)
class ArchiveLimits:
    """What one job's archive may hold."""

    max_images: int
    """Most files (items) in the archive."""
    max_uncompressed_bytes: int
    """Total bytes of all files once unpacked."""
    max_ratio: float
    """Largest unpacked/compressed ratio, per zip entry and for the whole archive (above 1 MiB)."""
    max_file_bytes: int
    """Largest single file once unpacked (the gateway's max image bytes)."""


@dataclass(frozen=True)
class _Member:
    """One entry as the archive lists it, before any check."""

    name: str  # as stored (zip: before zipfile cuts it at a NUL)
    kind: str  # "file", "folder", or what else it is ("a symbolic link")
    size: int  # declared unpacked size
    packed: int | None  # zip: declared compressed size, for the per-entry ratio
    open: Callable[[], IO[bytes]]
    problem: str | None = None  # why the listing alone makes it unreadable (zip: encrypted)


class _Refused(Exception):
    """(code, message) problems; ``unpack`` turns them into one ServiceError."""

    def __init__(self, *problems: tuple[str, str]) -> None:
        super().__init__(problems)
        self.problems = list(problems)


class _Stream(Protocol):
    def read(self, size: int = ..., /) -> bytes: ...
    def seek(self, offset: int, whence: int = ..., /) -> int: ...


def unpack(
    source: Path, target: Path, limits: ArchiveLimits, on_write: Callable[[int], None] | None = None
) -> list[Entry]:
    """Unpack ``source`` (zip or tar, compressed or not, detected from its bytes) into ``target``.

    ``target`` is an existing empty folder: files are written as target/000000, target/000001, ...
    in the order of the sorted entry names, and returned in that order. Folders, names with a
    component starting with '.' and anything under ``__MACOSX/`` are skipped. Compression ratios
    are guarded only once more than 1 MiB is unpacked (per zip entry and for the whole archive):
    tiny files legitimately compress absurdly well. ``on_write`` is told of every chunk before it is
    written (a quota's meter): what it raises stops the unpacking and removes what was written.

    Raises:
        BadRequest: ``invalid_archive`` (not a zip/tar, corrupt, truncated, encrypted, no files),
            ``unsafe_archive`` (absolute, '..', backslash, drive-letter or control-character names,
            links, devices, duplicates) or ``too_many_images``.
        PayloadTooLarge: ``archive_too_large``: a file, the total or a compression ratio over its
            limit. On any error ``target`` is left as it was found.
    """
    created: list[Path] = []
    try:
        with ExitStack() as stack:
            return _unpack(source, target, limits, stack, created, on_write)
    except _Refused as refused:
        _remove(created)
        raise _refusal(refused.problems) from refused.__cause__
    except BaseException:
        _remove(created)
        raise


def _unpack(
    source: Path,
    target: Path,
    limits: ArchiveLimits,
    stack: ExitStack,
    created: list[Path],
    on_write: Callable[[int], None] | None,
) -> list[Entry]:
    file = stack.enter_context(source.open("rb"))
    meter = _Meter(limits, os.fstat(file.fileno()).st_size)
    meter.on_write = on_write
    magic = file.read(6)
    file.seek(0)
    problems: list[tuple[str, str]] = []
    if magic[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        members = _zip_members(file, limits, stack)
    else:
        members = _tar_members(file, magic, meter, stack, problems)
    plan = _plan(members, limits, meter, problems)
    # NOTE: copy in archive order (a compressed tar only streams forward), each file to its slot
    # in name order.
    slots = {id(member): index for index, (_, member) in enumerate(plan)}
    for member in members:
        if (index := slots.get(id(member))) is None:
            continue
        name = plan[index][0]
        with _reading(f"{_quote(name)} is corrupt or truncated"):
            stream = member.open()
        path = target / f"{index:06d}"
        with stream, path.open("xb") as out:
            created.append(path)
            _copy(stream, out, name, member.packed, meter)
    return [Entry(name, target / f"{index:06d}") for index, (name, _) in enumerate(plan)]


def _plan(
    members: list[_Member], limits: ArchiveLimits, meter: _Meter, problems: list[tuple[str, str]]
) -> list[tuple[str, _Member]]:
    """Check every entry before anything is written; the files to unpack, sorted by name."""
    files: dict[str, _Member] = {}
    total = 0
    for member in members:
        try:
            name = _normalise(member.name)
        except ValueError as why:
            problems.append(("unsafe_archive", f"{_quote(member.name)} {why}"))
            continue
        if member.kind not in ("file", "folder"):
            problems.append(("unsafe_archive", f"{_quote(member.name)} is {member.kind}"))
        elif member.kind == "file" and not _skipped(name):
            if not name or name in files:
                duplicate = "has an empty name" if not name else "is listed more than once"
                problems.append(("unsafe_archive", f"{_quote(member.name)} {duplicate}"))
            elif member.problem:
                problems.append(("invalid_archive", f"{_quote(name)} {member.problem}"))
            else:
                files[name] = member
                total += member.size
                if too_large := meter.file_problem(name, member.size, member.packed):
                    problems.append(("archive_too_large", too_large))
    if len(files) > limits.max_images:
        problems.append(("too_many_images", f"{len(files)} files; at most {limits.max_images} allowed"))
    if too_large := meter.total_problem(total):
        problems.append(("archive_too_large", too_large))
    if not files and not problems:
        problems.append(("invalid_archive", "the archive holds no files"))
    if problems:
        raise _Refused(*problems)
    return sorted(files.items())


def _normalise(raw: str) -> str:
    """``raw`` without '.' or empty components; raises ValueError saying why it is unsafe."""
    if len(raw) > _MAX_NAME_CHARS:
        raise ValueError(f"has a name longer than {_MAX_NAME_CHARS} characters")
    if any(unicodedata.category(char) == "Cs" for char in raw):
        raise ValueError("has a name that is not valid UTF-8")
    if any(unicodedata.category(char) == "Cc" for char in raw):
        raise ValueError("has control characters in its name")
    if "\\" in raw:
        raise ValueError("has a backslash in its name")
    if raw.startswith("/"):
        raise ValueError("is an absolute path")
    parts = [part for part in raw.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise ValueError("has a '..' component")
    if parts and _DRIVE.match(parts[0]):
        raise ValueError("starts with a drive letter")
    return "/".join(parts)


def _skipped(name: str) -> bool:
    parts = name.split("/")
    return parts[0] == "__MACOSX" or any(part.startswith(".") for part in parts)


class _Meter:
    """Holds sizes to the limits: declared ones while planning, counted ones while copying."""

    def __init__(self, limits: ArchiveLimits, source_size: int) -> None:
        self.limits, self.source_size, self.total = limits, source_size, 0
        self.on_write: Callable[[int], None] | None = None

    def file_problem(self, name: str, size: int, packed: int | None) -> str | None:
        limits = self.limits
        if size > limits.max_file_bytes:
            return f"{_quote(name)} unpacks to more than {limits.max_file_bytes} bytes, the most per file"
        if packed is not None and size > 0 and (packed == 0 or size > _RATIO_FLOOR):
            if size > limits.max_ratio * packed:
                return f"{_quote(name)} has a compression ratio above {limits.max_ratio:g}"
        return None

    def total_problem(self, total: int) -> str | None:
        limits = self.limits
        if total > limits.max_uncompressed_bytes:
            return f"the files unpack to more than {limits.max_uncompressed_bytes} bytes in all"
        if total > _RATIO_FLOOR and total > limits.max_ratio * self.source_size:
            return (
                f"the files unpack to more than {limits.max_ratio:g} times the archive's "
                f"{self.source_size} bytes: a compression ratio above {limits.max_ratio:g}"
            )
        return None

    def stream_limit(self, entries: int) -> int:
        """How far a tar's unpacked stream may run: the files' limit plus room for headers."""
        limits = self.limits
        by_ratio = max(_RATIO_FLOOR, int(limits.max_ratio * self.source_size))
        return min(limits.max_uncompressed_bytes, by_ratio) + 1024 * entries + 20480


def _copy(stream: IO[bytes], out: BinaryIO, name: str, packed: int | None, meter: _Meter) -> None:
    """Copy in chunks, counting; the first chunk past a limit is refused before it is written."""
    written = 0
    while chunk := _read(stream, name):
        written += len(chunk)
        meter.total += len(chunk)
        problem = meter.file_problem(name, written, packed) or meter.total_problem(meter.total)
        if problem:
            raise _Refused(("archive_too_large", problem))
        if meter.on_write is not None:
            meter.on_write(len(chunk))
        out.write(chunk)


def _read(stream: IO[bytes], name: str) -> bytes:
    with _reading(f"{_quote(name)} is corrupt or truncated"):
        return stream.read(_CHUNK)


@contextmanager
def _reading(message: str = "the archive is corrupt or truncated") -> Iterator[None]:
    try:
        yield
    except _CORRUPT as error:
        raise _Refused(("invalid_archive", message)) from error


def _zip_members(file: BinaryIO, limits: ArchiveLimits, stack: ExitStack) -> list[_Member]:
    cap = _max_entries(limits)
    # NOTE: zipfile loads the whole central directory (~400 bytes of objects per entry) at once.
    if (_zip_entry_count(file) or 0) > cap:
        raise _Refused(_too_many_entries(cap))
    with _reading():
        archive = stack.enter_context(zipfile.ZipFile(file))
    if len(archive.infolist()) > cap:
        raise _Refused(_too_many_entries(cap))
    return [
        _Member(
            info.orig_filename,
            _zip_kind(info),
            info.file_size,
            info.compress_size,
            partial(archive.open, info),
            _zip_problem(info),
        )
        for info in archive.infolist()
    ]


def _zip_problem(info: zipfile.ZipInfo) -> str | None:
    if info.flag_bits & 0x1:
        return "is encrypted"
    return None if info.compress_type in _ZIP_METHODS else "uses an unsupported compression method"


def _zip_kind(info: zipfile.ZipInfo) -> str:
    mode = info.external_attr >> 16
    if info.is_dir() or stat.S_ISDIR(mode):
        return "folder"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    return "file" if stat.S_IFMT(mode) in (0, stat.S_IFREG) else "a special file"


def _zip_entry_count(file: BinaryIO) -> int | None:
    """The entry count in the zip's end record (zip64 too); None where there is none."""
    end = file.seek(0, os.SEEK_END)
    file.seek(max(0, end - 22 - 0xFFFF))
    tail = file.read()
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < 22:
        return None
    (count,) = struct.unpack_from("<H", tail, at + 10)
    locator = at - 20
    if count == 0xFFFF and locator >= 0 and tail[locator : locator + 4] == b"PK\x06\x07":
        (offset,) = struct.unpack_from("<Q", tail, locator + 8)
        if offset > end - 56:  # NOTE: a client's number: seeking to 2**63 raises, not a zip error
            raise _Refused(("invalid_archive", "the zip64 end record points outside the archive"))
        file.seek(offset)
        record = file.read(56)
        if len(record) == 56 and record[:4] == b"PK\x06\x06":
            (count,) = struct.unpack_from("<Q", record, 32)
    file.seek(0)
    return int(count)


def _tar_members(
    file: BinaryIO, magic: bytes, meter: _Meter, stack: ExitStack, problems: list[tuple[str, str]]
) -> list[_Member]:
    """Read a tar's headers one by one; a problem that stops the reading joins ``problems``."""
    cap = _max_entries(meter.limits)
    inner: _Stream = file
    if magic.startswith(b"\x1f\x8b"):
        inner = stack.enter_context(gzip.GzipFile(fileobj=file, mode="rb"))
    elif magic.startswith(b"BZh"):
        inner = stack.enter_context(bz2.BZ2File(file))
    elif magic.startswith(b"\xfd7zXZ\x00"):
        inner = stack.enter_context(lzma.LZMAFile(file))
    bounded = _Bounded(inner, meter.stream_limit(cap), meter)
    with _reading("not a zip or tar archive, or a corrupt one"):
        tar = stack.enter_context(
            tarfile.open(fileobj=bounded, mode="r:", encoding="utf-8", errors="surrogateescape")
        )
    members: list[_Member] = []
    try:
        while True:
            if len(members) >= cap:
                raise _Refused(_too_many_entries(cap))
            with _reading():
                info = tar.next()
            if info is None:
                return members
            if info.size < 0:
                raise _Refused(("invalid_archive", f"{_quote(info.name)} has a negative size"))
            members.append(_Member(info.name, _tar_kind(info), info.size, None, partial(_extract, tar, info)))
    except _Refused as refused:
        problems.extend(refused.problems)
        return members


def _extract(tar: tarfile.TarFile, info: tarfile.TarInfo) -> IO[bytes]:
    stream = tar.extractfile(info)
    if stream is None:  # only regular files are extracted, so this cannot happen
        raise _Refused(("invalid_archive", f"{_quote(info.name)} has no data"))
    return stream


def _tar_kind(info: tarfile.TarInfo) -> str:
    if info.isreg():
        return "file"
    if info.isdir():
        return "folder"
    if info.issym():
        return "a symbolic link"
    if info.islnk():
        return "a hard link"
    if info.ischr() or info.isblk():
        return "a device"
    return "a fifo" if info.isfifo() else "of an unsupported type"


class _Bounded:
    """A tar's unpacked stream that refuses to run past its limit.

    Reading a tar's listing means decompressing everything before its last header, skipped
    entries and tarfile's own header buffers included; this bounds that work and memory.
    """

    def __init__(self, inner: _Stream, limit: int, meter: _Meter) -> None:
        self.inner, self.limit, self.meter, self.position = inner, limit, meter, 0

    def read(self, size: int = -1) -> bytes:
        if size < 0 or size > _MAX_TAR_READ:
            raise _Refused(("invalid_archive", "the archive has a header block over 4 MiB"))
        self._check(self.position + size)
        with _reading():
            data = self.inner.read(size)
        self.position += len(data)
        return data

    def seek(self, position: int, whence: int = os.SEEK_SET) -> int:
        if whence != os.SEEK_SET:
            raise _Refused(("invalid_archive", "the archive cannot be read in order"))
        self._check(position)
        with _reading():
            self.position = self.inner.seek(position)
        return self.position

    def tell(self) -> int:
        return self.position

    def write(self, data: bytes) -> int:
        raise OSError("read-only")

    def close(self) -> None:
        """The stack closes the inner stream."""

    def _check(self, position: int) -> None:
        if position > self.limit:
            problem = self.meter.total_problem(position) or "the archive unpacks to too many bytes"
            raise _Refused(("archive_too_large", problem))


def _max_entries(limits: ArchiveLimits) -> int:
    """Entries read at most: folders and macOS's ``__MACOSX/._*`` twins come with the images."""
    return 4 * limits.max_images + 1024


def _too_many_entries(cap: int) -> tuple[str, str]:
    return "too_many_images", f"the archive lists more than {cap} entries (files and folders)"


def _refusal(problems: list[tuple[str, str]]) -> ServiceError:
    messages = list(dict.fromkeys(message for _, message in problems))
    shown = "; ".join(messages[:_MAX_LISTED])
    if len(messages) > _MAX_LISTED:
        shown += f"; and {len(messages) - _MAX_LISTED} more"
    codes = {code for code, _ in problems}
    code = next(code for code in _SEVERITY if code in codes)
    error = PayloadTooLarge if code == "archive_too_large" else BadRequest
    return error(f"archive refused: {shown}", code=code)


def _quote(name: str) -> str:
    quoted = repr(name)
    return quoted if len(quoted) <= 80 else quoted[:76] + "...'"


def _remove(paths: list[Path]) -> None:
    for path in reversed(paths):
        path.unlink(missing_ok=True)
