"""OpenAI's Realtime API for transcription sessions on ``/v1/realtime``, over the same session
core, sans I/O.

Theory of operation. `RealtimeCodec` is one connection's protocol (see `Codec`). A Realtime
client configures its session with messages after it connects, not in the URL, so:

* `accept` takes the URL (``intent=transcription``; ``model`` is accepted and ignored) and opens
  the session with OpenAI's defaults: PCM16 at 24 kHz, server VAD (silence 500 ms, prefix
  padding 300 ms), auto language, no prompt, and the session core's turn events on;
* `decode`: ``input_audio_buffer.append`` (base64) is `Audio` in the format of the latest
  update (PCM16 at 24 kHz, or G.711 mu-law or A-law at 8 kHz; the session switches converters
  where the format changes); ``.commit`` is `Commit`;
  ``.clear`` is `Clear`; ``session.update`` (the GA shape, ``{"type": "transcription", "audio":
  {"input": {...}}}``) and the older ``transcription_session.update`` are `Configure` with the
  options they set. Every field is checked: one sttd does not know or cannot honour is refused
  with an ``error`` event naming it (``param``), and the update is not applied, so nothing
  that changes results is ignored silently. Binary frames and other event types are refused
  the same way; the session goes on;
* `encode` speaks the session's turns and transcripts as OpenAI's server events, each with an
  ``event_id``. One utterance is one conversation item (``item_id`` from its utterance id):
  ``input_audio_buffer.speech_started`` / ``speech_stopped`` (server VAD only),
  ``input_audio_buffer.committed`` (with ``previous_item_id``), then
  ``conversation.item.input_audio_transcription.delta`` events and one ``.completed`` (or
  ``.failed``). Deltas are append-only: each carries the words of a partial that just became
  stable (they never change again), and at the final, the rest where the final begins with
  what the deltas said. The final is the transcript of record: it is decoded afresh, so where
  it differs from the stable words already sent, ``completed.transcript`` is what counts and no
  further delta is sent. Every committed item gets a ``completed``, with an empty transcript
  where nothing was recognised, and a commit of audio in which the VAD heard no speech gives an
  item with an empty transcript too (a commit with no audio at all is an error, as OpenAI's).
  ``logprobs`` (``include: ["item.input_audio_transcription.logprobs"]``) are per word, from
  the backend's word probabilities, where it has them.

With ``turn_detection: null`` utterances end only at a commit (the VAD still finds where speech
starts, and an utterance longer than STT_MAX_UTTERANCE_S is cut there).
"""

from __future__ import annotations

import base64
import binascii
import collections
import json
import math
import secrets
from collections.abc import Mapping
from typing import Any, Final

import attrs
from werkzeug.datastructures import MultiDict

from sttd.api._events import (
    Audio,
    Clear,
    Cleared,
    ClientCommand,
    Commit,
    Committed,
    Configure,
    Configured,
    Error,
    Final as FinalEvent,
    Partial,
    Ready,
    SessionEvent,
    SessionOptions,
    SessionRequest,
    SpeechStarted,
    SpeechStopped,
)
from sttd.api._openai import prompt_phrases
from sttd.api._params import default_partial_ms, dumps, parse_language, quoted
from sttd.audio import AudioFormat
from sttd.errors import ClientError, InvalidMessage, InvalidParam
from sttd.settings import Settings

__all__ = ["RealtimeCodec"]

RATE_HZ: Final = 24_000  # OpenAI's audio/pcm: 16-bit mono little-endian at 24 kHz
_DEFAULT_SILENCE_MS: Final = 500
_DEFAULT_PREFIX_MS: Final = 300
_DEFAULT_THRESHOLD: Final = 0.5
# The input formats OpenAI's Realtime API names: PCM16 at 24 kHz, and G.711 at 8 kHz (what a
# telephony bridge such as Twilio's Media Streams sends), as the beta shape's
# ``input_audio_format`` and the GA shape's ``audio.input.format.type`` call them.
_PCM: Final = AudioFormat(RATE_HZ, 1, "pcm16")
_FORMATS: Final[dict[str, AudioFormat]] = {
    "pcm16": _PCM, "g711_ulaw": AudioFormat(8000, 1, "mulaw"),
    "g711_alaw": AudioFormat(8000, 1, "alaw")}
