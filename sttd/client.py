"""A small trio client for sttd: live sessions over the WebSocket, files over the HTTP API.

Stream audio and read what comes back::

    import trio
    from sttd import client

    async def main() -> None:
        async with client.connect("http://127.0.0.1:8000", language="en") as session:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.stream_file, session, "speech.wav")  # paced, then end
                async for message in session:            # until the server closes
                    if isinstance(message, client.Final):
                        print(message.start_ms, message.text)
        print("closed with", session.close_code)          # 1000 after end

    trio.run(main)

Transcribe a file (the server's OpenAI-compatible API renders ``srt``, ``vtt``, ...)::

    srt = await client.transcribe_file("http://127.0.0.1:8000", "speech.wav",
                                       response_format="srt")

Everything here is trio; nothing starts a task that outlives the call or block that started it.
Errors the client raises on purpose derive from `RequestFailed` (itself an
`sttd.errors.SttdError`)::

    RequestFailed             `code` and `message`
    ├── ConnectFailed         the server could not be reached, or did not answer in time
    ├── SessionRefused        the session ended before ``ready`` (an error and its close code), or
    │                         the WebSocket handshake was refused (an HTTP status)
    ├── SessionClosed         audio or a message sent after the session was closed
    ├── TranscriptionFailed   the HTTP API answered with an error (status, code, message)
    └── ProtocolError         the server sent something this client cannot read

Reading audio files raises `sttd.errors.UnsupportedMedia` or `sttd.errors.BadAudio`, as the
server would for the same file.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import typing
import wave
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeAlias
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import attrs
import httpx
import numpy as np
import numpy.typing as npt
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    open_websocket_url,
)

from sttd.audio import SAMPLE_RATE_HZ, decode_wav, float32_to_pcm16
from sttd.errors import BadAudio, SttdError, UnsupportedMedia

if typing.TYPE_CHECKING:
    import av

__all__ = [
    "ConnectFailed",
    "Error",
    "Final",
    "Partial",
    "ProtocolError",
    "Ready",
    "RequestFailed",
    "ServerMessage",
    "SessionClosed",
    "SessionRefused",
    "StreamingSession",
    "TranscriptionFailed",
    "Unknown",
    "Warning",
    "Word",
    "connect",
    "http_base_url",
    "parse_message",
    "pcm_bytes",
    "read_audio",
    "stream_file",
    "stream_pcm",
    "transcribe_file",
    "websocket_url",
]

WS_PATH: typing.Final = "/v1/stt/ws"
TRANSCRIPTIONS_PATH: typing.Final = "/v1/audio/transcriptions"
# The model name sent to the OpenAI-compatible route: the server has one engine, any name does.
MODEL_NAME: typing.Final = "sttd"
RESPONSE_FORMATS: typing.Final = ("json", "text", "verbose_json", "srt", "vtt")
_CLOSE_TIMEOUT_S: typing.Final = 10.0
_UPLOAD_CHUNK_BYTES: typing.Final = 256 * 1024
_MAX_QUOTED_CHARS: typing.Final = 200  # of an unreadable server message or error body

Pcm: TypeAlias = "bytes | bytearray | memoryview | npt.NDArray[np.int16]"
# Called after each frame's send returns: (frame index, when it was due, when its send began),
# in `trio.current_time()` seconds.
OnSent: TypeAlias = Callable[[int, float, float], None]
# Called as an upload goes: (bytes sent, bytes in all).
Progress: TypeAlias = Callable[[int, int], None]


# Errors ------------------------------------------------------------------------------------


class RequestFailed(SttdError):
    """A request to the server failed; `code` is machine-readable, the message says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ConnectFailed(RequestFailed):
    """The server could not be reached (refused, DNS, TLS) or did not answer in time."""


class SessionRefused(RequestFailed):
    """The session ended before it was ready: the server's `error` and its `close_code`, or a
    refused handshake (`http_status`)."""

    def __init__(self, code: str, message: str, *, close_code: int | None = None,
                 http_status: int | None = None, error: Error | None = None) -> None:
        super().__init__(code, message)
        self.close_code = close_code
        self.http_status = http_status
        self.error = error


class SessionClosed(RequestFailed):
    """Audio or a message was sent after the session closed (`close_code`, `close_reason`)."""

    def __init__(self, close_code: int, close_reason: str | None) -> None:
        super().__init__("closed", f"the session is closed (code {close_code}"
                                   f"{', ' + close_reason if close_reason else ''})")
        self.close_code = close_code
        self.close_reason = close_reason


