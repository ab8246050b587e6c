"""sttd's own WebSocket protocol on ``/v1/stt/ws``: its query, its JSON messages, sans I/O.

`NativeCodec` is the server's side of one connection; `parse_server_message` is a client's
(`sttd.client` uses it), so the two sides read and write the same shapes from one module. The
messages are documented in README.md ("WebSocket protocol").
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final, Literal, TypeAlias

import attrs
from werkzeug.datastructures import MultiDict

from sttd.api._events import (
    Audio,
    ClientCommand,
    Close,
    Commit,
    Configure,
    End,
    Error,
    Final as FinalEvent,
    KeepAlive,
    Partial,
    Ready,
    TURN_EVENTS,
    SessionEvent,
    SessionOptions,
    SessionRequest,
    UtteranceEnd,
    Warning,
    Word,
)
from sttd.api._params import (
    MIN_PARTIAL_MS,
    WIRE_DIGITS,
    default_partial_ms,
    dumps,
    load_client_json,
    parse_hotwords,
    parse_task,
    parse_language,
    query_bool,
    query_int,
    quoted,
)
from sttd.audio import (
    MAX_SAMPLE_RATE_HZ,
    MIN_SAMPLE_RATE_HZ,
    SAMPLE_RATE_HZ,
    AudioFormat,
    SampleFormat,
)
from sttd.errors import InvalidMessage, InvalidParam, SttdError
from sttd.settings import Settings

__all__ = [
    "NativeCodec",
    "ServerMessageError",
    "Unknown",
    "encode_command",
    "parse_server_message",
    "to_json",
]

_MAX_CALL_ID_CHARS: Final = 256
# The codecs a stream may send: PCM16 little-endian, or G.711 (one byte a sample) as telephony
# sends it.
_CODECS: Final[dict[str, SampleFormat]] = {"pcm_s16le": "pcm16", "mulaw": "mulaw", "alaw": "alaw"}
_FRAME_MS_RANGE: Final = (10, 200)
_MAX_QUOTED_CHARS: Final = 200  # of an unreadable server message


@attrs.define
class NativeCodec:
    """sttd's protocol for one connection (see `Codec`)."""

    def accept(self, query: MultiDict[str, str], settings: Settings) -> SessionRequest:
        call_id = query.get("call_id", "").strip()
        if not call_id:
            raise InvalidParam("call_id", "call_id is required, got nothing")
        if len(call_id) > _MAX_CALL_ID_CHARS:
            raise InvalidParam(
                "call_id", f"call_id must be at most {_MAX_CALL_ID_CHARS} characters, "
                f"got {len(call_id)}")
        if "sample_rate" not in query:
            raise InvalidParam("sample_rate", "sample_rate is required (the audio's rate in Hz, "
                                              f"{SAMPLE_RATE_HZ} for the server's own)")
        # Any rate is converted to the server's 16 kHz (telephony's 8 kHz G.711 among them).
        sample_rate = query_int(query, "sample_rate", SAMPLE_RATE_HZ, lo=MIN_SAMPLE_RATE_HZ,
                                hi=MAX_SAMPLE_RATE_HZ)
        codec = query.get("codec", "pcm_s16le")
        sample_format = _CODECS.get(codec)
        if sample_format is None:
            raise InvalidParam("codec", f"codec must be one of {', '.join(_CODECS)}, "
                                        f"got {quoted(codec)}")
        channels = query_int(query, "channels", 1)
        if channels != 1:
            raise InvalidParam("channels", f"channels must be 1, got {channels}")
        # The client's intended frame size: checked, but frames of any size are taken.
        frame_ms = query_int(query, "frame_ms", 20)
        if not _FRAME_MS_RANGE[0] <= frame_ms <= _FRAME_MS_RANGE[1]:
            raise InvalidParam(
                "frame_ms", f"frame_ms must be in {_FRAME_MS_RANGE[0]}..{_FRAME_MS_RANGE[1]}, "
                f"got {frame_ms}")
        partial_ms = query_int(query, "partial_ms", default_partial_ms(settings))
        if partial_ms < MIN_PARTIAL_MS:
            raise InvalidParam(
                "partial_ms", f"partial_ms must be >= {MIN_PARTIAL_MS}, got {partial_ms}")
        return SessionRequest(
            call_id=call_id,
            audio_format=AudioFormat(sample_rate, 1, sample_format),
            options=SessionOptions(
                partial_ms=partial_ms,
                language=parse_language(query.get("language", "auto")),
                hotwords=parse_hotwords(query.get("hotwords", "")),
                task=parse_task(query.get("task", "transcribe")),
                word_timings=query_bool(query, "words", default=True),
            ),
        )

    def decode(self, message: bytes | str, received_at: float) -> ClientCommand:
        if isinstance(message, bytes):
            return Audio(message)
        kind = load_client_json(message).get("type")
        if kind == "commit":
            return Commit(received_at)
        if kind == "end":
            return End(received_at)
        if kind == "keepalive":
            return KeepAlive()
        raise InvalidMessage(
            "message type must be one of commit, end, keepalive, got "
            + ("no type" if kind is None else repr(str(kind)[:40])))

    def withdraw(self, command: Configure) -> None:
        return None  # this protocol's messages never reconfigure a session

    def encode(self, event: SessionEvent) -> list[str]:
        if isinstance(event, Close):
            return []  # nothing precedes our close frame
        if isinstance(event, TURN_EVENTS):
            return []  # this protocol does not ask for turns
        return [dumps(to_json(event))]