_GA_TYPES: Final[dict[str, str]] = {"audio/pcm": "pcm16", "audio/pcmu": "g711_ulaw",
                                    "audio/pcma": "g711_alaw"}
_MIN_SILENCE_MS: Final = 100
_MAX_WAIT_MS: Final = 60_000
_LOGPROBS: Final = "item.input_audio_transcription.logprobs"
_CLIENT_EVENTS: Final = ("session.update", "transcription_session.update",
                         "input_audio_buffer.append", "input_audio_buffer.commit",
                         "input_audio_buffer.clear")
# Our error codes that are the client's doing (OpenAI's invalid_request_error); others are
# server errors.
_CLIENT_CODES: Final = frozenset({"invalid_message", "invalid_param", "unsupported_language",
                                  "unauthorized", "payload_too_large", "unsupported_event",
                                  "unknown_parameter", "invalid_value",
                                  "input_audio_buffer_commit_empty", "bad_audio",
                                  "idle_timeout", "session_too_long"})


@attrs.frozen
class _Setup:
    """What a session update asked for, beyond the core's options."""

    options: SessionOptions
    model: str
    prompt: str
    server_vad: bool
    threshold: float
    logprobs: bool
    legacy: bool  # asked as transcription_session.update: answered in that shape
    audio_format: AudioFormat = _PCM