class TranscriptionFailed(RequestFailed):
    """The HTTP API answered with an error: `status`, and the body's `code` and message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(code, message)
        self.status = status


class ProtocolError(RequestFailed):
    """The server sent a message this client cannot read."""

    def __init__(self, message: str) -> None:
        super().__init__("protocol_error", message)


# Server messages ---------------------------------------------------------------------------


@attrs.frozen
class Ready:
    """The server's first message: the session is open."""

    session_id: str
    call_id: str
    sample_rate: int
    backend: str
    raw: dict[str, Any] = attrs.field(repr=False, eq=False)


@attrs.frozen
class Word:
    """One word of a final, in stream time."""

    word: str
    start_ms: int
    end_ms: int
    probability: float


@attrs.frozen
class Partial:
    """A tentative transcript of the open utterance: `stable` will not change, `unstable` may."""

    utterance_id: int
    text: str
    stable: str
    unstable: str
    start_ms: int
    end_ms: int
    raw: dict[str, Any] = attrs.field(repr=False, eq=False)


@attrs.frozen
class Final:
    """The transcript of record of one utterance."""

    utterance_id: int
    text: str
    start_ms: int
    end_ms: int
    words: tuple[Word, ...]
    confidence: float | None
    language: str | None
    # The session's backlog when the final was sent (None from a server that does not say).
    backlog_ms: int | None
    raw: dict[str, Any] = attrs.field(repr=False, eq=False)


@attrs.frozen
class Error:
    """An error; the server closes the session after it unless the error is per utterance."""

    code: str
    message: str
    raw: dict[str, Any] = attrs.field(repr=False, eq=False)


@attrs.frozen
class Warning:  # the protocol's name; it shadows the builtin in this module only
    """Something the client should know that does not end the session (``lagging``)."""

    code: str
    message: str
    skipped_ms: int | None
    frames_dropped: int | None
    raw: dict[str, Any] = attrs.field(repr=False, eq=False)


@attrs.frozen
class Unknown:
    """A message of a type this client does not know (from a newer server), kept as it came."""

    type: str
    raw: dict[str, Any] = attrs.field(repr=False, eq=False)


ServerMessage: TypeAlias = "Partial | Final | Error | Warning | Unknown"


def parse_message(text: str) -> Ready | ServerMessage:
    """Parse one text frame from the server; raises `ProtocolError` if it is not one."""
    try:
        raw = json.loads(text)
    except ValueError:
        raise ProtocolError(f"server messages must be JSON, got {text[:_MAX_QUOTED_CHARS]!r}"
                            ) from None
    if not isinstance(raw, dict) or not isinstance(raw.get("type"), str):
        raise ProtocolError(f"server messages must be objects with a type, got "
                            f"{text[:_MAX_QUOTED_CHARS]!r}")
    kind = raw["type"]
    if kind == "partial":
        return Partial(
            utterance_id=_get(raw, "utterance_id", int), text=_get(raw, "text", str),
            stable=_get(raw, "stable", str, ""), unstable=_get(raw, "unstable", str, ""),
            start_ms=_get(raw, "start_ms", int), end_ms=_get(raw, "end_ms", int), raw=raw)
    if kind == "final":
        words = raw.get("words") or []
        if not isinstance(words, list) or not all(isinstance(w, dict) for w in words):
            raise ProtocolError(f"a final's words must be a list of objects, got {words!r}"[
                :_MAX_QUOTED_CHARS])
        return Final(
            utterance_id=_get(raw, "utterance_id", int), text=_get(raw, "text", str),
            start_ms=_get(raw, "start_ms", int), end_ms=_get(raw, "end_ms", int),
            words=tuple(Word(_get(w, "word", str), _get(w, "start_ms", int),
                             _get(w, "end_ms", int), _get(w, "probability", float, 1.0))
                        for w in words),
            confidence=_get(raw, "confidence", float, None),
            language=_get(raw, "language", str, None),
            backlog_ms=_get(raw, "backlog_ms", int, None), raw=raw)
    if kind == "error":
        return Error(_get(raw, "code", str), _get(raw, "message", str, ""), raw=raw)
    if kind == "warning":
        return Warning(_get(raw, "code", str), _get(raw, "message", str, ""),
                       skipped_ms=_get(raw, "skipped_ms", int, None),
                       frames_dropped=_get(raw, "frames_dropped", int, None), raw=raw)
    if kind == "ready":
        return Ready(_get(raw, "session_id", str), _get(raw, "call_id", str),
                     _get(raw, "sample_rate", int), _get(raw, "backend", str, ""), raw=raw)
    return Unknown(kind, raw=raw)


_MISSING: typing.Final = object()


