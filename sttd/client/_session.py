"""Live sessions over ``/v1/stt/ws``: connect, send audio and control messages, read events.

The server's messages are read by `sttd.api.parse_server_message`, the same module that writes
them on the server, so the client yields the server's own typed events (`sttd.api.Partial`,
`sttd.api.Final`, ...) with ``raw`` set to the message as it came.
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import typing
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import TypeAlias
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import attrs
import numpy as np
import numpy.typing as npt
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    DisconnectionTimeout,
    HandshakeError,
    WebSocketConnection,
    open_websocket_url,
)

from sttd.api import (
    Error,
    Final,
    Partial,
    Ready,
    ServerMessageError,
    Unknown,
    UtteranceEnd,
    Warning,
    encode_command,
    parse_server_message,
)
from sttd.audio import SAMPLE_RATE_HZ, float32_to_pcm16, pcm16_to_float32, read_audio
from sttd.client._errors import ConnectFailed, ProtocolError, SessionClosed, SessionRefused

__all__ = [
    "WS_PATH",
    "OnSent",
    "Pcm",
    "ServerMessage",
    "StreamingSession",
    "connect",
    "http_base_url",
    "parse_message",
    "pcm_bytes",
    "stream_file",
    "stream_pcm",
    "websocket_url",
]

WS_PATH: typing.Final = "/v1/stt/ws"
_CLOSE_TIMEOUT_S: typing.Final = 10.0
_MAX_QUOTED_CHARS: typing.Final = 200  # of an unreadable server message


Pcm: TypeAlias = "bytes | bytearray | memoryview | npt.NDArray[np.int16]"
# Called after each frame's send returns: (frame index, when it was due, when its send began),
# in `trio.current_time()` seconds.
OnSent: TypeAlias = Callable[[int, float, float], None]
# What iterating over a session yields (``ready`` comes once, before: `StreamingSession.ready`).
ServerMessage: TypeAlias = "Partial | Final | UtteranceEnd | Error | Warning | Unknown"


def parse_message(text: str) -> Ready | ServerMessage:
    """Parse one text frame from the server; raises `ProtocolError` if it is not one."""
    try:
        return parse_server_message(text)
    except ServerMessageError as exc:
        raise ProtocolError(str(exc)) from None


@attrs.define
class StreamingSession:
    """One live session: send audio and control messages, iterate over what the server sends.

    Sending and iterating may run in different tasks. Iteration yields `Partial`, `Final`,
    `UtteranceEnd`, `Error`, `Warning` (and `Unknown`) messages and stops when the server closes
    the socket; `close_code` then says how (1000 after ``end``). Sends after the close raise
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
        await self._send(encode_command("commit"))

    async def end(self) -> None:
        """Finish: the server sends the last finals, then closes with 1000; keep iterating."""
        await self._send(encode_command("end"))

    async def keepalive(self) -> None:
        """Tell the server the client is still there while no audio flows."""
        await self._send(encode_command("keepalive"))

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
        """Send one message whole: a cancel (Ctrl-C during a fast stream) lands after it, not
        halfway, where the rest of the socket would read as that frame's bytes (the ``end``
        sent next was lost in it, and with it every final still to come). Bounded: a server
        that takes nothing for `_CLOSE_TIMEOUT_S` ends the session."""
        try:
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + _CLOSE_TIMEOUT_S
                await self._ws.send_message(message)
            if scope.cancelled_caught:
                await self._ws.aclose(1008)
                raise SessionClosed(1006, f"the server took nothing for {_CLOSE_TIMEOUT_S:g} s")
        except ConnectionClosed as closed:
            raise SessionClosed(*_close_of(closed)) from None


