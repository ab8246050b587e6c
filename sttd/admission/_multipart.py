"""Read one file out of a streamed multipart/form-data body, within a byte limit.

The body is consumed chunk by chunk through python-multipart's `MultipartParser`, so an oversized
body is refused as soon as it passes the limit, whether or not it declared a Content-Length, and
only the wanted file's bytes are kept: in memory while they are small, then in a temporary file
on disk, so that a long recording costs disk space rather than memory.

That is python-multipart's lowest-level parser, chosen because it streams and holds nothing
itself: it hands each piece of a part's header names, header values and data to a callback as it
finds it, so what is held is what the callbacks here keep, and each of those is bounded (a
part's headers, a text field, the number of parts). Its `FormParser` would write every file part
to a file of its own, and bounds neither the number of parts nor a part's headers as a whole.

Around it, as werkzeug's decoder did before: the preamble before the first boundary (which the
parser refuses) is skipped, a boundary over its 256 bytes is taken, the epilogue after the
closing boundary is discarded, and a part's Content-Disposition is read by werkzeug's
`parse_options_header`, as the request's Content-Type is, so that ``filename*=UTF-8''...``
(RFC 2231, which python-multipart ignores) still makes a file part. Line breaks must be CRLF, as
RFC 7578 says; werkzeug took a bare CR or LF too.
"""

from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import AsyncIterable, Mapping
from typing import IO, Final

import attrs
import trio
from python_multipart import MultipartParser
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MAX_BOUNDARY_LENGTH
from werkzeug.http import parse_options_header

from sttd.errors import InvalidParam, PayloadTooLarge, UnsupportedMedia

__all__ = ["read_multipart_file"]

_MAX_PARTS: Final = 16
_MAX_FIELD_BYTES: Final = 4096
# What may come before a boundary, or before the end of a part's headers: a preamble, one part's
# headers (their names and values), an epilogue. File data passes through; without this, a body
# with no boundary in it would be read, or its headers held, up to the upload limit.
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
_PADDING: Final = re.compile(rb"[ \t]*")  # after a boundary, before its line's CRLF (RFC 2046)
_PARSER_OFFSET: Final = re.compile(r" at \d+$")  # how the parser ends a message with an offset
# python-multipart logs a warning for each malformed body before raising; the client gets the
# error and sttd_errors_total counts it, so the warning would only let any client fill the log.
# A logger of our own, outside logging's tree, that drops everything: nothing global changes.
_parser_log: Final = logging.Logger(f"{__name__}.parser", level=logging.CRITICAL + 1)


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
    form = _Form(field, boundary)
    received = 0
    written = 0
    async for chunk in body:
        received += len(chunk)
        if received > max_bytes:
            raise PayloadTooLarge(
                f"request body must be at most {max_bytes} bytes (STT_MAX_UPLOAD_BYTES)")
        form.feed(chunk)
        for data in form.file_data:
            await _write(upload, data, written=written)
            written += len(data)
        form.file_data.clear()
    form.finish()
    if not form.found:
        raise InvalidParam(field, f"multipart body must have a '{field}' file field, got "
                                  f"{_describe(form.fields, form.files)}")
    return form.fields


