"""Job uploads from disk: a folder zipped into a temporary file, and a multipart body read from that
file (or an archive as it is) while it is sent, so neither is ever held in memory whole."""

from __future__ import annotations

import io
import mimetypes
import os
import uuid
import zipfile
from pathlib import Path
from typing import IO


def zip_folder(folder: Path, out: IO[bytes]) -> int:
    """Write every regular file under ``folder`` into a zip on ``out`` under its relative path,
    skipping hidden files and folders; returns how many files it holds."""
    count = 0
    # Photos are compressed already: storing them costs no CPU, and the server's ratio guard has
    # nothing to object to when someone's folder holds a large, very compressible file.
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for root, folders, files in os.walk(folder):
            folders[:] = sorted(name for name in folders if not name.startswith("."))
            for name in sorted(files):
                path = Path(root, name)
                if not name.startswith(".") and path.is_file():
                    archive.write(path, path.relative_to(folder).as_posix())
                    count += 1
    return count


class MultipartFile:
    """A ``multipart/form-data`` body of one file part, read from ``file`` as it is sent.

    It has a length (requests sends a Content-Length, not chunks) and can seek, so urllib3 rewinds it
    when it sends the request again after a 429 or 503.
    """

    def __init__(self, field: str, filename: str, file: IO[bytes]) -> None:
        boundary = uuid.uuid4().hex
        kind = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        # As browsers do: the quote and line breaks in a file name are percent-encoded.
        quoted = filename.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")
        head = (
            f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="{field}"; filename="{quoted}"\r\n'
            f"Content-Type: {kind}\r\n\r\n"
        )
        self.content_type = f"multipart/form-data; boundary={boundary}"
        self._parts: list[IO[bytes]] = [
            io.BytesIO(head.encode()),
            file,
            io.BytesIO(f"\r\n--{boundary}--\r\n".encode()),
        ]
        self._sizes = [part.seek(0, io.SEEK_END) for part in self._parts]
        self._position = 0
        self.seek(0)

    def __len__(self) -> int:
        return sum(self._sizes)

    def __iter__(self) -> MultipartFile:  # requests sends a body as a stream when it is iterable
        return self

    def __next__(self) -> bytes:
        chunk = self.read(1 << 16)
        if not chunk:
            raise StopIteration
        return chunk

    def tell(self) -> int:
        return self._position

    def seek(self, position: int, whence: int = io.SEEK_SET) -> int:
        if whence != io.SEEK_SET:
            position += self._position if whence == io.SEEK_CUR else len(self)
        self._position = max(0, min(position, len(self)))
        start = 0
        for part, size in zip(self._parts, self._sizes, strict=True):
            part.seek(min(max(self._position - start, 0), size))
            start += size
        return self._position

    def read(self, size: int = -1) -> bytes:
        wanted = len(self) - self._position if size < 0 else min(size, len(self) - self._position)
        chunks: list[bytes] = []
        while wanted > 0:
            part, left = self._current()
            chunk = part.read(min(wanted, left))
            if not chunk:
                raise OSError("the file being sent shrank while it was sent")
            chunks.append(chunk)
            wanted -= len(chunk)
            self._position += len(chunk)
        return b"".join(chunks)

    def _current(self) -> tuple[IO[bytes], int]:
        """The part the position is in, and how many of its bytes are left."""
        end = 0
        for part, size in zip(self._parts, self._sizes, strict=True):
            end += size
            if self._position < end:
                return part, end - self._position
        raise EOFError  # read() never asks past the end
