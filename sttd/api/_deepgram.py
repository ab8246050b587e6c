"""Deepgram's live transcription protocol on ``/v1/listen``, over the same session core, sans I/O.

Theory of operation. `DeepgramCodec` is one connection's protocol (see `Codec`):

* `accept` turns Deepgram's query (``encoding=linear16``, ``mulaw`` or ``alaw``,
  ``sample_rate``, ``channels``, ``interim_results``, ``endpointing``, ``utterance_end_ms``,
  ``language``, ``keyterm``, ``vad_events``, ...)
  into a `SessionRequest`: the client's audio format (the session converts it to 16 kHz mono
  with the one audio converter) and the session's options. It keeps what the protocol itself
  needs later: the request id, whether endpointing is on, the audio format for the summary.
  What sttd cannot do and a client relies on is refused rather than ignored:
  ``multichannel=true``, and ``redact`` (any value but ``false``), whose transcripts would
  otherwise come back unredacted.
* `decode`: binary audio (counted and hashed for the closing summary); ``KeepAlive``,
  ``Finalize`` and ``CloseStream`` are `KeepAlive`, `Commit` (the session goes on) and `End`,
  and so is an empty binary frame (Deepgram's older, deprecated ``CloseStream``).
  Any other text message is refused (`InvalidMessage`).
* `encode`: a `Partial` is a ``Results`` with ``is_final: false``; a `Final` is a ``Results``
  with ``is_final: true``, ``speech_final`` when the VAD heard the speech end (and endpointing
  is on) and ``from_finalize`` when a ``Finalize`` ended it; `UtteranceEnd` is
  ``UtteranceEnd``; an `Error` is an ``Error`` (variant: our code), or, for a refused client
  message, Deepgram's own reply (``Error`` with variant ``SchemaError``, or
  ``ConfigureFailure``); warnings have no Deepgram form and are not sent. A `Close` with 1000
  (the stream ended) is preceded by the ``Metadata`` summary.
* ``vad_events=true`` turns the session's turn events on for their `SpeechStarted`, sent as
  Deepgram's ``SpeechStarted`` (ahead of the utterance's results). Nothing else changes: the
  other turn events have no Deepgram form, and the empty finals a session reporting turns
  sends for every utterance it closed (a cough, noise) are dropped unless the client forced
  them, as they are without turn events.

Times stay those of the client's stream, in seconds, whatever its sample rate.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import string
import uuid
from typing import Any, Final

import attrs
from werkzeug.datastructures import MultiDict

from sttd.api._events import (
    TURN_EVENTS,
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
    SessionEvent,
    SessionOptions,
    SessionRequest,
    SpeechStarted,
    UtteranceEnd,
    Warning,
    Word,
)
from sttd.api._params import (
    MAX_TEXT_MESSAGE_BYTES,
    WIRE_DIGITS,
    default_partial_ms,
    dumps,
    load_client_json,
    parse_hotwords,
    parse_language,
    query_bool,
    query_int,
    quoted,
)
from sttd.audio import MAX_SAMPLE_RATE_HZ, MIN_SAMPLE_RATE_HZ, AudioFormat, SampleFormat
from sttd.errors import InvalidMessage, InvalidParam, Unauthorized
from sttd.settings import Settings

__all__ = ["DeepgramCodec"]

log = logging.getLogger(__name__)

_MAX_CHANNELS: Final = 32
# Deepgram's raw encodings sttd takes: PCM16, and G.711 (Twilio's and most telephony's media).
_ENCODINGS: Final[dict[str, SampleFormat]] = {"linear16": "pcm16", "mulaw": "mulaw",
                                              "alaw": "alaw"}
# Shorter VAD silences split sentences at the gaps between words (on references/, 10 ms split
# one of the four, 100 ms none): Deepgram's default (10 ms) and the small values its clients
# send are raised to this.
_MIN_ENDPOINTING_MS: Final = 100
_MAX_WAIT_MS: Final = 60_000  # endpointing and utterance_end_ms
_MAX_ECHOED_CHARS: Final = 256  # of a refused client message, in SchemaError's `message`
_CLIENT_MESSAGES: Final = ("KeepAlive", "Finalize", "CloseStream")
_WORD_EDGES: Final = string.punctuation + "¡¿“”‘’«»…"
# Deepgram's clients send their key as ``Token <key>`` (sttd takes ``Bearer <key>`` too).
_UNAUTHORIZED: Final = ("this API needs 'Authorization: Token <key>' (or ?token=<key> on the "
                        "WebSocket URL) with a valid key")


@attrs.define
class DeepgramCodec:
    """Deepgram's live protocol for one connection (see the module docstring)."""

    # From the query, once `accept` has taken it.
    _request_id: str = attrs.field(init=False, default="")
    _audio_format: AudioFormat = attrs.field(init=False, factory=AudioFormat)
    _endpointing: bool = attrs.field(init=False, default=True)
    # language=multi: finals name the language detected (Deepgram's `languages`).
    _multi: bool = attrs.field(init=False, default=False)
    # The client ended the stream: the session's "end" finals are ones it forced.
    _client_ended: bool = attrs.field(init=False, default=False)
    # From the session's `Ready`.
    _backend: str = attrs.field(init=False, default="")
    _created: str = attrs.field(init=False, default="")
    # Everything the client sent as audio, for the closing Metadata.
    _audio_bytes: int = attrs.field(init=False, default=0)
    _sha256: Any = attrs.field(init=False, factory=hashlib.sha256)

    def accept(self, query: MultiDict[str, str], settings: Settings) -> SessionRequest:
        """Validate Deepgram's live query; raises `InvalidParam` naming the first bad one.

        Parameters sttd has no use for (``model``, ``smart_format``, ``punctuate``, ``tag``,
        ...) are accepted and ignored; ``redact`` is refused unless ``false``, since ignoring
        it would send back the very text the client meant to keep out. The session's call_id
        (in logs) is a fresh UUID, which is also the ``request_id`` the client sees.
        """
        encoding = query.get("encoding")
        sample_format = _ENCODINGS.get((encoding or "").strip().lower())
        if encoding is None or sample_format is None:
            got = "nothing" if encoding is None else quoted(encoding)
            raise InvalidParam(
                "encoding", f"encoding must be linear16 (raw PCM16 little-endian), mulaw or alaw "
                            f"(raw G.711, as telephony sends it); sttd decodes no containers or "
                            f"other codecs, got {got}")
        if "sample_rate" not in query:
            raise InvalidParam("sample_rate",
                               f"sample_rate is required with encoding={encoding.strip().lower()}")
        sample_rate = query_int(query, "sample_rate", 0, lo=MIN_SAMPLE_RATE_HZ,
                                hi=MAX_SAMPLE_RATE_HZ)
        channels = query_int(query, "channels", 1, lo=1, hi=_MAX_CHANNELS)
        if query_bool(query, "multichannel", default=False):
            raise InvalidParam(
                "multichannel", "multichannel must be false: sttd transcribes the channels "
                                "mixed down to one, got true")
        # Repeatable (redact=pci&redact=ssn); `false` is the one value sttd honours.
        redact = [value for value in query.getlist("redact") if value.strip().lower() != "false"]
        if redact:
            raise InvalidParam(
                "redact", f"redact must be false: sttd does not redact transcripts (PCI, "
                          f"numbers, SSN or other entities), got "
                          f"{', '.join(quoted(value) for value in redact)}")
        vad_events = query_bool(query, "vad_events", default=False)
        language = query.get("language", "en").strip()
        endpointing, silence_ms = _endpointing(query.get("endpointing"))
        utterance_end_ms = (query_int(query, "utterance_end_ms", 0, lo=1, hi=_MAX_WAIT_MS)
                            if "utterance_end_ms" in query else None)
        # Deepgram's keywords carry an optional boost ("word:2"); sttd's hotwords have none.
        keywords = [term.rpartition(":")[0] if _is_boosted(term) else term
                    for term in query.getlist("keywords")]
        terms = [term.replace(",", " ") for term in query.getlist("keyterm") + keywords]
        request = SessionRequest(
            call_id=str(uuid.uuid4()),
            audio_format=AudioFormat(sample_rate, channels, sample_format),
            options=SessionOptions(
                partial_ms=default_partial_ms(settings),
                partials=query_bool(query, "interim_results", default=False),
                language=None if language == "multi" else parse_language(language),
                hotwords=parse_hotwords(",".join(terms), param="keyterm"),
                vad_silence_ms=silence_ms,
                utterance_end_ms=utterance_end_ms,
                turn_events=vad_events,
            ),
        )
        self._request_id = request.call_id
        self._audio_format = request.audio_format
        self._endpointing = endpointing
        self._multi = language == "multi"
        return request

    def decode(self, message: bytes | str, received_at: float) -> ClientCommand:
        if message == b"":  # Deepgram's deprecated way to send CloseStream
            return self._end(received_at)
        if isinstance(message, bytes):
            self._audio_bytes += len(message)
            self._sha256.update(message)
            return Audio(message)
        kind = load_client_json(message).get("type")
        if kind == "KeepAlive":
            return KeepAlive()
        if kind == "Finalize":
            return Commit(received_at)
        if kind == "CloseStream":
            return self._end(received_at)
        raise InvalidMessage(f"message type must be one of {', '.join(_CLIENT_MESSAGES)}, "
                             f"got {quoted(str(kind))}")

    def _end(self, received_at: float) -> End:
        self._client_ended = True
        return End(received_at)

    def withdraw(self, command: Configure) -> None:
        return None  # Deepgram's messages never reconfigure a session

    def encode(self, event: SessionEvent) -> list[str]:
        if isinstance(event, Ready):
            self._backend = event.backend
            now = datetime.datetime.now(datetime.timezone.utc)
            self._created = now.isoformat(timespec="milliseconds").replace("+00:00", "Z")
            return []
        if isinstance(event, FinalEvent) and not (event.text or self._forced(event)):
            return []  # sent only because the session reports turns (vad_events)
        if isinstance(event, (Partial, FinalEvent)):
            return [dumps(self._results(event))]
        if isinstance(event, UtteranceEnd):
            return [dumps({"type": "UtteranceEnd", "channel": [0, 1],
                           "last_word_end": event.last_word_end_ms / 1000})]
        if isinstance(event, Error):
            if event.refused is not None:
                return [dumps(self._refusal(event.refused))]
            # Admission's wording names the native routes' ``Bearer <key>``.
            description = _UNAUTHORIZED if event.code == Unauthorized.code else event.message
            return [dumps({"type": "Error", "variant": event.code,
                           "description": description})]
        if isinstance(event, Warning):
            log.debug("deepgram.dropped type=warning code=%s", event.code)  # no Deepgram form
            return []
        if isinstance(event, SpeechStarted):
            return [dumps({"type": "SpeechStarted", "channel": [0, 1],
                           "timestamp": event.start_ms / 1000})]
        if isinstance(event, TURN_EVENTS):
            return []  # no Deepgram form: stops and commits show in the results
        return self._before_close(event)

    def _forced(self, final: FinalEvent) -> bool:
        """Whether the client asked for `final` (Finalize, CloseStream), so it goes out even
        empty: the core's rule, which reporting turns (vad_events) would otherwise widen.

        An "end" final of a session the server stopped (a limit, a drain) is not forced,
        unless the client's CloseStream crossed the stop.
        """
        return final.cause == "commit" or (final.cause == "end" and self._client_ended)

    def _before_close(self, close: Close) -> list[str]:
        """The summary, when the stream ended (1000) after the session started."""
        if close.code != 1000 or not self._backend:
            return []
        fmt = self._audio_format
        duration_s = self._audio_bytes / (fmt.frame_bytes * fmt.sample_rate_hz)
        return [dumps({
            "type": "Metadata",
            "transaction_key": "deprecated",
            "request_id": self._request_id,
            "sha256": self._sha256.hexdigest(),
            "created": self._created,
            "duration": round(duration_s, 6),
            "channels": fmt.channels,
        })]

    def _refusal(self, text: str) -> dict[str, Any]:
        """Deepgram's reply to a client message it does not take."""
        try:
            kind = load_client_json(text).get("type")
        except InvalidMessage:
            kind = None
            description = (f"text messages must be JSON objects of at most "
                           f"{MAX_TEXT_MESSAGE_BYTES} bytes")
        else:
            description = (f"message type must be one of {', '.join(_CLIENT_MESSAGES)}, "
                           f"got {quoted(str(kind))}")
        if kind == "Configure":
            return {"type": "ConfigureFailure", "request_id": self._request_id,
                    "code": "CONFIGURE_KEYTERMS_NOT_SUPPORTED",
                    "description": "sttd does not reconfigure a stream: open a new one with "
                                   "the keyterm and options you want"}
        return {"type": "Error", "variant": "SchemaError", "description": description,
                "message": text[:_MAX_ECHOED_CHARS]}

    def _results(self, event: Partial | FinalEvent) -> dict[str, Any]:
        final = isinstance(event, FinalEvent)
        words = [_word(word) for word in event.words] if isinstance(event, FinalEvent) else []
        if isinstance(event, FinalEvent) and event.confidence is not None:
            confidence = round(event.confidence, WIRE_DIGITS)
        else:
            confidence = (sum(word["confidence"] for word in words) / len(words)
                          if words else 0.0)
        cause = event.cause if isinstance(event, FinalEvent) else None
        start_s = event.start_ms / 1000
        alternative: dict[str, Any] = {"transcript": event.text, "confidence": confidence,
                                       "words": words}
        if self._multi and isinstance(event, FinalEvent) and event.language and event.text:
            alternative["languages"] = [event.language]  # only with language=multi, as Deepgram
        return {
            "type": "Results",
            "channel_index": [0, 1],
            "duration": round(event.end_ms / 1000 - start_s, 3),
            "start": start_s,
            "is_final": final,
            "speech_final": final and self._endpointing and cause == "speech_end",
            "from_finalize": final and cause == "commit",
            "channel": {"alternatives": [alternative]},
            "metadata": {
                "request_id": self._request_id,
                "model_info": {"name": self._backend, "version": "sttd", "arch": self._backend},
                "model_uuid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"sttd:{self._backend}")),
            },
        }