@attrs.define
class RealtimeCodec:
    """OpenAI's Realtime transcription protocol for one connection (see the module docstring)."""

    # The client speaks the beta protocol (header ``OpenAI-Beta: realtime=v1``): the session
    # opens with ``transcription_session.created``, in that shape, as OpenAI's beta opens it.
    beta: bool = attrs.field(default=False, kw_only=True)
    _vad: str = attrs.field(init=False, default="silero")
    _backend: str = attrs.field(init=False, default="")
    _setup: _Setup | None = attrs.field(init=False, default=None)
    # Updates decoded but not yet applied by the core, oldest first (their `Configured` comes
    # back in the same order).
    _pending: collections.deque[_Setup] = attrs.field(init=False, factory=collections.deque)
    _session_id: str = attrs.field(init=False, factory=lambda: "sess_" + secrets.token_hex(8))
    _item_prefix: str = attrs.field(init=False, factory=lambda: "item_" + secrets.token_hex(5))
    _events: int = attrs.field(init=False, default=0)
    _previous_item: str | None = attrs.field(init=False, default=None)
    _empty_items: int = attrs.field(init=False, default=0)
    # Bytes of audio appended since the buffer was last committed or cleared.
    _buffered_bytes: int = attrs.field(init=False, default=0)
    # For each utterance with deltas out: the text they said so far.
    _said: dict[int, str] = attrs.field(init=False, factory=dict)

    # -- the URL ---------------------------------------------------------------------------

    def accept(self, query: MultiDict[str, str], settings: Settings) -> SessionRequest:
        intent = query.get("intent", "transcription").strip()
        if intent != "transcription":
            raise InvalidParam("intent", f"sttd serves Realtime transcription sessions only: "
                                         f"intent must be transcription, got {quoted(intent)}")
        self._vad = settings.vad
        options = SessionOptions(
            partial_ms=default_partial_ms(settings), partials=True,
            vad_silence_ms=_DEFAULT_SILENCE_MS, preroll_ms=_DEFAULT_PREFIX_MS,
            turn_events=True, endpointing=True, word_timings=False)
        self._setup = _Setup(options, model=query.get("model", "") or "", prompt="",
                             server_vad=True, threshold=_DEFAULT_THRESHOLD, logprobs=False,
                             legacy=self.beta)
        # The protocol has no keepalive: a quiet session is bounded by its own setting.
        return SessionRequest(call_id=self._session_id, audio_format=_PCM, options=options,
                              idle_setting="STT_REALTIME_IDLE_TIMEOUT_S",
                              idle_timeout_s=settings.realtime_idle_timeout_s,
                              oversized_message_closes=False)

    # -- client events ---------------------------------------------------------------------

    def decode(self, message: bytes | str, received_at: float) -> ClientCommand:
        if isinstance(message, bytes):
            raise InvalidMessage("the Realtime API takes no binary frames: send audio as "
                                 "input_audio_buffer.append events with base64 PCM16",
                                 code="invalid_value")
        event = _load(message)
        kind = event.get("type")
        if not isinstance(kind, str):
            raise InvalidMessage("every client event needs a string 'type'", param="type",
                                 code="invalid_value")
        if kind == "input_audio_buffer.append":
            _only(event, {"type", "event_id", "audio"}, "")
            assert self._setup is not None
            # The format of the latest update: appends after it are in it.
            audio_format = (self._pending[-1] if self._pending else self._setup).audio_format
            audio = _decode_audio(event.get("audio"), audio_format)
            self._buffered_bytes += len(audio)
            return Audio(audio, audio_format)
        if kind == "input_audio_buffer.commit":
            _only(event, {"type", "event_id"}, "")
            return Commit(received_at)
        if kind == "input_audio_buffer.clear":
            _only(event, {"type", "event_id"}, "")
            self._buffered_bytes = 0
            return Clear(received_at)
        if kind in ("session.update", "transcription_session.update"):
            _only(event, {"type", "event_id", "session"}, "")
            session = event.get("session")
            if not isinstance(session, dict):
                raise InvalidMessage(f"{kind} needs a 'session' object", param="session",
                                     code="invalid_value")
            assert self._setup is not None
            latest = self._pending[-1] if self._pending else self._setup
            setup = (self._legacy_update(session, latest) if kind.startswith("transcription")
                     else self._update(session, latest))
            self._pending.append(setup)
            return Configure(setup.options, received_at)
        raise InvalidMessage(
            f"sttd serves transcription sessions: client events are "
            f"{', '.join(_CLIENT_EVENTS)}; {quoted(kind)} is not one of them",
            param="type", code="unsupported_event")

    def _update(self, session: Mapping[str, Any], base: _Setup) -> _Setup:
        """The setup after a GA ``session.update`` (see OpenAI's RealtimeTranscriptionSession)."""
        _only(session, {"type", "audio", "include", "id", "object", "expires_at",
                        "client_secret"}, "session")
        kind = session.get("type", "transcription")
        if kind != "transcription":
            raise _invalid("session.type", "sttd serves transcription sessions: session.type "
                                           f"must be transcription, got {quoted(str(kind))}")
        changes: dict[str, Any] = {"legacy": False}
        audio = _object(session, "audio", "session")
        if audio is not None:
            _only(audio, {"input"}, "session.audio")
            given = _object(audio, "input", "session.audio")
            if given is not None:
                where = "session.audio.input"
                _only(given, {"format", "transcription", "turn_detection", "noise_reduction"},
                      where)
                if "format" in given and given["format"] is not None:
                    changes["audio_format"] = _FORMATS[_ga_format(given["format"],
                                                                  f"{where}.format")]
                if "noise_reduction" in given:
                    _check_noise_reduction(given["noise_reduction"], f"{where}.noise_reduction")
                if "transcription" in given:
                    changes.update(_transcription(given["transcription"],
                                                  f"{where}.transcription"))
                if "turn_detection" in given:
                    changes.update(self._turn_detection(given["turn_detection"], base,
                                                        f"{where}.turn_detection"))
        if "include" in session:
            changes["logprobs"] = _include(session["include"])
        return _apply(base, changes)

    def _legacy_update(self, session: Mapping[str, Any], base: _Setup) -> _Setup:
        """The setup after a ``transcription_session.update`` (the beta shape)."""
        _only(session, {"input_audio_format", "input_audio_transcription", "turn_detection",
                        "input_audio_noise_reduction", "include", "modalities",
                        "client_secret"}, "session")
        changes: dict[str, Any] = {"legacy": True}
        if session.get("input_audio_format") is not None:
            name = session["input_audio_format"]
            if not isinstance(name, str) or name not in _FORMATS:
                raise _invalid("session.input_audio_format",
                               "input_audio_format must be pcm16 (24 kHz), g711_ulaw or "
                               f"g711_alaw (8 kHz), got {quoted(str(name))}")
            changes["audio_format"] = _FORMATS[name]
        if "modalities" in session and session["modalities"] not in (["text"], None):
            raise _invalid("session.modalities", "a transcription session's modalities are "
                                                 "['text']")
        if "input_audio_noise_reduction" in session:
            _check_noise_reduction(session["input_audio_noise_reduction"],
                                   "session.input_audio_noise_reduction")
        if "input_audio_transcription" in session:
            changes.update(_transcription(session["input_audio_transcription"],
                                          "session.input_audio_transcription"))
        if "turn_detection" in session:
            changes.update(self._turn_detection(session["turn_detection"], base,
                                                "session.turn_detection"))
        if "include" in session:
            changes["logprobs"] = _include(session["include"])
        return _apply(base, changes)

    def _turn_detection(self, value: Any, base: _Setup, where: str) -> dict[str, Any]:
        if value is None:
            return {"server_vad": False}
        if not isinstance(value, dict):
            raise _invalid(where, f"{where} must be an object or null")
        _only(value, {"type", "threshold", "prefix_padding_ms", "silence_duration_ms",
                      "create_response", "interrupt_response", "idle_timeout_ms"}, where)
        kind = value.get("type", "server_vad")
        if kind != "server_vad":
            raise _invalid(f"{where}.type", f"sttd detects turns with server_vad, or none "
                                            f"(turn_detection: null); got {quoted(str(kind))}")
        if value.get("idle_timeout_ms") is not None:
            raise _invalid(f"{where}.idle_timeout_ms", "sttd has no idle timeout turns: leave "
                                                       "idle_timeout_ms null")
        changes: dict[str, Any] = {"server_vad": True}
        if "threshold" in value:
            threshold = _number(value["threshold"], f"{where}.threshold", 0.0, 1.0)
            if threshold <= 0.0:
                raise _invalid(f"{where}.threshold", "threshold must be above 0")
            if self._vad != "silero" and threshold != _DEFAULT_THRESHOLD:
                raise _invalid(f"{where}.threshold", f"this server's VAD is {self._vad} "
                                                     "(STT_VAD), which has no speech "
                                                     "probability: leave threshold at 0.5")
            changes["threshold"] = threshold
        if "prefix_padding_ms" in value:
            changes["preroll_ms"] = round(_number(value["prefix_padding_ms"],
                                                  f"{where}.prefix_padding_ms", 0, 5000))
        if "silence_duration_ms" in value:
            changes["vad_silence_ms"] = round(_number(value["silence_duration_ms"],
                                                      f"{where}.silence_duration_ms",
                                                      _MIN_SILENCE_MS, _MAX_WAIT_MS))
        return changes

    def withdraw(self, command: Configure) -> None:
        """The engine refused the update `decode` just returned (a language or hotwords it
        cannot serve): it is dropped, so later appends stay in the applied format, later
        updates build on the applied setup, and each `Configured` meets its own update."""
        if self._pending:
            self._pending.pop()

    # -- server events ---------------------------------------------------------------------

    def encode(self, event: SessionEvent) -> list[str]:
        setup = self._setup
        if setup is None:  # refused before the URL was taken: only the error goes out
            return [self._error(event)] if isinstance(event, Error) else []
        if isinstance(event, Ready):
            self._backend = event.backend
            name = "transcription_session.created" if setup.legacy else "session.created"
            return [self._event(name, session=self._session(setup))]
        if isinstance(event, SpeechStarted):
            if not setup.server_vad:
                return []
            return [self._event("input_audio_buffer.speech_started",
                                audio_start_ms=event.start_ms,
                                item_id=self._item(event.utterance_id))]
        if isinstance(event, SpeechStopped):
            if not setup.server_vad:
                return []
            return [self._event("input_audio_buffer.speech_stopped",
                                audio_end_ms=event.end_ms,
                                item_id=self._item(event.utterance_id))]
        if isinstance(event, Committed):
            return self._committed(event)
        if isinstance(event, Cleared):
            self._buffered_bytes = 0
            if event.utterance_id is not None:
                self._said.pop(event.utterance_id, None)
            return [self._event("input_audio_buffer.cleared")]
        if isinstance(event, Configured):
            if self._pending:
                self._setup = setup = self._pending.popleft()
            name = "transcription_session.updated" if setup.legacy else "session.updated"
            return [self._event(name, session=self._session(setup))]
        if isinstance(event, Partial):
            return self._delta(event.utterance_id, event.stable)
        if isinstance(event, FinalEvent):
            return self._completed(event, setup)
        if isinstance(event, Error):
            return [self._error(event)]
        return []  # UtteranceEnd and Warning have no Realtime form; a close frame says the rest

    def _committed(self, event: Committed) -> list[str]:
        buffered, self._buffered_bytes = self._buffered_bytes, 0
        if event.utterance_id is not None:
            item = self._item(event.utterance_id)
            out = [self._event("input_audio_buffer.committed",
                               previous_item_id=self._previous_item, item_id=item)]
            self._previous_item = item
            return out
        if not buffered:
            return [self._event("error", error={
                "type": "invalid_request_error", "code": "input_audio_buffer_commit_empty",
                "message": "Error committing input audio buffer: the buffer holds no audio.",
                "param": None, "event_id": None})]
        # Audio without speech: an item of its own, with nothing in it.
        self._empty_items += 1
        item = f"{self._item_prefix}_quiet{self._empty_items}"
        out = [self._event("input_audio_buffer.committed", previous_item_id=self._previous_item,
                           item_id=item),
               self._event("conversation.item.input_audio_transcription.completed",
                           item_id=item, content_index=0, transcript="",
                           usage={"type": "duration", "seconds": 0})]
        self._previous_item = item
        return out

    def _delta(self, utterance_id: int, stable: str) -> list[str]:
        said = self._said.get(utterance_id, "")
        if len(stable) <= len(said) or not stable.startswith(said):
            return []
        self._said[utterance_id] = stable
        return [self._event("conversation.item.input_audio_transcription.delta",
                            item_id=self._item(utterance_id), content_index=0,
                            delta=stable[len(said):] if said else stable)]

    def _completed(self, event: FinalEvent, setup: _Setup) -> list[str]:
        out = self._delta(event.utterance_id, event.text)
        self._said.pop(event.utterance_id, None)
        fields: dict[str, Any] = {
            "item_id": self._item(event.utterance_id), "content_index": 0,
            "transcript": event.text,
            "usage": {"type": "duration",
                      "seconds": round(max(event.end_ms - event.start_ms, 0) / 1000, 3)},
        }
        if setup.logprobs and event.words:
            fields["logprobs"] = [
                {"token": word.word, "logprob": round(math.log(max(word.probability, 1e-12)), 4),
                 "bytes": list(word.word.encode())} for word in event.words]
        if event.language:
            fields["language"] = event.language
        out.append(self._event("conversation.item.input_audio_transcription.completed",
                               **fields))
        return out

    def _error(self, event: Error) -> str:
        client_event_id = None
        refused: Any = None
        if event.refused is not None:
            try:
                refused = json.loads(event.refused)
            except ValueError:
                refused = None
            if isinstance(refused, dict) and isinstance(refused.get("event_id"), str):
                client_event_id = refused["event_id"]
        param = event.param
        if param == "language" and event.code == "unsupported_language":
            # The engine refused an update's language: named where the update put it.
            legacy = isinstance(refused, dict) and str(refused.get("type", "")).startswith(
                "transcription_session")
            param = ("session.input_audio_transcription.language" if legacy
                     else "session.audio.input.transcription.language")
        error = {"type": "invalid_request_error" if event.code in _CLIENT_CODES
                 else "server_error",
                 "code": event.code, "message": event.message, "param": param,
                 "event_id": client_event_id}
        if event.utterance_id is not None:
            return self._event("conversation.item.input_audio_transcription.failed",
                               item_id=self._item(event.utterance_id), content_index=0,
                               error=error)
        return self._event("error", error=error)

    def _event(self, kind: str, **fields: Any) -> str:
        self._events += 1
        return dumps({"type": kind, "event_id": f"event_{self._session_id[5:]}_{self._events}",
                      **fields})

    def _item(self, utterance_id: int) -> str:
        return f"{self._item_prefix}_{utterance_id}"

    def _session(self, setup: _Setup) -> dict[str, Any]:
        options = setup.options
        transcription = {"model": setup.model or self._backend or "sttd",
                         "language": options.language, "prompt": setup.prompt}
        turns = None
        if setup.server_vad:
            turns = {"type": "server_vad", "threshold": setup.threshold,
                     "prefix_padding_ms": options.preroll_ms,
                     "silence_duration_ms": options.vad_silence_ms}
        include = [_LOGPROBS] if setup.logprobs else []
        if setup.legacy:
            return {"id": self._session_id, "object": "realtime.transcription_session",
                    "input_audio_format": _format_name(setup.audio_format),
                    "input_audio_transcription": transcription,
                    "turn_detection": turns, "input_audio_noise_reduction": None,
                    "include": include, "modalities": ["text"]}
        return {"type": "transcription", "id": self._session_id,
                "object": "realtime.transcription_session", "expires_at": 0,
                "audio": {"input": {"format": _ga_echo(setup.audio_format),
                                    "transcription": transcription, "noise_reduction": None,
                                    "turn_detection": turns}},
                "include": include}