def _get(raw: Mapping[str, Any], name: str, kind: type[Any], default: Any = _MISSING) -> Any:
    """`raw[name]`, checked to be a `kind` (ints pass as floats); None or absent gives
    `default` where there is one."""
    value = raw.get(name)
    if value is None and default is not _MISSING:
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(f"{raw.get('type', 'a')} message: {name} must be "
                            f"{kind.__name__}, got {value!r}"[:_MAX_QUOTED_CHARS])
    return value


# Streaming session -------------------------------------------------------------------------


@attrs.define
class StreamingSession:
    """One live session: send audio and control messages, iterate over what the server sends.

    Sending and iterating may run in different tasks. Iteration yields `Partial`, `Final`,
    `Error`, `Warning` (and `Unknown`) messages and stops when the server closes the socket;
    `close_code` then says how (1000 after ``end``). Sends after the close raise
    `SessionClosed`. Create sessions with `connect`.
    """

    _ws: WebSocketConnection
    ready: Ready
    sample_rate_hz: int = SAMPLE_RATE_HZ

    @property
    def close_code(self) -> int | None:
        """The close code once the socket is closed (1006: it dropped with no close frame)."""
        return None if self._ws.closed is None else self._ws.closed.code

    @property
    def close_reason(self) -> str | None:
        """The close frame's reason text, if it had one."""
        return None if self._ws.closed is None else self._ws.closed.reason

    async def send_audio(self, pcm: Pcm) -> None:
        """Send PCM16 little-endian mono samples: bytes of any length, or an int16 array."""
        await self._send(pcm_bytes(pcm))

    async def commit(self) -> None:
        """Ask for the final of the open utterance now (nothing happens with no open speech)."""
        await self._send('{"type":"commit"}')

    async def end(self) -> None:
        """Finish: the server sends the last finals, then closes with 1000; keep iterating."""
        await self._send('{"type":"end"}')

    async def keepalive(self) -> None:
        """Tell the server the client is still there while no audio flows."""
        await self._send('{"type":"keepalive"}')

    async def aclose(self, code: int = 1000) -> None:
        """Close the socket now; finals not yet received are lost (prefer `end`)."""
        await self._ws.aclose(code)

    def __aiter__(self) -> StreamingSession:
        return self

    async def __anext__(self) -> ServerMessage:
        try:
            message = await self._ws.get_message()
        except ConnectionClosed:
            raise StopAsyncIteration from None
        if not isinstance(message, str):
            raise ProtocolError(f"the server sent a binary message of {len(message)} bytes")
        parsed = parse_message(message)
        if isinstance(parsed, Ready):
            raise ProtocolError("the server sent a second ready message")
        return parsed

    async def _send(self, message: str | bytes) -> None:
        try:
            await self._ws.send_message(message)
        except ConnectionClosed as closed:
            raise SessionClosed(*_close_of(closed)) from None


@contextlib.asynccontextmanager
async def connect(
    url: str,
    *,
    call_id: str | None = None,
    sample_rate_hz: int = SAMPLE_RATE_HZ,
    language: str | None = None,
    hotwords: Iterable[str] = (),
    partial_ms: int | None = None,
    api_key: str | None = None,
    connect_timeout_s: float = 10.0,
    max_message_bytes: int = 2**20,
    **query: str | int,
) -> AsyncIterator[StreamingSession]:
    """Open a session and wait for ``ready``; closes the socket when the block exits.

    `url` is the server's base URL (``http(s)://host:port``) or the WebSocket's URL
    (``ws(s)://host:port/v1/stt/ws``). `call_id` defaults to a fresh random id; `language`
    None lets the server detect it; `query` adds other query parameters (``frame_ms=40``).
    `api_key` goes in an ``Authorization: Bearer`` header.

    Leaving the block closes the socket at once: to get every final, call `end` and iterate
    until the server closes first. Raises `ConnectFailed` if the server cannot be reached or
    sends nothing within `connect_timeout_s`, and `SessionRefused` if it ends the session
    before ``ready`` (a bad parameter, a wrong key, overload).
    """
    params: dict[str, str | int] = {
        "call_id": call_id or f"client-{secrets.token_hex(4)}",
        "sample_rate": sample_rate_hz,
    }
    if language is not None:
        params["language"] = language
    words = [word.strip() for word in hotwords if word.strip()]
    for word in words:
        if "," in word:
            raise ValueError(f"hotwords must not contain commas, got {word!r}")
    if words:
        params["hotwords"] = ",".join(words)
    if partial_ms is not None:
        params["partial_ms"] = partial_ms
    params.update(query)
    ws_url = websocket_url(url, params)
    headers = [(b"authorization", f"Bearer {api_key}".encode())] if api_key else None
    async with contextlib.AsyncExitStack() as stack:
        try:
            ws = await stack.enter_async_context(open_websocket_url(
                ws_url, extra_headers=headers, connect_timeout=connect_timeout_s,
                disconnect_timeout=_CLOSE_TIMEOUT_S, max_message_size=max_message_bytes))
        except ConnectionRejected as exc:
            raise SessionRefused(
                "rejected", f"{_redacted(ws_url)}: the server refused the WebSocket handshake "
                f"with HTTP {exc.status_code}", http_status=exc.status_code) from None
        except HandshakeError as exc:
            cause = exc.__cause__ or exc.__context__
            why = str(cause) if cause is not None else type(exc).__name__
            raise ConnectFailed("unreachable", f"{_redacted(ws_url)}: cannot connect: {why}"
                                ) from None
        ready = await _wait_ready(ws, ws_url, connect_timeout_s)
        yield StreamingSession(ws, ready, sample_rate_hz)


