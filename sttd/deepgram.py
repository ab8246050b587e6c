"""Deepgram's live transcription protocol on /v1/listen, over the same session core.

Theory of operation. The route runs an ordinary `Session` with two adapters around it:

* `params_from_query` turns Deepgram's query (``encoding=linear16``, ``sample_rate``,
  ``channels``, ``interim_results``, ``endpointing``, ``utterance_end_ms``, ``language``,
  ``keyterm``, ...) into `SessionParams`. The options the transport needs back (the client's
  audio format, whether endpointing is on) travel in ``SessionParams.ready_extra``, so they
  reach the transport in the session's ready message, which is the first thing it sends.
* `DeepgramTransport` wraps the connection's transport and translates each message with a
  `DeepgramTranslator` (sans I/O):

  - client to session: binary audio at the client's rate and channel count becomes 16 kHz mono
    PCM16 (downmixed, resampled with soxr); ``KeepAlive``, ``Finalize`` and ``CloseStream``
    become ``keepalive``, ``commit`` (the session goes on) and ``end`` (after the resampler's
    held-back tail). A text message that is none of those is handed on as an empty text frame,
    which the session refuses with ``invalid_message``; the translator answers that refusal
    with Deepgram's own reply (``Error`` with variant ``SchemaError``, or ``ConfigureFailure``).
  - session to client: ``ready`` is swallowed (it configures the translator); a ``partial`` is
    a ``Results`` with ``is_final: false``; a ``final`` is a ``Results`` with ``is_final: true``,
    ``speech_final`` when the VAD heard the speech end (and endpointing is on) and
    ``from_finalize`` when a ``Finalize`` ended it; ``utterance_end`` is ``UtteranceEnd``; an
    ``error`` is an ``Error`` (variant: our code); warnings have no Deepgram form and are
    dropped. A close with 1000 (the stream ended) is preceded by the ``Metadata`` summary.

Times stay those of the client's stream, in seconds, whatever its sample rate.
"""

from __future__ import annotations

import collections
import datetime
import hashlib
import json
import logging
import string
import uuid
from typing import Any, Protocol

import attrs
import numpy as np
import numpy.typing as npt
import soxr  # type: ignore[import-untyped]  # soxr ships no py.typed marker; `_Resampler` types what we use
from werkzeug.datastructures import MultiDict

from sttd.audio import SAMPLE_RATE_HZ, float32_to_pcm16, pcm16_to_float32
from sttd.errors import InvalidParam
from sttd.nursery import Transport
from sttd.protocol import (
    MAX_TEXT_MESSAGE_BYTES,
    SessionParams,
    dumps,
    parse_hotwords,
    parse_language,
    quoted,
)
from sttd.settings import Settings

__all__ = ["DeepgramTransport", "DeepgramTranslator", "params_from_query"]

log = logging.getLogger(__name__)

_SAMPLE_RATE_RANGE_HZ = (4000, 384_000)  # as for uploaded WAV files
_MAX_CHANNELS = 32
# Shorter VAD silences split sentences at the gaps between words (on references/, 10 ms split
# one of the four, 100 ms none): Deepgram's default (10 ms) and the small values its clients
# send are raised to this.
_MIN_ENDPOINTING_MS = 100
_MAX_WAIT_MS = 60_000  # endpointing and utterance_end_ms
_MIN_PARTIAL_MS = 100
_MAX_ECHOED_CHARS = 256  # of a refused client message, in SchemaError's `message`
# What the ready message carries for the transport (see `SessionParams.ready_extra`).
_READY_CHANNELS = "channels"
_READY_ENDPOINTING = "endpointing"
_CLIENT_MESSAGES = ("KeepAlive", "Finalize", "CloseStream")
_WORD_EDGES = string.punctuation + "¡¿“”‘’«»…"