def _endpointing(raw: str | None) -> tuple[bool, int | None]:
    """Whether finals mark the end of speech, and the VAD silence (None: the server's)."""
    if raw is None or raw.strip().lower() == "true":
        return True, None
    if raw.strip().lower() == "false":
        # Utterances still end at the server's pauses (is_final), never with speech_final.
        return False, None
    try:
        value = int(raw)
    except ValueError:
        raise InvalidParam("endpointing", f"endpointing must be false or a number of "
                                          f"milliseconds, got {quoted(raw)}") from None
    if not 0 <= value <= _MAX_WAIT_MS:
        raise InvalidParam("endpointing", f"endpointing must be in 0..{_MAX_WAIT_MS} ms, "
                                          f"got {value}")
    return True, max(value, _MIN_ENDPOINTING_MS)


def _is_boosted(term: str) -> bool:
    head, sep, boost = term.rpartition(":")
    try:
        float(boost)
    except ValueError:
        return False
    return bool(sep and head)


def _word(word: Word) -> dict[str, Any]:
    """One of our final's words as Deepgram's: plain lower-case `word`, `punctuated_word`."""
    punctuated = word.word.strip()
    return {
        "word": punctuated.strip(_WORD_EDGES).lower() or punctuated.lower(),
        "start": word.start_ms / 1000,
        "end": word.end_ms / 1000,
        "confidence": round(word.probability, WIRE_DIGITS),
        "punctuated_word": punctuated,
    }
