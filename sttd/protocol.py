"""The WebSocket protocol's values: session parameters and the JSON messages, sans I/O."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import attrs

from sttd.backends.base import Result
from sttd.channels import AudioItem, Commit, End
from sttd.errors import InvalidMessage, InvalidParam

__all__ = [
    "FINAL_CAUSES",
    "MAX_HOTWORDS",
    "MAX_HOTWORD_CHARS",
    "SessionParams",
    "error_message",
    "parse_client_message",
    "quoted",
    "ready_message",
    "transcript_message",
    "utterance_end_message",
]

# What can end an utterance, as a final's ``cause`` says (`SessionParams.final_causes`): the
# VAD heard the speech end; the utterance reached STT_MAX_UTTERANCE_S; the client's commit; audio
# skipped because the session lagged; the end of the session (client's end, limits, drain).
FINAL_CAUSES = ("speech_end", "max_length", "commit", "skip", "end")

_LANGUAGE = re.compile(r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{1,8})*$")
MAX_HOTWORDS = 100
MAX_HOTWORD_CHARS = 64
_MAX_CALL_ID_CHARS = 256
_FRAME_MS_RANGE = (10, 200)
_MIN_PARTIAL_MS = 100
_MAX_QUOTED_CHARS = 40  # of a bad value, in its error message
# Bytes of text a control message may hold; audio goes in binary frames.
MAX_TEXT_MESSAGE_BYTES = 4096


@attrs.frozen
class SessionParams:
    """A session's validated query parameters."""

    call_id: str
    sample_rate_hz: int = 16000
    codec: str = "pcm_s16le"
    channels: int = 1
    frame_ms: int = 20
    partial_ms: int = 500
    # None means detect the language.
    language: str | None = None
    hotwords: tuple[str, ...] = ()
    # What protocol adapters (`sttd.deepgram`) may ask of a session; the defaults are what
    # /v1/stt/ws gives. Silence that ends an utterance (None: STT_VAD_SILENCE_MS), ms.
    vad_silence_ms: int | None = None
    # Whether partials are decoded and sent at all.
    partials: bool = True
    # When set, an ``utterance_end`` message follows the last word of a final once this much
    # audio passed after that final with no new speech, ms.
    utterance_end_ms: int | None = None
    # Whether each final says what ended it (``cause``, see `FINAL_CAUSES`).
    final_causes: bool = False
    # Fields added to the ready message: how an adapter's transport, which swallows the ready
    # message, learns the options its route parsed.
    ready_extra: tuple[tuple[str, str | int | bool], ...] = ()

    @classmethod
    def from_query(cls, query: Mapping[str, str], *, default_partial_ms: int = 500) -> SessionParams:
        """Validate query parameters; raises `InvalidParam` naming the first bad one.

        `default_partial_ms` applies when the client gives no ``partial_ms``.
        """
        call_id = query.get("call_id", "").strip()
        if not call_id:
            raise InvalidParam("call_id", "call_id is required, got nothing")
        if len(call_id) > _MAX_CALL_ID_CHARS:
            raise InvalidParam(
                "call_id", f"call_id must be at most {_MAX_CALL_ID_CHARS} characters, "
                f"got {len(call_id)}")
        if "sample_rate" not in query:
            raise InvalidParam("sample_rate", "sample_rate is required and must be 16000")
        sample_rate = _int(query, "sample_rate", 16000)
        if sample_rate != 16000:
            raise InvalidParam("sample_rate", f"sample_rate must be 16000, got {sample_rate}")
        codec = query.get("codec", "pcm_s16le")
        if codec != "pcm_s16le":
            raise InvalidParam("codec", f"codec must be pcm_s16le, got {quoted(codec)}")
        channels = _int(query, "channels", 1)
        if channels != 1:
            raise InvalidParam("channels", f"channels must be 1, got {channels}")
        frame_ms = _int(query, "frame_ms", 20)
        if not _FRAME_MS_RANGE[0] <= frame_ms <= _FRAME_MS_RANGE[1]:
            raise InvalidParam(
                "frame_ms", f"frame_ms must be in {_FRAME_MS_RANGE[0]}..{_FRAME_MS_RANGE[1]}, "
                f"got {frame_ms}")
        partial_ms = _int(query, "partial_ms", max(default_partial_ms, _MIN_PARTIAL_MS))
        if partial_ms < _MIN_PARTIAL_MS:
            raise InvalidParam(
                "partial_ms", f"partial_ms must be >= {_MIN_PARTIAL_MS}, got {partial_ms}")
        return cls(
            call_id=call_id,
            sample_rate_hz=sample_rate,
            codec=codec,
            channels=channels,
            frame_ms=frame_ms,
            partial_ms=partial_ms,
            language=parse_language(query.get("language", "auto")),
            hotwords=parse_hotwords(query.get("hotwords", "")),
        )