# -- checking what a client sent ---------------------------------------------------------------


def _invalid(param: str, message: str) -> InvalidMessage:
    return InvalidMessage(message, param=param, code="invalid_value")


def _load(text: str) -> dict[str, Any]:
    """A client event as a JSON object. Its size is bounded by STT_MAX_MESSAGE_BYTES already
    (audio comes as base64 text here, so the 4 KiB bound of other protocols' text messages
    cannot apply)."""
    try:
        event = json.loads(text)
    except (ValueError, RecursionError):
        raise InvalidMessage(f"client events must be JSON objects, got {text[:40]!r}",
                             code="invalid_value") from None
    if not isinstance(event, dict):
        raise InvalidMessage(f"client events must be JSON objects, got {type(event).__name__}",
                             code="invalid_value")
    return event


def _only(given: Mapping[str, Any], known: set[str], where: str) -> None:
    """Refuse any field of `given` sttd does not know, naming the first."""
    for name in given:
        if name not in known:
            param = f"{where}.{name}" if where else name
            raise InvalidMessage(f"unknown parameter {param!r}: sttd does not know it, and "
                                 "ignoring it could change the results",
                                 param=param, code="unknown_parameter")


def _object(given: Mapping[str, Any], name: str, where: str) -> dict[str, Any] | None:
    value = given.get(name)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _invalid(f"{where}.{name}", f"{where}.{name} must be an object")
    return value