@attrs.define
class _Form:
    """A multipart body fed chunk by chunk: the parser, and what its callbacks keep.

    The preamble and the epilogue are read here; the parser sees the body from the first
    boundary line to the end of the closing one, and nothing after it.
    """

    field: str
    boundary: bytes
    # What the body holds, so far.
    fields: dict[str, str] = attrs.Factory(dict)
    files: list[str] = attrs.Factory(list)  # names of the file parts, for the missing-field error
    found: bool = False  # a file part named `field` began
    file_data: list[bytes] = attrs.Factory(list)  # its data from the latest chunk, to be written
    # Where the body is.
    received: int = 0
    preamble: bytearray | None = attrs.Factory(bytearray)  # None from the first boundary line on
    search_from: int = 0  # in `preamble`, where the first boundary line may still start
    padding_from: int = 0  # in `preamble`, where its padding is still to be checked
    tail: bytes = b""  # the last bytes given to the parser, for a closing boundary across chunks
    ended: bool = False  # the closing boundary came
    epilogue: int = 0  # bytes after it
    # The part being read.
    parts: int = 0
    headers: list[tuple[bytes, bytes]] = attrs.Factory(list)
    header_name: bytearray = attrs.Factory(bytearray)
    header_value: bytearray = attrs.Factory(bytearray)
    header_bytes: int = 0
    in_file: bool = False  # the part is the file
    text_name: str | None = None  # the part is this text field
    text: bytearray = attrs.Factory(bytearray)
    parser: MultipartParser = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.parser = MultipartParser(
            self.boundary[:MAX_BOUNDARY_LENGTH],
            callbacks={
                "on_part_begin": self._on_part_begin,
                "on_header_field": self._on_header_field,
                "on_header_value": self._on_header_value,
                "on_header_end": self._on_header_end,
                "on_headers_finished": self._on_headers_finished,
                "on_part_data": self._on_part_data,
                "on_part_end": self._on_part_end,
                "on_end": self._on_end,
            },
            # Its limits on a part's headers (8 headers, 4 KiB a line) raised to ours: it counts
            # the bytes of a line, spaces included, and we count all the names and values.
            max_header_count=_MAX_BUFFERED_BYTES,
            max_header_size=_MAX_BUFFERED_BYTES,
        )
        # It refuses a boundary over 256 bytes (RFC 2046 says 70) when it is made, and reads it
        # from here; werkzeug took any, and so do we.
        self.parser.boundary = b"\r\n--" + self.boundary
        self.parser.logger = _parser_log

    def feed(self, chunk: bytes) -> None:
        """Decode the next chunk of the body."""
        self.received += len(chunk)
        if self.preamble is not None:
            self.preamble += chunk
            rest = self._after_preamble()
            if rest is None:
                return
            chunk = rest
        if self.ended:
            self._after_end(len(chunk))
        else:
            self._parse(chunk, at=self.received - len(chunk))

    def finish(self) -> None:
        """Check that the body, now over, was whole."""
        if self.preamble is not None:
            raise InvalidParam(self.field, "malformed multipart body: it ends before its first "
                                           "boundary")
        if not self.ended:
            raise InvalidParam(self.field, "malformed multipart body: it ends before its closing "
                                           "boundary")

    def _after_preamble(self) -> bytes | None:
        """The body after its first boundary line, once that came; None until then.

        As in werkzeug, that line is the first ``--boundary`` followed by ``--`` (the closing
        boundary: no parts) or by padding and CRLF, wherever it is. It must end within
        `_MAX_BUFFERED_BYTES` of the start of the body.
        """
        buffer = self.preamble
        assert buffer is not None
        dash_boundary = b"--" + self.boundary
        end = min(len(buffer), _MAX_BUFFERED_BYTES)  # what comes after cannot make the line
        while (start := buffer.find(dash_boundary, self.search_from, end)) != -1:
            after = start + len(dash_boundary)
            if buffer.startswith(b"--", after, end):
                self.preamble, self.ended = None, True
                return bytes(buffer[after + 2 :])
            padding = _PADDING.match(buffer, max(after, self.padding_from), end)
            assert padding is not None  # it matches the empty string
            if buffer.startswith(b"\r\n", padding.end(), end):
                self.preamble = None
                self._write(dash_boundary + b"\r\n", at=start)  # the line without its padding
                return bytes(buffer[padding.end() + 2 :])
            line_end = bytes(buffer[padding.end() : min(padding.end() + 2, end)])  # not CRLF
            if line_end.startswith(b"\n") or len(line_end) == 2 and line_end.startswith(b"\r"):
                # werkzeug took a bare LF or CR for a line break; say why the body is refused.
                raise InvalidParam(self.field, "malformed multipart body: line breaks must be "
                                               "CRLF, got a bare CR or LF after its first boundary")
            unfinished = line_end in (b"", b"\r") or end == after + 1 and buffer[after] == ord("-")
            if unfinished and end < _MAX_BUFFERED_BYTES:  # the next chunk may finish the line
                self.search_from, self.padding_from = start, padding.end()
                return None
            self.search_from, self.padding_from = start + 1, 0
        if end == _MAX_BUFFERED_BYTES:
            raise self._unbounded()
        self.search_from = max(self.search_from, end - len(dash_boundary) + 1)
        return None

    def _parse(self, data: bytes, *, at: int) -> None:
        """Give `data`, from byte `at` of the body on, to the parser, up to the closing boundary.

        The parser ends the body at the end of a ``CRLF--boundary--`` and discards what follows;
        `data` is given up to the end of each of those, so that what follows is known and
        counted as the epilogue.
        """
        closing = self.parser.boundary + b"--"
        window = self.tail + data
        start = 0
        candidate = window.find(closing)
        while candidate != -1 and not self.ended:
            stop = candidate + len(closing) - len(self.tail)
            self._write(data[start:stop], at=at + start)
            start = stop
            candidate = window.find(closing, candidate + 1)
        if self.ended:
            self._after_end(len(data) - start)
        else:
            self._write(data[start:], at=at + start)
        self.tail = window[-(len(closing) - 1) :]

    def _write(self, data: bytes, *, at: int) -> None:
        try:
            self.parser.write(data)
        except MultipartParseError as exc:
            if str(exc).startswith("Maximum header"):  # its limits above
                raise self._unbounded() from None
            # Its offset is into `data`: say where in the body instead.
            reason = _PARSER_OFFSET.sub("", str(exc))
            where = f" at byte {at + exc.offset}" if exc.offset >= 0 else ""
            raise InvalidParam(self.field, f"malformed multipart body: {reason}{where}") from None

    def _after_end(self, size: int) -> None:
        self.epilogue += size
        if self.epilogue > _MAX_BUFFERED_BYTES:
            raise InvalidParam(self.field, "malformed multipart body: it does not end within "
                                           f"{_MAX_BUFFERED_BYTES} bytes of its closing boundary")

    def _unbounded(self) -> InvalidParam:
        return InvalidParam(self.field, "malformed multipart body: no boundary or end of part "
                                        f"headers within {_MAX_BUFFERED_BYTES} bytes")

    def _count_header_bytes(self, size: int) -> None:
        self.header_bytes += size
        if self.header_bytes > _MAX_BUFFERED_BYTES:
            raise self._unbounded()

    # The parser's callbacks: `data[start:end]` is the piece found.

    def _on_part_begin(self) -> None:
        self.headers.clear()
        self.header_bytes = 0
        self.in_file, self.text_name = False, None
        self.text.clear()

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._count_header_bytes(end - start)
        self.header_name += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._count_header_bytes(end - start)
        self.header_value += data[start:end]

    def _on_header_end(self) -> None:
        self._count_header_bytes(len(b":\r\n"))
        self.headers.append((bytes(self.header_name), bytes(self.header_value)))
        self.header_name.clear()
        self.header_value.clear()

    def _on_headers_finished(self) -> None:
        if any(b"\n" in value for _, value in self.headers):  # a CR in one ends it
            raise InvalidParam(self.field, "malformed multipart body: line breaks must be CRLF, "
                                           "got a bare LF in a part's headers")
        # The parser takes only token characters (ASCII) in a header's name. A value is UTF-8
        # (what browsers send), else Latin-1, which any bytes are: RFC 7578 leaves a filename's
        # charset open, clients such as curl send it as the file system spells it, and a
        # file's name is never used here.
        headers = [(name.decode("latin-1").lower(), _header_text(value).strip(" \t"))
                   for name, value in self.headers]
        disposition = next((value for name, value in headers if name == "content-disposition"),
                           None)
        if disposition is None:
            raise InvalidParam(self.field, "malformed multipart body: a part has no "
                                           "Content-Disposition header")
        self.parts += 1
        if self.parts > _MAX_PARTS:
            raise InvalidParam(self.field, f"multipart body must have at most {_MAX_PARTS} "
                                           "parts, got more")
        _, params = parse_options_header(disposition)
        name = params.get("name")
        # The field's part is the file with or without a filename (``curl -F "file=<a.wav"``
        # and aiohttp's add_field send none); any other part with one is another file.
        if "filename" in params or name == self.field:
            self.files.append(str(name)[:_MAX_QUOTED_CHARS])
            if name == self.field:
                if self.found:
                    # Taking one of several would transcribe a file the client may not expect.
                    raise InvalidParam(self.field, f"multipart body must have one '{self.field}' "
                                                   "file field, got more")
                self.found = self.in_file = True
        elif name is not None:
            self.text_name = name

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.in_file:
            self.file_data.append(data[start:end])
        elif self.text_name is not None:
            if len(self.text) + end - start > _MAX_FIELD_BYTES:
                raise InvalidParam(self.text_name, f"form field {self.text_name!r} must be at "
                                                   f"most {_MAX_FIELD_BYTES} bytes")
            self.text += data[start:end]

    def _on_part_end(self) -> None:
        if self.text_name is not None:
            value = self.text.decode("utf-8", "replace")
            if self.text_name.endswith("[]") and self.text_name in self.fields:
                value = f"{self.fields[self.text_name]},{value}"  # a repeated list field
            self.fields[self.text_name] = value

    def _on_end(self) -> None:
        self.ended = True


def _header_text(value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")


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