def parse_language(value: str, *, param: str = "language") -> str | None:
    """``auto`` (or empty) gives None; a BCP-47 tag is returned as given."""
    value = value.strip()
    if value in ("", "auto"):
        return None
    if not _LANGUAGE.match(value):
        raise InvalidParam(param, f"{param} must be 'auto' or a BCP-47 code such as 'en' or "
                                  f"'en-US', got {quoted(value)}")
    return value


def parse_hotwords(value: str, *, param: str = "hotwords") -> tuple[str, ...]:
    """Split comma-separated hotwords, dropping blanks; bounded in count and length."""
    words = tuple(word.strip() for word in value.split(",") if word.strip())
    if len(words) > MAX_HOTWORDS:
        raise InvalidParam(param, f"{param} must hold at most {MAX_HOTWORDS} entries, "
                                  f"got {len(words)}")
    for word in words:
        if len(word) > MAX_HOTWORD_CHARS:
            raise InvalidParam(param, f"each of {param} must be at most {MAX_HOTWORD_CHARS} "
                                      f"characters, got {len(word)} in {word[:16]!r}...")
    return words


def _int(query: Mapping[str, str], name: str, default: int) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise InvalidParam(name, f"{name} must be an integer, got {quoted(raw)}") from None


def quoted(value: str) -> str:
    """`value` quoted for an error message; a query value can be kilobytes long."""
    if len(value) <= _MAX_QUOTED_CHARS:
        return repr(value)
    return f"{value[:_MAX_QUOTED_CHARS]!r}..."


def parse_client_message(text: str, received_at: float) -> AudioItem | None:
    """Parse a text frame: `Commit`, `End`, or None for a keepalive.

    Raises `InvalidMessage` for anything that is not one of those.
    """
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_TEXT_MESSAGE_BYTES:
        raise InvalidMessage(f"text messages must be at most {MAX_TEXT_MESSAGE_BYTES} bytes, "
                             f"got {size}; send audio as binary frames")
    try:
        message = json.loads(text)
    except ValueError:
        raise InvalidMessage(f"text messages must be JSON objects, got {text[:40]!r}") from None
    except RecursionError:
        # 4096 bytes of brackets nest past the interpreter's recursion limit.
        raise InvalidMessage(f"text messages must be JSON objects, got JSON nested too deeply: "
                             f"{text[:40]!r}") from None
    if not isinstance(message, dict):
        raise InvalidMessage(f"text messages must be JSON objects, got {type(message).__name__}")
    kind = message.get("type")
    if kind == "commit":
        return Commit(received_at)
    if kind == "end":
        return End(received_at)
    if kind == "keepalive":
        return None
    raise InvalidMessage(
        f"message type must be one of commit, end, keepalive, got {str(kind)[:40]!r}")


def ready_message(session_id: str, params: SessionParams, backend: str) -> dict[str, Any]:
    return {
        "type": "ready",
        "session_id": session_id,
        "call_id": params.call_id,
        "sample_rate": params.sample_rate_hz,
        "backend": backend,
        **dict(params.ready_extra),
    }


def transcript_message(
    kind: str, utterance_id: int, result: Result, start_ms: int, end_ms: int
) -> dict[str, Any]:
    """A ``partial`` or ``final`` message; finals carry words, confidence and language."""
    message: dict[str, Any] = {
        "type": kind,
        "utterance_id": utterance_id,
        "text": result.text,
        "start_ms": start_ms,
        "end_ms": end_ms,
    }
    if kind == "final":
        message["words"] = [
            {
                "word": word.word,
                "start_ms": start_ms + round(word.start_s * 1000),
                "end_ms": start_ms + round(word.end_s * 1000),
                "probability": round(word.probability, 4),
            }
            for word in result.words
        ]
        message["confidence"] = (
            None if result.confidence is None else round(result.confidence, 4))
        message["language"] = result.language
    return message


def utterance_end_message(last_word_end_ms: int) -> dict[str, Any]:
    """Sent when `SessionParams.utterance_end_ms` of audio followed the last word without speech."""
    return {"type": "utterance_end", "last_word_end_ms": last_word_end_ms}


def error_message(code: str, message: str) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": message}


def warning_message(code: str, message: str, **details: Any) -> dict[str, Any]:
    """Something the client should know that does not stop the session (e.g. ``lagging``)."""
    return {"type": "warning", "code": code, "message": message, **details}


def dumps(message: Mapping[str, Any]) -> str:
    """Compact JSON for the wire."""
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False)