async def _wait_ready(ws: WebSocketConnection, ws_url: str, timeout_s: float) -> Ready:
    """The ``ready`` message, or the error that ended the session instead."""
    with trio.move_on_after(timeout_s):
        try:
            text = await ws.get_message()
        except ConnectionClosed as closed:
            code, _ = _close_of(closed)
            raise SessionRefused(
                "closed", f"the server closed the session before it was ready (code {code})",
                close_code=code) from None
        first = parse_message(text) if isinstance(text, str) else None
        if isinstance(first, Ready):
            return first
        if not isinstance(first, Error):
            raise ProtocolError(f"the server's first message must be ready, got "
                                f"{str(text)[:_MAX_QUOTED_CHARS]!r}")
        # The close frame follows the error: wait for it (bounded) to report its code.
        close_code: int | None = None
        with trio.move_on_after(_CLOSE_TIMEOUT_S):
            try:
                while True:
                    await ws.get_message()
            except ConnectionClosed as closed:
                close_code, _ = _close_of(closed)
        raise SessionRefused(first.code, first.message, close_code=close_code, error=first)
    raise ConnectFailed("timeout", f"{_redacted(ws_url)}: no ready message within "
                                   f"{timeout_s:g} s")


def _close_of(closed: ConnectionClosed) -> tuple[int, str | None]:
    """The close code and reason of a closed connection (1006 when it gave none)."""
    if closed.reason is None:
        return 1006, None
    return closed.reason.code, closed.reason.reason


def websocket_url(url: str, query: Mapping[str, str | int] | None = None) -> str:
    """The session URL for a base URL or a WebSocket URL, with `query` merged in (it wins).

    ``http://h:8000`` gives ``ws://h:8000/v1/stt/ws``, ``https://h/stt`` gives
    ``wss://h/stt/v1/stt/ws``; a ``ws(s)://`` URL keeps its path unless it has none.
    """
    parts = urlsplit(url)
    schemes = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}
    if parts.scheme not in schemes or not parts.netloc:
        raise ValueError(f"url must be http(s)://host[:port] or ws(s)://host[:port]/v1/stt/ws, "
                         f"got {url!r}")
    path = parts.path
    if parts.scheme in ("http", "https") or path in ("", "/"):
        path = path.rstrip("/") + WS_PATH
    merged = dict(parse_qsl(parts.query, keep_blank_values=True))
    merged.update({key: str(value) for key, value in (query or {}).items()})
    return urlunsplit((schemes[parts.scheme], parts.netloc, path, urlencode(merged), ""))


def http_base_url(url: str) -> str:
    """The HTTP base URL for a base URL or a WebSocket URL (``ws://h/v1/stt/ws`` gives
    ``http://h``)."""
    parts = urlsplit(url)
    schemes = {"http": "http", "https": "https", "ws": "http", "wss": "https"}
    if parts.scheme not in schemes or not parts.netloc:
        raise ValueError(f"url must be http(s)://host[:port], got {url!r}")
    path = parts.path.rstrip("/").removesuffix(WS_PATH).rstrip("/")
    return urlunsplit((schemes[parts.scheme], parts.netloc, path, "", ""))


def _redacted(url: str) -> str:
    """`url` without its query string (it may hold a ``token``)."""
    return urlunsplit(urlsplit(url)._replace(query=""))


# Audio -------------------------------------------------------------------------------------