def params_from_query(query: MultiDict[str, str], *, settings: Settings) -> SessionParams:
    """Validate Deepgram's live query; raises `InvalidParam` naming the first bad parameter.

    Parameters sttd has no use for (``model``, ``smart_format``, ``punctuate``, ``tag``, ...)
    are accepted and ignored. The session's call_id (in logs) is a fresh UUID, which is also the
    ``request_id`` the client sees.
    """
    encoding = query.get("encoding")
    if encoding is None or encoding.strip().lower() != "linear16":
        got = "nothing" if encoding is None else quoted(encoding)
        raise InvalidParam(
            "encoding", f"encoding must be linear16 (raw PCM16 little-endian; sttd decodes no "
                        f"containers or codecs), got {got}")
    if "sample_rate" not in query:
        raise InvalidParam("sample_rate", "sample_rate is required with encoding=linear16")
    sample_rate = _int(query, "sample_rate", 0, *_SAMPLE_RATE_RANGE_HZ)
    channels = _int(query, "channels", 1, 1, _MAX_CHANNELS)
    if _bool(query, "multichannel", default=False):
        raise InvalidParam(
            "multichannel", "multichannel must be false: sttd transcribes the channels mixed "
                            "down to one, got true")
    language = query.get("language", "en").strip()
    endpointing, silence_ms = _endpointing(query.get("endpointing"))
    utterance_end_ms = (_int(query, "utterance_end_ms", 0, 1, _MAX_WAIT_MS)
                        if "utterance_end_ms" in query else None)
    # Deepgram's keywords carry an optional boost ("word:2"); sttd's hotwords have none.
    keywords = [term.rpartition(":")[0] if _is_boosted(term) else term
                for term in query.getlist("keywords")]
    terms = [term.replace(",", " ") for term in query.getlist("keyterm") + keywords]
    return SessionParams(
        call_id=str(uuid.uuid4()),
        sample_rate_hz=sample_rate,
        channels=channels,
        partial_ms=max(round(settings.streaming_chunk_size_sec * 1000), _MIN_PARTIAL_MS),
        language=None if language == "multi" else parse_language(language),
        hotwords=parse_hotwords(",".join(terms), param="keyterm"),
        vad_silence_ms=silence_ms,
        partials=_bool(query, "interim_results", default=False),
        utterance_end_ms=utterance_end_ms,
        final_causes=True,
        ready_extra=((_READY_CHANNELS, channels), (_READY_ENDPOINTING, endpointing)),
    )


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


