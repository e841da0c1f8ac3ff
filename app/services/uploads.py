"""Streams an upload body (multipart form or raw JSONL) into the blob store, never into memory.

Disk writes run in the thread pool chunk by chunk so the event loop stays free; the blob is
written under a temporary name and only published when the whole body has arrived.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header
from starlette.concurrency import run_in_threadpool

from app.errors import ApiError, PayloadTooLarge, UnsupportedMediaType
from app.storage import BlobStore, BlobTooLarge, BlobWriter

RAW_TYPES = {
    "application/jsonl", "application/x-ndjson", "application/x-jsonlines", "application/jsonlines",
    "application/json-lines", "application/octet-stream",
}
FILE_FIELD = "file"
MAX_FIELD_BYTES = 4096


@dataclass
class StoredUpload:
    size: int
    sha256: str
    filename: str | None = None
    fields: dict[str, str] = field(default_factory=dict)


class _MultipartSink:
    """python-multipart callbacks: the `file` part goes to the blob writer, small fields to a dict."""

    def __init__(self, writer: BlobWriter) -> None:
        self.writer = writer
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.file_parts = 0
        self._header_field = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._name: str | None = None
        self._value = bytearray()

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: self._add("_header_field", d[s:e]),
            "on_header_value": lambda d, s, e: self._add("_header_value", d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _add(self, attr: str, data: bytes) -> None:
        setattr(self, attr, getattr(self, attr) + data)

    def _part_begin(self) -> None:
        self._headers, self._name, self._value = {}, None, bytearray()

    def _header_end(self) -> None:
        self._headers[self._header_field.lower()] = self._header_value
        self._header_field, self._header_value = b"", b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = options.get(b"name", b"").decode("utf-8", "replace")
        if self._name == FILE_FIELD:
            self.file_parts += 1
            if self.file_parts > 1:
                raise ApiError("send exactly one `file` part", code="multiple_files", param=FILE_FIELD)
            filename = options.get(b"filename")
            self.filename = filename.decode("utf-8", "replace") if filename else None

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._name == FILE_FIELD:
            self.writer.write(data[start:end])
            return
        self._value += data[start:end]
        if len(self._value) > MAX_FIELD_BYTES:
            raise ApiError(f"form field {self._name!r} is longer than {MAX_FIELD_BYTES} bytes",
                           code="field_too_long", param=self._name)

    def _part_end(self) -> None:
        if self._name and self._name != FILE_FIELD:
            self.fields[self._name] = self._value.decode("utf-8", "replace")


def _media_type(content_type: str) -> tuple[str, dict[bytes, bytes]]:
    media, options = parse_options_header(content_type)
    return media.decode("latin-1").lower(), options


async def store_upload(chunks: AsyncIterator[bytes], content_type: str, store: BlobStore, key: str,
                       max_bytes: int) -> StoredUpload:
    """Returns the stored upload (size, sha256, multipart fields) once the body is complete.

    Raises PayloadTooLarge past `max_bytes` of file data, StorageFull when the disk fills,
    UnsupportedMediaType for other content types, ApiError for a malformed or truncated form;
    in every case nothing is left in the store.
    """
    media, options = _media_type(content_type or "")
    if media != "multipart/form-data" and media not in RAW_TYPES:
        raise UnsupportedMediaType(
            f"unsupported Content-Type {media or '(none)'!r}: send multipart/form-data with a `file` "
            "part, or a raw body as application/jsonl", param="Content-Type")
    writer = store.writer(key, max_bytes)
    try:
        with writer:
            if media == "multipart/form-data":
                upload = await _stream_multipart(chunks, options, writer)
            else:
                async for chunk in chunks:
                    await run_in_threadpool(writer.write, chunk)
                upload = StoredUpload(0, "")
            upload.size, upload.sha256 = await run_in_threadpool(writer.commit)
            return upload
    except BlobTooLarge as exc:
        raise PayloadTooLarge(f"dataset file is larger than the limit of {max_bytes} bytes "
                              "(TUNEYARD_MAX_UPLOAD_BYTES)", param=FILE_FIELD) from exc


async def _stream_multipart(chunks: AsyncIterator[bytes], options: dict[bytes, bytes],
                            writer: BlobWriter) -> StoredUpload:
    boundary = options.get(b"boundary")
    if not boundary:
        raise ApiError("multipart body without a boundary", code="malformed_multipart", param="Content-Type")
    sink = _MultipartSink(writer)
    parser = MultipartParser(boundary, sink.callbacks())
    try:
        async for chunk in chunks:
            await run_in_threadpool(parser.write, chunk)
        parser.finalize()
    except FormParserError as exc:
        raise ApiError(f"malformed multipart body: {exc}", code="malformed_multipart") from exc
    if parser.state != MultipartState.END:
        # The client stopped before the closing boundary: the last part (and record) may be cut off.
        raise ApiError("the multipart body ends before its closing boundary (--BOUNDARY--); the upload "
                       "is incomplete, send it again", code="truncated_multipart")
    if sink.file_parts == 0:
        raise ApiError("multipart upload needs a `file` part", code="missing_file", param=FILE_FIELD)
    return StoredUpload(0, "", sink.filename, sink.fields)
