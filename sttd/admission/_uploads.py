"""Who may upload a file, and reading the upload within its limits.

`admit_upload` refuses an upload while the server drains, while STT_MAX_UPLOADS are in flight
(each may spool up to STT_MAX_UPLOAD_BYTES to disk and keeps the engine busy), when its declared
length is over STT_MAX_UPLOAD_BYTES, or while the engine is still loading; an admitted upload
counts as in flight, for the drain, until its block ends. `continue_upload` counts an admitted
upload once more, for work that goes on after its handler returns (a streamed answer): taken
inside `admit_upload`'s block, so the count never drops between the two, it is not refused for
the limit or a drain that the upload was admitted before. `read_upload` reads the body's file
field as it streams in, paced: a body that stalls for STT_HTTP_READ_TIMEOUT_S is refused.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Iterator, Mapping
from typing import IO

import trio

from sttd.admission._sessions import ready_engine
from sttd.admission._state import AppState
from sttd.engine import Engine
from sttd.errors import Overloaded, PayloadTooLarge, RequestTimeout, ShuttingDown
from sttd.settings import Settings
from sttd.admission._multipart import read_multipart_file

__all__ = ["admit_upload", "continue_upload", "read_upload"]


@contextlib.contextmanager
def admit_upload(state: AppState, content_length: int | None) -> Iterator[Engine]:
    """Admit an upload (raises the `ClientError` that refuses it) and count it while the block
    runs; gives the engine to transcribe it with."""
    settings = state.settings
    if state.draining:
        raise ShuttingDown("the server is shutting down; send the file to another instance")
    if state.uploads >= settings.max_uploads:
        raise Overloaded(f"the server is taking STT_MAX_UPLOADS={settings.max_uploads} files "
                         "already; retry later")
    with state.upload_in_flight():
        if content_length is not None and content_length > settings.max_upload_bytes:
            raise PayloadTooLarge(
                f"request body must be at most {settings.max_upload_bytes} bytes "
                f"(STT_MAX_UPLOAD_BYTES), got {content_length}")
        yield ready_engine(state)


@contextlib.contextmanager
def continue_upload(state: AppState) -> Iterator[Engine]:
    """Count an upload `admit_upload` admitted once more while the block runs (taken inside
    that admission's block, and left after it); gives the engine. Raises only if the engine is
    gone."""
    with state.upload_in_flight():
        yield ready_engine(state)


async def read_upload(body: AsyncIterable[bytes], content_type: str,
                      content_params: Mapping[str, str], *, settings: Settings
                      ) -> tuple[IO[bytes], dict[str, str]]:
    """The multipart body's ``file`` field (a temporary file the caller closes) and its text
    fields; raises as `read_multipart_file` does, and `RequestTimeout` for a stalled body."""
    return await read_multipart_file(
        _PacedBody(body, timeout_s=settings.http_read_timeout_s), content_type, content_params,
        field="file", max_bytes=settings.max_upload_bytes)


class _PacedBody:
    """A request body that must keep coming: a gap over `timeout_s` raises `RequestTimeout`.

    A class, not an async generator: the reader may stop at the body's epilogue, and an
    abandoned async generator would be finalized later, outside this request.
    """

    def __init__(self, body: AsyncIterable[bytes], *, timeout_s: float) -> None:
        self._chunks = aiter(body)
        self._timeout_s = timeout_s

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        with trio.move_on_after(self._timeout_s):
            return await anext(self._chunks)
        raise RequestTimeout(
            f"the request body stalled: nothing arrived for STT_HTTP_READ_TIMEOUT_S="
            f"{self._timeout_s:g} s")
