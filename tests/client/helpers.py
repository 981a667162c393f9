"""Reading back what the Python client sent."""

from __future__ import annotations

import io

from werkzeug.wrappers import Request


def multipart_files(body: bytes) -> dict[str, tuple[str, bytes]]:
    """The file parts of a multipart body sent by the client: field -> (filename, bytes)."""
    boundary = body.split(b"\r\n", 1)[0][2:].decode()
    request = Request.from_values(
        input_stream=io.BytesIO(body),
        content_length=len(body),
        content_type=f"multipart/form-data; boundary={boundary}",
        method="POST",
    )
    with request:  # closes the spooled files werkzeug parsed the parts into
        return {name: (part.filename or "", part.read()) for name, part in request.files.items()}