def _number(value: Any, param: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise _invalid(param, f"{param} must be a number in [{lo:g}, {hi:g}], got {value!r}")
    return float(value)


def _decode_audio(value: Any, audio_format: AudioFormat) -> bytes:
    if not isinstance(value, str):
        raise InvalidMessage(f"input_audio_buffer.append needs 'audio': base64 "
                             f"{_format_name(audio_format)}", param="audio",
                             code="invalid_value")
    try:
        audio = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidMessage("input_audio_buffer.append's audio is not valid base64",
                             param="audio", code="invalid_value") from None
    if len(audio) % audio_format.frame_bytes:
        raise InvalidMessage(f"input_audio_buffer.append's audio must be whole 16-bit samples, "
                             f"got {len(audio)} bytes", param="audio", code="invalid_value")
    return audio


def _ga_format(value: Any, where: str) -> str:
    """The beta name of a GA ``audio.input.format`` object."""
    if not isinstance(value, dict):
        raise _invalid(where, f"{where} must be an object such as "
                              f"{{\"type\": \"audio/pcm\", \"rate\": {RATE_HZ}}}")
    _only(value, {"type", "rate"}, where)
    kind = value.get("type", "audio/pcm")
    if not isinstance(kind, str) or kind not in _GA_TYPES:
        raise _invalid(f"{where}.type", f"{where}.type must be audio/pcm (16-bit at {RATE_HZ} "
                                        f"Hz), audio/pcmu or audio/pcma (G.711 at 8 kHz), got "
                                        f"{quoted(str(kind))}")
    name = _GA_TYPES[kind]
    rate = _FORMATS[name].sample_rate_hz
    if value.get("rate", rate) != rate:
        raise _invalid(f"{where}.rate", f"{kind} is at {rate} Hz, got {value.get('rate')!r}")
    return name


def _format_name(audio_format: AudioFormat) -> str:
    return next(name for name, known in _FORMATS.items() if known == audio_format)


def _ga_echo(audio_format: AudioFormat) -> dict[str, Any]:
    name = _format_name(audio_format)
    kind = next(kind for kind, beta in _GA_TYPES.items() if beta == name)
    return {"type": kind, "rate": RATE_HZ} if name == "pcm16" else {"type": kind}


def _check_noise_reduction(value: Any, where: str) -> None:
    if value is not None:
        raise _invalid(where, f"sttd does no noise reduction: {where} must be null")


def _transcription(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _invalid(where, f"{where} must be an object")
    _only(value, {"model", "language", "prompt"}, where)
    changes: dict[str, Any] = {}
    if "model" in value:
        if not isinstance(value["model"], str):
            raise _invalid(f"{where}.model", f"{where}.model must be a string")
        changes["model"] = value["model"]  # one engine serves every session: a label here
    if "language" in value:
        language = value["language"]
        if language is not None and not isinstance(language, str):
            raise _invalid(f"{where}.language", f"{where}.language must be a string or null")
        try:
            changes["language"] = parse_language(language or "", param=f"{where}.language")
        except InvalidParam as exc:
            raise _invalid(exc.param, str(exc)) from None
    if "prompt" in value:
        prompt = value["prompt"]
        if prompt is not None and not isinstance(prompt, str):
            raise _invalid(f"{where}.prompt", f"{where}.prompt must be a string")
        try:
            changes["hotwords"] = prompt_phrases(prompt or "")
        except ClientError as exc:
            raise _invalid(f"{where}.prompt", str(exc)) from None
        changes["prompt"] = prompt or ""
    return changes


def _include(value: Any) -> bool:
    if value is None:
        return False
    if not isinstance(value, list) or any(item != _LOGPROBS for item in value):
        raise _invalid("session.include", f"session.include may hold {_LOGPROBS!r} only, got "
                                          f"{value!r}")
    return bool(value)


_OPTION_FIELDS: Final = frozenset({"language", "hotwords", "preroll_ms", "vad_silence_ms"})


def _apply(base: _Setup, changes: Mapping[str, Any]) -> _Setup:
    """`base` with `changes`; the core's options follow the setup (turn detection off: only
    commits end utterances; a threshold asked for goes to the Silero VAD; word timings only
    for the logprobs, the one place this protocol shows words)."""
    updates = {k: v for k, v in changes.items() if k in _OPTION_FIELDS}
    updates["endpointing"] = changes.get("server_vad", base.server_vad)
    updates["word_timings"] = changes.get("logprobs", base.logprobs)
    if "threshold" in changes:
        updates["vad_threshold"] = changes["threshold"]
    options = attrs.evolve(base.options, **updates)
    return attrs.evolve(base, options=options,
                        **{k: v for k, v in changes.items() if k not in _OPTION_FIELDS})
