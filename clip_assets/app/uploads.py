"""Uploads read with their size limit enforced before the body is: a request that declares too much,
declares nothing (chunked) or sends more than it declared is refused without being read whole."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException
from starlette.requests import ClientDisconnect, Request

MAX_UPLOAD_BYTES = 32 * 1024 * 1024
MAX_FIELD_BYTES = 64 * 1024  # a text field of the form (the query, k, batch, category)


class UploadRefused(Exception):
    """An upload the app will not read, with the HTTP status and the reason to show."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Upload:
    """A multipart form: its text fields, and the file of the field `file_field` (if one was chosen)."""

    fields: dict[str, str]
    data: bytes | None
    name: str | None


def declared_length(request: Request, limit: int) -> int:
    """The body's Content-Length, refused (before a byte of the body is read) when over `limit` or absent."""
    if "transfer-encoding" in request.headers or "content-length" not in request.headers:
        raise UploadRefused(411, "An upload needs a Content-Length header (chunked bodies are not accepted).")
    try:
        length = int(request.headers["content-length"])
        if length < 0:
            raise ValueError
    except ValueError:
        raise UploadRefused(400, f"Content-Length {request.headers['content-length']!r} is not a size.") from None
    if length > limit:
        raise UploadRefused(413, f"Uploads are limited to {limit // 2**20} MiB; this one is {length / 2**20:.1f} MiB.")
    return length


async def read_upload(request: Request, file_field: str = "image", limit: int = MAX_UPLOAD_BYTES) -> Upload:
    """The multipart form of `request`, streamed through Starlette's parser (the file spools to a
    temporary file past 1 MiB), never reading more than the declared length, itself at most `limit`."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise UploadRefused(400, "Expected a multipart/form-data upload.")
    length = declared_length(request, limit)
    received = 0

    async def receive():
        nonlocal received
        message = await request.receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > length:  # the server normally stops at Content-Length: this holds on any server
                raise UploadRefused(400, "The upload is longer than its Content-Length says.")
        return message

    try:
        form: FormData = await Request(request.scope, receive).form(
            max_files=1, max_fields=16, max_part_size=MAX_FIELD_BYTES
        )
    except MultiPartException as exc:
        raise UploadRefused(400, f"The upload could not be read: {exc}") from None
    except ClientDisconnect:
        raise UploadRefused(400, "The upload was cut short.") from None
    try:
        fields = {name: value for name, value in form.multi_items() if isinstance(value, str)}
        file = form.get(file_field)
        if isinstance(file, UploadFile) and file.filename:
            return Upload(fields, await file.read(), file.filename)
        return Upload(fields, None, None)
    finally:
        await form.close()