@contextlib.asynccontextmanager
async def connect(
    url: str,
    *,
    call_id: str | None = None,
    sample_rate_hz: int = SAMPLE_RATE_HZ,
    language: str | None = None,
    hotwords: Iterable[str] | str = (),
    partial_ms: int | None = None,
    word_timings: bool = True,
    api_key: str | None = None,
    connect_timeout_s: float = 10.0,
    max_message_bytes: int = 2**20,
    **query: str | int,
) -> AsyncIterator[StreamingSession]:
    """Open a session and wait for ``ready``; closes the socket when the block exits.

    `url` is the server's base URL (``http(s)://host:port``) or the WebSocket's URL
    (``ws(s)://host:port/v1/stt/ws``). `call_id` defaults to a fresh random id; `language`
    None lets the server detect it; `word_timings` False asks for finals without their words'
    times (each then costs the server less); `query` adds other query parameters
    (``frame_ms=40``).
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
    if isinstance(hotwords, str):  # "Kubernetes,sttd", as the query and the CLI take them
        hotwords = hotwords.split(",")
    words = [word.strip() for word in hotwords if word.strip()]
    for word in words:
        if "," in word:
            raise ValueError(f"hotwords must not contain commas, got {word!r}")
    if words:
        params["hotwords"] = ",".join(words)
    if partial_ms is not None:
        params["partial_ms"] = partial_ms
    if not word_timings:
        params["words"] = "false"
    params.update(query)
    ws_url = websocket_url(url, params)
    headers = [(b"authorization", f"Bearer {api_key}".encode())] if api_key else None
    # The whole opening is bounded here: trio-websocket's own connect timeout fired, but then
    # waited on its reader task, which a server that accepts and never answers never ends.
    connecting = trio.CancelScope(deadline=trio.current_time() + connect_timeout_s)
    try:
        async with contextlib.AsyncExitStack() as stack:
            stack.enter_context(connecting)
            try:
                ws = await stack.enter_async_context(open_websocket_url(
                    ws_url, extra_headers=headers, connect_timeout=connect_timeout_s,
                    disconnect_timeout=_CLOSE_TIMEOUT_S, max_message_size=max_message_bytes))
            except ConnectionRejected as exc:
                raise SessionRefused(
                    "rejected", f"{_redacted(ws_url)}: the server refused the WebSocket "
                    f"handshake with HTTP {exc.status_code}", http_status=exc.status_code
                ) from None
            except HandshakeError as exc:
                cause = exc.__cause__ or exc.__context__
                why = str(cause) if cause is not None else type(exc).__name__
                raise ConnectFailed("unreachable", f"{_redacted(ws_url)}: cannot connect: {why}"
                                    ) from None
            ready = await _wait_ready(ws, ws_url, connect_timeout_s)
            connecting.deadline = math.inf  # open: the session has no deadline of ours
            yield StreamingSession(ws, ready, sample_rate_hz)
    except DisconnectionTimeout:
        pass  # the server did not answer our close in time: the socket is closed anyway
    if connecting.cancelled_caught:
        raise ConnectFailed("timeout", f"{_redacted(ws_url)}: no answer to the WebSocket "
                                       f"handshake within {connect_timeout_s:g} s")


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


# URLs --------------------------------------------------------------------------------------


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
    """Decode a file (`sttd.audio.read_audio`, in a worker thread, at the session's sample
    rate) and `stream_pcm` it."""
    pcm = await trio.to_thread.run_sync(_read_at, path, session.sample_rate_hz)
    await stream_pcm(session, pcm, fast=fast, frame_ms=frame_ms, end=end, on_sent=on_sent)


def _read_at(path: str | os.PathLike[str], rate_hz: int) -> npt.NDArray[np.int16]:
    """`path` decoded to mono PCM16 at `rate_hz` (`read_audio` gives 16 kHz: a session opened
    at another rate reads its frames at that rate, and 16 kHz audio there was heard too fast
    or too slow)."""
    pcm = read_audio(path)
    if rate_hz == SAMPLE_RATE_HZ:
        return pcm
    import soxr  # type: ignore[import-untyped]  # no py.typed; the server resamples with it too

    resampled = soxr.resample(pcm16_to_float32(pcm), SAMPLE_RATE_HZ, rate_hz, "HQ")
    return float32_to_pcm16(np.asarray(resampled, np.float32))
