"""Read one file out of a streamed multipart/form-data body, within a byte limit.

The body is consumed chunk by chunk through werkzeug's sans-I/O multipart decoder, so an
oversized body is refused as soon as it passes the limit, whether or not it declared a
Content-Length, and only the wanted file's bytes are kept: in memory while they are small, then
in a temporary file on disk, so that a long recording costs disk space rather than memory.
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterable, Mapping
from typing import IO, Final

import trio
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.sansio.multipart import Data, Epilogue, Field, File, MultipartDecoder, NeedData

from sttd.errors import InvalidParam, PayloadTooLarge, UnsupportedMedia

__all__ = ["read_multipart_file"]

_MAX_PARTS: Final = 16
_MAX_FIELD_BYTES: Final = 4096
# What the decoder may hold unparsed: a preamble, one part's headers, an epilogue. File data
# passes through; without this, a body with no boundary in it is held whole in memory.
_MAX_BUFFERED_BYTES: Final = 64 * 1024
_MAX_QUOTED_CHARS: Final = 40  # of a part's name, in an error message
# The upload stays in memory up to this size, then moves to a temporary file.
_SPOOL_MAX_BYTES: Final = 8 * 1024 * 1024
# Chunks are written inline: a chunk is what the web framework buffered since the last one
# (64 KiB or so) and takes tens of microseconds into the page cache. The framework reads the
# body without backpressure, so writing chunks in a worker thread lets it buffer more while the
# thread runs, and the next chunk and its write grow: in benchmarks/file_memory.py under CPU
# contention that held over 200 MiB of a 220 MiB upload. Only the write that moves the upload
# from memory to disk (a copy of _SPOOL_MAX_BYTES, some milliseconds) goes to a thread.


async def read_multipart_file(
    body: AsyncIterable[bytes],
    content_type: str,
    content_params: Mapping[str, str],
    *,
    field: str,
    max_bytes: int,
) -> tuple[IO[bytes], dict[str, str]]:
    """The contents of file field `field`, and the small text fields beside it.

    A field named ``name[]`` may repeat: its values come joined by commas.

    The contents come as a temporary file positioned at its start, in memory up to 8 MiB and
    on disk beyond. The caller owns it and must close it, which also deletes it; if this
    function raises, it has closed the file itself.

    Raises `UnsupportedMedia` for a body that is not multipart/form-data, `PayloadTooLarge` once
    more than `max_bytes` arrived, and `InvalidParam` for a malformed body or a missing field.
    """
    if content_type != "multipart/form-data":
        raise UnsupportedMedia(f"send the audio as multipart/form-data with a '{field}' field, "
                               f"got content type {content_type or 'none'!r}")
    boundary = content_params.get("boundary", "")
    if not boundary:
        raise InvalidParam(field, "multipart/form-data needs a boundary parameter, got none")
    try:
        # An RFC 2231 parameter (boundary*=UTF-8''...) can decode to any character.
        boundary_bytes = boundary.encode("latin-1")
    except UnicodeEncodeError:
        raise InvalidParam(field, f"the multipart boundary must be Latin-1 text, got "
                                  f"{boundary[:_MAX_QUOTED_CHARS]!r}") from None
    upload = tempfile.SpooledTemporaryFile(max_size=_SPOOL_MAX_BYTES, mode="w+b",
                                           prefix="sttd-upload-")
    try:
        fields = await _receive(body, upload, field=field, boundary=boundary_bytes,
                                max_bytes=max_bytes)
        upload.seek(0)
    except BaseException:
        upload.close()
        raise
    return upload, fields


async def _receive(
    body: AsyncIterable[bytes],
    upload: IO[bytes],
    *,
    field: str,
    boundary: bytes,
    max_bytes: int,
) -> dict[str, str]:
    """Decode `body`, write file field `field` to `upload`, and return the text fields."""
    decoder = MultipartDecoder(boundary, max_parts=_MAX_PARTS)
    received = 0
    written = 0
    current: str | None = None
    is_file = False
    found = False
    # File data decoded from the latest chunk, written before the next chunk is decoded.
    pending: list[bytes] = []
    fields: dict[str, str] = {}
    files: list[str] = []  # names of the file parts, for the error when `field` is missing
    field_bytes = bytearray()
    done = False

    def drain() -> bool:
        nonlocal current, is_file, found
        while True:
            event = decoder.next_event()
            if isinstance(event, NeedData):
                return False
            if isinstance(event, Epilogue):
                return True
            if isinstance(event, File):
                current, is_file = event.name, True
                files.append(str(event.name)[:_MAX_QUOTED_CHARS])
                if event.name == field and found:
                    # Taking one of several would transcribe a file the client may not expect.
                    raise InvalidParam(field, f"multipart body must have one '{field}' file "
                                              "field, got more")
                found = found or event.name == field
            elif isinstance(event, Field):
                current, is_file = event.name, False
                field_bytes.clear()
            elif isinstance(event, Data):
                if is_file and current == field:
                    pending.append(event.data)
                elif not is_file and current is not None:
                    field_bytes.extend(event.data)
                    if len(field_bytes) > _MAX_FIELD_BYTES:
                        raise InvalidParam(current, f"form field {current!r} must be at most "
                                                    f"{_MAX_FIELD_BYTES} bytes")
                    if not event.more_data:
                        value = field_bytes.decode("utf-8", "replace")
                        if current.endswith("[]") and current in fields:
                            value = f"{fields[current]},{value}"  # a repeated list field
                        fields[current] = value

    def feed(chunk: bytes | None) -> bool:
        """Decode `chunk` (None: the end of the body); True once the body's epilogue arrived."""
        try:
            decoder.receive_data(chunk)
            done = drain()
        except RequestEntityTooLarge:
            # The decoder's way of saying that max_parts was passed, whatever the body's size.
            raise InvalidParam(field, f"multipart body must have at most {_MAX_PARTS} parts, "
                                      "got more") from None
        except ValueError as exc:
            raise InvalidParam(field, f"malformed multipart body: {exc}") from None
        if len(decoder.buffer) > _MAX_BUFFERED_BYTES:
            raise InvalidParam(field, "malformed multipart body: no boundary or end of part "
                                      f"headers within {_MAX_BUFFERED_BYTES} bytes")
        return done

    async def write_pending() -> None:
        nonlocal written
        for data in pending:
            await _write(upload, data, written=written)
            written += len(data)
        pending.clear()

    async for chunk in body:
        received += len(chunk)
        if received > max_bytes:
            raise PayloadTooLarge(
                f"request body must be at most {max_bytes} bytes (STT_MAX_UPLOAD_BYTES)")
        done = feed(chunk)
        await write_pending()
        if done:
            break
    if not done:
        feed(None)
        await write_pending()
    if not found:
        raise InvalidParam(field, f"multipart body must have a '{field}' file field, got "
                                  f"{_describe(fields, files)}")
    return fields


async def _write(upload: IO[bytes], data: bytes, *, written: int) -> None:
    """Append `data` to `upload`, which holds `written` bytes so far."""
    if written <= _SPOOL_MAX_BYTES < written + len(data):
        await trio.to_thread.run_sync(upload.write, data)
    else:
        upload.write(data)


def _describe(fields: dict[str, str], files: list[str]) -> str:
    """The parts a body had, for an error message."""
    names = [f"field {name[:_MAX_QUOTED_CHARS]!r}" for name in sorted(fields)]
    names += [f"file {name!r}" for name in files]
    return ", ".join(names) if names else "no fields"