def pcm_bytes(pcm: Pcm) -> bytes:
    """PCM16 little-endian bytes of `pcm` (bytes as they are, or a 1-D int16 array)."""
    if isinstance(pcm, (bytes, bytearray, memoryview)):
        return bytes(pcm)
    if not isinstance(pcm, np.ndarray):
        raise TypeError(f"pcm must be bytes or an int16 array, got {type(pcm).__name__}")
    if (pcm.dtype.kind, pcm.dtype.itemsize) != ("i", 2):  # int16 in either byte order
        raise TypeError(f"pcm must be int16 samples, got {pcm.dtype} (convert float audio with "
                        "sttd.audio.float32_to_pcm16)")
    if pcm.ndim != 1 and not (pcm.ndim == 2 and pcm.shape[1] == 1):
        raise ValueError(f"pcm must be mono (1-D), got shape {pcm.shape}")
    return np.ascontiguousarray(pcm, dtype="<i2").tobytes()


def read_audio(path: str | os.PathLike[str]) -> npt.NDArray[np.int16]:
    """A file's audio as 16 kHz mono int16 samples: any WAV, or what PyAV can decode.

    Blocking file I/O and CPU work: async callers run it in a worker thread. Raises
    `UnsupportedMedia` for a file that is neither WAV nor decodable, `BadAudio` for a broken
    WAV, and `OSError` for a file that cannot be read.
    """
    path = Path(path)
    with path.open("rb") as file:
        head = file.read(12)
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        try:
            with wave.open(str(path), "rb") as wav:
                if (wav.getframerate(), wav.getnchannels(), wav.getsampwidth(),
                        wav.getcomptype()) == (SAMPLE_RATE_HZ, 1, 2, "NONE"):
                    return np.frombuffer(wav.readframes(wav.getnframes()), "<i2").astype(np.int16)
        except (wave.Error, EOFError):
            pass  # a WAV the stdlib cannot read (float, extensible, 24-bit): decode_wav can
        return float32_to_pcm16(decode_wav(path.read_bytes()))
    return _decode_with_av(path)


def _decode_with_av(path: Path) -> npt.NDArray[np.int16]:
    """Decode the first audio stream of a file with PyAV (FFmpeg) to 16 kHz mono int16."""
    import av  # only for files that are not WAV

    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise UnsupportedMedia("the file has no audio stream")
            resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE_HZ)
            blocks: list[npt.NDArray[np.int16]] = []
            for frame in container.decode(container.streams.audio[0]):
                blocks.extend(_samples(out) for out in resampler.resample(frame))
            blocks.extend(_samples(out) for out in resampler.resample(None))
    except av.FFmpegError as exc:
        raise UnsupportedMedia(f"not a WAV file, and FFmpeg cannot decode it: {exc}") from None
    if not blocks:
        raise BadAudio("the audio stream holds no samples")
    return np.concatenate(blocks).astype(np.int16, copy=False)


def _samples(frame: av.AudioFrame) -> npt.NDArray[np.int16]:
    return np.asarray(frame.to_ndarray(), dtype=np.int16).reshape(-1)


async def stream_pcm(session: StreamingSession, pcm: Pcm, *, fast: bool = False,
                     frame_ms: int = 20, end: bool = True, on_sent: OnSent | None = None) -> None:
    """Send `pcm` in `frame_ms` frames at real-time pace, then ``end`` (unless `end` is False).

    Frame i is due `i * frame_ms` after the first (a `trio.sleep_until` schedule, so slow sends
    do not add up); `fast` sends each frame as soon as the socket takes it. `on_sent` is called
    after each frame's send returns. Raises `SessionClosed` if the server closes first.
    """
    if frame_ms <= 0:
        raise ValueError(f"frame_ms must be > 0, got {frame_ms}")
    data = pcm_bytes(pcm)
    frame_bytes = session.sample_rate_hz * frame_ms // 1000 * 2
    start = trio.current_time()
    for index, offset in enumerate(range(0, len(data), frame_bytes)):
        due = start + index * frame_ms / 1000
        if not fast:
            await trio.sleep_until(due)
        sent = trio.current_time()
        await session.send_audio(data[offset : offset + frame_bytes])
        if on_sent is not None:
            on_sent(index, due, sent)
    if end:
        await session.end()


async def stream_file(session: StreamingSession, path: str | os.PathLike[str], *,
                      fast: bool = False, frame_ms: int = 20, end: bool = True,
                      on_sent: OnSent | None = None) -> None:
    """Decode a file (`read_audio`, in a worker thread) and `stream_pcm` it."""
    pcm = await trio.to_thread.run_sync(read_audio, path)
    await stream_pcm(session, pcm, fast=fast, frame_ms=frame_ms, end=end, on_sent=on_sent)


# Files over HTTP ---------------------------------------------------------------------------


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
            response = await client.post(url, content=body(), headers=headers,
                                         timeout=httpx.Timeout(timeout_s, connect=10.0))
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