def _int(query: MultiDict[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidParam(name, f"{name} must be an integer, got {quoted(raw)}") from None
    if not lo <= value <= hi:
        raise InvalidParam(name, f"{name} must be in {lo}..{hi}, got {value}")
    return value


def _bool(query: MultiDict[str, str], name: str, *, default: bool) -> bool:
    raw = query.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value not in ("true", "false"):
        raise InvalidParam(name, f"{name} must be true or false, got {quoted(raw)}")
    return value == "true"


# -- audio ---------------------------------------------------------------------------------------


class _Resampler(Protocol):
    """The part of `soxr.ResampleStream` we use."""

    def resample_chunk(
        self, x: npt.NDArray[np.float32], last: bool = False) -> npt.NDArray[np.float32]: ...


@attrs.define
class _AudioConverter:
    """Interleaved PCM16 at some rate and channel count to 16 kHz mono PCM16, chunk by chunk.

    A partial frame is carried to the next chunk; the resampler holds its filter's delay back
    until `convert` is called with ``last=True``.
    """

    channels: int
    _resampler: _Resampler | None
    _carry: bytes = attrs.field(init=False, default=b"")

    @classmethod
    def for_format(cls, sample_rate_hz: int, channels: int) -> _AudioConverter:
        resampler = None
        if sample_rate_hz != SAMPLE_RATE_HZ:
            resampler = soxr.ResampleStream(sample_rate_hz, SAMPLE_RATE_HZ, 1, dtype="float32",
                                            quality="HQ")
        return cls(channels, resampler)

    def convert(self, data: bytes, *, last: bool = False) -> bytes:
        buf = self._carry + data
        usable = len(buf) - len(buf) % (2 * self.channels)
        self._carry = buf[usable:]
        samples = pcm16_to_float32(np.frombuffer(buf, dtype="<i2", count=usable // 2)
                                   .astype(np.int16))
        if self.channels > 1:
            samples = samples.reshape(-1, self.channels).mean(axis=1, dtype=np.float32)
        if self._resampler is not None and (samples.size or last):
            samples = np.asarray(self._resampler.resample_chunk(samples, last=last),
                                 dtype=np.float32)
        return float32_to_pcm16(samples).tobytes()


# -- messages ------------------------------------------------------------------------------------


@attrs.define
class DeepgramTranslator:
    """Deepgram's live messages to the session's and back, for one connection, sans I/O.

    `from_client` maps what the client sent to what the session should receive (one item or
    more, in order); `to_client` maps what the session sends to what the client gets (nothing
    or more); `before_close` gives what precedes the session's close frame.
    """

    # Set from the session's ready message.
    _request_id: str = attrs.field(init=False, default="")
    _backend: str = attrs.field(init=False, default="sttd")
    _created: str = attrs.field(init=False, default="")
    _endpointing: bool = attrs.field(init=False, default=True)
    _channels: int = attrs.field(init=False, default=1)
    _sample_rate_hz: int = attrs.field(init=False, default=SAMPLE_RATE_HZ)
    _converter: _AudioConverter | None = attrs.field(init=False, default=None)
    # Everything the client sent as audio, for the closing Metadata.
    _audio_bytes: int = attrs.field(init=False, default=0)
    _sha256: Any = attrs.field(init=False, factory=hashlib.sha256)
    # Deepgram's replies to client messages handed on for the session to refuse, oldest first:
    # the session answers each with one ``invalid_message`` error, in order.
    _refusals: collections.deque[dict[str, Any]] = attrs.field(
        init=False, factory=collections.deque)

    @property
    def started(self) -> bool:
        """Whether the session's ready message came (the session runs)."""
        return bool(self._request_id)

    # client -> session

    def from_client(self, data: bytes | str | None) -> list[bytes | str | None]:
        """What the session should receive for one client message (at least one item)."""
        if data is None or isinstance(data, bytes):
            return [self._audio(data or b"")]
        kind, message = _parse_client_message(data)
        if kind == "KeepAlive":
            return [dumps({"type": "keepalive"})]
        if kind == "Finalize":
            return [dumps({"type": "commit"})]
        if kind == "CloseStream":
            items: list[bytes | str | None] = []
            if self._converter is not None:
                tail = self._converter.convert(b"", last=True)
                if tail:
                    items.append(tail)
            items.append(dumps({"type": "end"}))
            return items
        self._refusals.append(self._refusal(kind, message, data))
        return [""]  # not JSON: the session refuses it with invalid_message

    def _audio(self, data: bytes) -> bytes:
        self._audio_bytes += len(data)
        self._sha256.update(data)
        if self._converter is None:
            return data
        return self._converter.convert(data)

    def _refusal(self, kind: str | None, message: dict[str, Any] | None,
                 text: str) -> dict[str, Any]:
        if kind == "Configure":
            return {"type": "ConfigureFailure", "request_id": self._request_id,
                    "code": "CONFIGURE_KEYTERMS_NOT_SUPPORTED",
                    "description": "sttd does not reconfigure a stream: open a new one with "
                                   "the keyterm and options you want"}
        if message is None:
            description = (f"text messages must be JSON objects of at most "
                           f"{MAX_TEXT_MESSAGE_BYTES} bytes")
        else:
            description = (f"message type must be one of {', '.join(_CLIENT_MESSAGES)}, "
                           f"got {quoted(str(kind))}")
        return {"type": "Error", "variant": "SchemaError", "description": description,
                "message": text[:_MAX_ECHOED_CHARS]}

    # session -> client

    def to_client(self, text: str) -> list[str]:
        """What the client gets for one message of the session's."""
        message: dict[str, Any] = json.loads(text)
        kind = message.get("type")
        if kind == "ready":
            self._start(message)
            return []
        if kind in ("partial", "final"):
            return [dumps(self._results(message))]
        if kind == "utterance_end":
            return [dumps({"type": "UtteranceEnd", "channel": [0, 1],
                           "last_word_end": message["last_word_end_ms"] / 1000})]
        if kind == "error":
            if message["code"] == "invalid_message" and self._refusals:
                return [dumps(self._refusals.popleft())]
            return [dumps({"type": "Error", "variant": message["code"],
                           "description": message["message"]})]
        log.debug("deepgram.dropped type=%s", kind)  # warnings: Deepgram has no such message
        return []

    def before_close(self, code: int) -> list[str]:
        """Sent before the close frame: the summary, when the stream ended (1000)."""
        if code != 1000 or not self.started:
            return []
        duration_s = self._audio_bytes / (2 * self._channels * self._sample_rate_hz)
        return [dumps({
            "type": "Metadata",
            "transaction_key": "deprecated",
            "request_id": self._request_id,
            "sha256": self._sha256.hexdigest(),
            "created": self._created,
            "duration": round(duration_s, 6),
            "channels": self._channels,
        })]

    def _start(self, ready: dict[str, Any]) -> None:
        self._request_id = str(ready["call_id"])
        self._backend = str(ready["backend"])
        self._sample_rate_hz = int(ready["sample_rate"])
        self._channels = int(ready.get(_READY_CHANNELS, 1))
        self._endpointing = bool(ready.get(_READY_ENDPOINTING, True))
        now = datetime.datetime.now(datetime.timezone.utc)
        self._created = now.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        if self._sample_rate_hz != SAMPLE_RATE_HZ or self._channels != 1:
            self._converter = _AudioConverter.for_format(self._sample_rate_hz, self._channels)

    def _results(self, message: dict[str, Any]) -> dict[str, Any]:
        final = message["type"] == "final"
        cause = message.get("cause", "")
        words = [_word(word) for word in message.get("words", ())]
        confidence = message.get("confidence")
        if confidence is None:
            confidence = (sum(word["confidence"] for word in words) / len(words)
                          if words else 0.0)
        start_s = message["start_ms"] / 1000
        return {
            "type": "Results",
            "channel_index": [0, 1],
            "duration": round(message["end_ms"] / 1000 - start_s, 3),
            "start": start_s,
            "is_final": final,
            "speech_final": final and self._endpointing and cause == "speech_end",
            "from_finalize": final and cause == "commit",
            "channel": {"alternatives": [
                {"transcript": message["text"], "confidence": confidence, "words": words}]},
            "metadata": {
                "request_id": self._request_id,
                "model_info": {"name": self._backend, "version": "sttd", "arch": self._backend},
                "model_uuid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"sttd:{self._backend}")),
            },
        }


def _parse_client_message(text: str) -> tuple[str | None, dict[str, Any] | None]:
    """A client text message's type and body; (None, None) when it is not a JSON object."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_TEXT_MESSAGE_BYTES:
        return None, None
    try:
        message = json.loads(text)
    except (ValueError, RecursionError):
        return None, None
    if not isinstance(message, dict):
        return None, None
    kind = message.get("type")
    return (kind if isinstance(kind, str) else str(kind)), message


def _word(word: dict[str, Any]) -> dict[str, Any]:
    """One of our final's words as Deepgram's: plain lower-case `word`, `punctuated_word`."""
    punctuated = str(word["word"]).strip()
    return {
        "word": punctuated.strip(_WORD_EDGES).lower() or punctuated.lower(),
        "start": word["start_ms"] / 1000,
        "end": word["end_ms"] / 1000,
        "confidence": word["probability"],
        "punctuated_word": punctuated,
    }


class DeepgramTransport:
    """The session's `Transport` over a connection that speaks Deepgram's live protocol."""

    def __init__(self, inner: Transport) -> None:
        self._inner = inner
        self._translator = DeepgramTranslator()
        # Items for the session that one client message produced beyond the first.
        self._held: collections.deque[bytes | str | None] = collections.deque()

    async def receive(self) -> bytes | str | None:
        if not self._held:
            self._held.extend(self._translator.from_client(await self._inner.receive()))
        return self._held.popleft()

    async def send(self, text: str) -> None:
        for message in self._translator.to_client(text):
            await self._inner.send(message)

    async def close(self, code: int, reason: str = "") -> None:
        for message in self._translator.before_close(code):
            await self._inner.send(message)
        await self._inner.close(code, reason)
