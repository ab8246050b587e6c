"""Files over HTTP: `transcribe_file` uploads one to the OpenAI-compatible route, streamed."""

from __future__ import annotations

import contextlib
import os
import secrets
import typing
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path
from typing import TypeAlias

import httpx
import trio

from sttd.api import RESPONSE_FORMATS
from sttd.client._errors import ConnectFailed, TranscriptionFailed
from sttd.client._session import http_base_url

__all__ = ["TRANSCRIPTIONS_PATH", "Progress", "transcribe_file"]

TRANSCRIPTIONS_PATH: typing.Final = "/v1/audio/transcriptions"
# The model name sent to the OpenAI-compatible route: the server has one engine, any name does.
MODEL_NAME: typing.Final = "sttd"
_CONNECT_TIMEOUT_S: typing.Final = 10.0
_UPLOAD_CHUNK_BYTES: typing.Final = 256 * 1024
_MAX_QUOTED_CHARS: typing.Final = 200  # of an error body that is not the server's JSON

# Called as an upload goes: (bytes sent, bytes in all).
Progress: TypeAlias = Callable[[int, int], None]


async def transcribe_file(
    base_url: str,
    path: str | os.PathLike[str],
    *,
    response_format: str = "json",
    language: str | None = None,
    hotwords: Iterable[str] = (),
    api_key: str | None = None,
    progress: Progress | None = None,
    timeout_s: float = 600.0,
    client: httpx.AsyncClient | None = None,
) -> str:
    """Transcribe a file with the server's ``/v1/audio/transcriptions``; returns the body.

    `response_format` is OpenAI's: ``json``, ``text``, ``verbose_json``, ``srt`` or ``vtt``,
    rendered by the server. The file is uploaded as it is read from disk, and `progress` is
    called with (bytes sent, bytes in all) as it goes. `timeout_s` bounds each network wait
    (the server answers once the whole file is transcribed). Pass `client` to reuse its
    connections. Raises `TranscriptionFailed` with the server's error, `ConnectFailed` if the
    server cannot be reached, and `OSError` if the file cannot be read.
    """
    if response_format not in RESPONSE_FORMATS:
        raise ValueError(f"response_format must be one of {', '.join(RESPONSE_FORMATS)}, "
                         f"got {response_format!r}")
    path = Path(path)
    fields = {"model": MODEL_NAME, "response_format": response_format}
    if language is not None:
        fields["language"] = language
    words = [word.strip() for word in hotwords if word.strip()]
    if words:
        fields["prompt"] = ", ".join(words)
    size = path.stat().st_size
    boundary = secrets.token_hex(16)
    head, tail = _multipart_frame(boundary, fields, path.name)
    total = len(head) + size + len(tail)

    async def body() -> AsyncIterator[bytes]:
        sent = 0
        yield head
        async with await trio.open_file(path, "rb") as file:
            while chunk := await file.read(_UPLOAD_CHUNK_BYTES):
                yield chunk
                sent += len(chunk)
                if progress is not None:
                    progress(sent, size)
        yield tail

    url = http_base_url(base_url) + TRANSCRIPTIONS_PATH
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}",
               "Content-Length": str(total)}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    async with contextlib.AsyncExitStack() as stack:
        if client is None:
            client = await stack.enter_async_context(httpx.AsyncClient())
        try:
            response = await client.post(
                url, content=body(), headers=headers,
                timeout=httpx.Timeout(timeout_s, connect=_CONNECT_TIMEOUT_S))
        except httpx.TimeoutException as exc:
            raise ConnectFailed("timeout", f"{url}: no answer within {timeout_s:g} s "
                                           f"({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            raise ConnectFailed("unreachable", f"{url}: {exc or type(exc).__name__}") from None
    if response.status_code >= 400:
        raise _http_error(response)
    return response.text


def _multipart_frame(boundary: str, fields: Mapping[str, str], filename: str
                     ) -> tuple[bytes, bytes]:
    """A multipart/form-data body's bytes before and after the file's contents."""
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
             for name, value in fields.items()]
    # HTML's escaping of a file name in a Content-Disposition header.
    quoted = filename.replace("\r", "%0D").replace("\n", "%0A").replace('"', "%22")
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
                 f'filename="{quoted}"\r\nContent-Type: application/octet-stream\r\n\r\n')
    return "".join(parts).encode(), f"\r\n--{boundary}--\r\n".encode()


def _http_error(response: httpx.Response) -> TranscriptionFailed:
    """The server's ``{"error": {"code", "message"}}``, or what the body says otherwise."""
    try:
        error = response.json()["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        code = f"http_{response.status_code}"
        message = (response.text.strip()[:_MAX_QUOTED_CHARS]
                   or f"HTTP {response.status_code} {response.reason_phrase}")
    return TranscriptionFailed(response.status_code, code, message)