def to_json(event: Ready | Partial | FinalEvent | UtteranceEnd | Error | Warning
            ) -> dict[str, Any]:
    """The JSON object of a server message."""
    if isinstance(event, Ready):
        return {"type": "ready", "session_id": event.session_id, "call_id": event.call_id,
                "sample_rate": event.sample_rate_hz, "backend": event.backend}
    if isinstance(event, Partial):
        return {"type": "partial", "utterance_id": event.utterance_id, "text": event.text,
                "stable": event.stable, "unstable": event.unstable,
                "start_ms": event.start_ms, "end_ms": event.end_ms}
    if isinstance(event, FinalEvent):
        return {
            "type": "final", "utterance_id": event.utterance_id, "text": event.text,
            "start_ms": event.start_ms, "end_ms": event.end_ms,
            "words": [{"word": word.word, "start_ms": word.start_ms, "end_ms": word.end_ms,
                       "probability": round(word.probability, WIRE_DIGITS)}
                      for word in event.words],
            "confidence": None if event.confidence is None else round(event.confidence, WIRE_DIGITS),
            "language": event.language,
            "language_probability": (None if event.language_probability is None
                                     else round(event.language_probability, WIRE_DIGITS)),
            "backlog_ms": event.backlog_ms,
        }
    if isinstance(event, UtteranceEnd):
        return {"type": "utterance_end", "last_word_end_ms": event.last_word_end_ms}
    if isinstance(event, Error):
        return {"type": "error", "code": event.code, "message": event.message}
    details = {name: value for name, value in (("skipped_ms", event.skipped_ms),
                                               ("frames_dropped", event.frames_dropped))
               if value is not None}
    return {"type": "warning", "code": event.code, "message": event.message, **details}


# -- the client's side ---------------------------------------------------------------------------


ClientMessageType = Literal["commit", "end", "keepalive"]


def encode_command(kind: ClientMessageType) -> str:
    """A client's text message: `Commit`, `End` or `KeepAlive` once the server decodes it
    (audio goes in binary frames, as it is)."""
    return dumps({"type": kind})


class ServerMessageError(SttdError):
    """A server message that is not one of the protocol's (the client library's ProtocolError)."""


@attrs.frozen
class Unknown:
    """A message of a type this side does not know (from a newer server), kept as it came."""

    type: str
    raw: Mapping[str, Any] = attrs.field(repr=False, eq=False)


ServerMessage: TypeAlias = "Ready | Partial | FinalEvent | UtteranceEnd | Error | Warning | Unknown"


def parse_server_message(text: str) -> Ready | Partial | FinalEvent | UtteranceEnd | Error | Warning | Unknown:
    """Read one server text frame; raises `ServerMessageError` if it is not a message."""
    try:
        raw = json.loads(text)
    except ValueError:
        raise ServerMessageError(
            f"server messages must be JSON, got {text[:_MAX_QUOTED_CHARS]!r}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("type"), str):
        raise ServerMessageError(f"server messages must be objects with a type, got "
                                 f"{text[:_MAX_QUOTED_CHARS]!r}")
    kind = raw["type"]
    if kind == "partial":
        return Partial(_get(raw, "utterance_id", int), _get(raw, "stable", str, ""),
                       _get(raw, "unstable", str, _get(raw, "text", str)),
                       _get(raw, "start_ms", int), _get(raw, "end_ms", int), raw=raw)
    if kind == "final":
        words = raw.get("words") or []
        if not isinstance(words, list) or not all(isinstance(w, dict) for w in words):
            raise ServerMessageError(
                f"a final's words must be a list of objects, got {words!r}"[:_MAX_QUOTED_CHARS])
        return FinalEvent(
            _get(raw, "utterance_id", int), _get(raw, "text", str),
            _get(raw, "start_ms", int), _get(raw, "end_ms", int),
            words=tuple(Word(_get(w, "word", str), _get(w, "start_ms", int),
                             _get(w, "end_ms", int), _get(w, "probability", float, 1.0))
                        for w in words),
            confidence=_get(raw, "confidence", float, None),
            language=_get(raw, "language", str, None),
            language_probability=_get(raw, "language_probability", float, None),
            backlog_ms=_get(raw, "backlog_ms", int, None), raw=raw)
    if kind == "utterance_end":
        return UtteranceEnd(_get(raw, "last_word_end_ms", int), raw=raw)
    if kind == "error":
        return Error(_get(raw, "code", str), _get(raw, "message", str, ""), raw=raw)
    if kind == "warning":
        return Warning(_get(raw, "code", str), _get(raw, "message", str, ""),
                       skipped_ms=_get(raw, "skipped_ms", int, None),
                       frames_dropped=_get(raw, "frames_dropped", int, None), raw=raw)
    if kind == "ready":
        return Ready(_get(raw, "session_id", str), _get(raw, "call_id", str),
                     _get(raw, "backend", str, ""), _get(raw, "sample_rate", int), raw=raw)
    return Unknown(kind, raw=raw)


_MISSING: Final = object()


def _get(raw: Mapping[str, Any], name: str, kind: type[Any], default: Any = _MISSING) -> Any:
    """`raw[name]`, checked to be a `kind` (ints pass as floats); None or absent gives
    `default` where there is one."""
    value = raw.get(name)
    if value is None and default is not _MISSING:
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ServerMessageError(f"{raw.get('type', 'a')} message: {name} must be "
                                 f"{kind.__name__}, got {value!r}"[:_MAX_QUOTED_CHARS])
    return value
