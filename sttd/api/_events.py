"""What a session says and hears, as typed values shared by every wire protocol.

A session emits *events* (`Ready`, `Partial`, `Final`, `UtteranceEnd`, `Error`, `Warning`, and
last `Close`); each wire protocol's codec encodes them in its own shape. Codecs decode client
messages into *commands* (`Audio`, `Commit`, `End`, `KeepAlive`). `SessionRequest` is what a
route's query asked of the session: who it is, the audio format the client sends, and the
`SessionOptions` the session core works with. A file's transcript is a `FileTranscript` of
timed `FileSegment`s, whichever API asked for it.

No event carries wire details: times are ms of the client's stream, confidences are plain
floats, and rounding or renaming is the codec's business. The two fields a wire never carries
say so: `Final.ended_at` (the server's clock, for its latency metric) and ``raw`` (the decoded
message, set only when a client library decoded the event from the wire).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final as Constant, Literal, TypeAlias

import attrs

from sttd.audio import AudioFormat

__all__ = [
    "FINAL_CAUSES",
    "TURN_EVENTS",
    "Audio",
    "Clear",
    "Cleared",
    "ClientCommand",
    "Close",
    "Commit",
    "Committed",
    "Configure",
    "Configured",
    "End",
    "Error",
    "FileSegment",
    "FileTranscript",
    "Final",
    "FinalCause",
    "KeepAlive",
    "Partial",
    "Ready",
    "SessionEvent",
    "SessionOptions",
    "SessionRequest",
    "SpeechStarted",
    "SpeechStopped",
    "TurnEvent",
    "UtteranceEnd",
    "Warning",
    "Word",
]

# What ended an utterance: the VAD heard the speech end; it reached STT_MAX_UTTERANCE_S; the
# client's commit; audio skipped or dropped because the session lagged; the end of the session
# (the client's end, a limit, a drain).
FinalCause = Literal["speech_end", "max_length", "commit", "skip", "end"]
FINAL_CAUSES: Constant[tuple[FinalCause, ...]] = (
    "speech_end", "max_length", "commit", "skip", "end")

_Raw = Mapping[str, Any] | None


def _raw_field() -> Any:
    return attrs.field(default=None, eq=False, repr=False, kw_only=True)


# -- what the session asks for ------------------------------------------------------------------


@attrs.frozen
class SessionOptions:
    """What a client may ask of the session core (its protocol's query, validated)."""

    # A partial is decoded every `partial_ms` of new speech, when `partials` is on.
    partial_ms: int = attrs.field(validator=attrs.validators.gt(0))
    partials: bool = True
    # None lets the backend detect the language; otherwise a BCP-47 code.
    language: str | None = None
    hotwords: tuple[str, ...] = ()
    # Silence that ends an utterance; None: the server's STT_VAD_SILENCE_MS.
    vad_silence_ms: int | None = None
    # When set, an `UtteranceEnd` follows a final once this much audio passed after it without
    # new speech (the last word's end is reported).
    utterance_end_ms: int | None = None
    # Audio kept before the VAD's speech start; None: the tracker's default (300 ms).
    preroll_ms: int | None = None
    # The Silero VAD's speech probability threshold for this session; None: the server's.
    vad_threshold: float | None = None
    # Whether the session reports its turns (`TurnEvent`s: speech start and stop, commits,
    # clears, reconfigurations), for protocols that have messages for them.
    turn_events: bool = False
    # Transcribe, or translate into English (a multilingual Whisper model's second task).
    task: Literal["transcribe", "translate"] = "transcribe"
    # Whether utterances end at the VAD's pauses; False: only at a commit (or the longest
    # utterance), the VAD still marking where speech starts.
    endpointing: bool = True
    # Whether finals carry their words' times. Without them a whisper final skips its word
    # alignment, a tenth to a quarter of its cost (benchmarks/word_timings.py).
    word_timings: bool = True


@attrs.frozen
class SessionRequest:
    """A client's validated request for a session."""

    call_id: str
    # What the client's binary frames hold; the session converts it to 16 kHz mono.
    audio_format: AudioFormat
    options: SessionOptions
    # The setting that bounds the time without a client message, and its value (seconds):
    # STT_IDLE_TIMEOUT_S, unless the protocol has no message to keep a quiet session open.
    idle_setting: str = "STT_IDLE_TIMEOUT_S"
    idle_timeout_s: float | None = None  # None: the server's STT_IDLE_TIMEOUT_S
    # A message over STT_MAX_MESSAGE_BYTES ends the session (close 1009): a binary stream
    # cannot go on with a hole in it. An event protocol instead refuses that one event.
    oversized_message_closes: bool = True


# -- server -> client ---------------------------------------------------------------------------


@attrs.frozen
class Ready:
    """The session is open."""

    session_id: str
    call_id: str
    backend: str
    sample_rate_hz: int
    raw: _Raw = _raw_field()


@attrs.frozen
class Word:
    """One word of a final; times in ms of the client's stream."""

    word: str
    start_ms: int
    end_ms: int
    probability: float


@attrs.frozen
class Partial:
    """A tentative transcript of the open utterance: `stable` will not change, `unstable` may."""

    utterance_id: int
    stable: str
    unstable: str
    start_ms: int
    end_ms: int
    raw: _Raw = _raw_field()

    @property
    def text(self) -> str:
        """The whole partial: the stable words, then the rest."""
        return f"{self.stable} {self.unstable}".strip()


@attrs.frozen
class Final:
    """The transcript of record of one utterance."""

    utterance_id: int
    text: str
    start_ms: int
    end_ms: int
    words: tuple[Word, ...] = ()
    confidence: float | None = None
    language: str | None = None
    # How sure the model was of `language`, where it detected it for this utterance.
    language_probability: float | None = None
    # The session's backlog when the final was ready: audio received but not yet processed.
    backlog_ms: int | None = None
    cause: FinalCause = "speech_end"
    # Not sent: the server's trio clock time when the audio (or commit) that ended the
    # utterance arrived, for sttd_final_latency_seconds. None when decoded from the wire.
    ended_at: float | None = attrs.field(default=None, eq=False, kw_only=True)
    raw: _Raw = _raw_field()


@attrs.frozen
class UtteranceEnd:
    """`SessionOptions.utterance_end_ms` passed after the last final without new speech."""

    last_word_end_ms: int
    raw: _Raw = _raw_field()


@attrs.frozen
class Error:
    """Something failed; a `Close` follows unless the error concerns one utterance or message."""

    code: str
    message: str
    # The client's text message this error refuses, when it answers one (some protocols echo it).
    refused: str | None = None
    # The parameter or field at fault, where one is.
    param: str | None = None
    # The utterance whose transcription failed, when the error is about one.
    utterance_id: int | None = None
    raw: _Raw = _raw_field()


@attrs.frozen
class Warning:  # the protocol's name; it shadows the builtin in this module only
    """Something the client should know that does not end the session (``lagging``)."""

    code: str
    message: str
    skipped_ms: int | None = None
    frames_dropped: int | None = None
    raw: _Raw = _raw_field()


@attrs.frozen
class Close:
    """The session is over: the connection closes with `code` after what came before."""

    code: int
    reason: str = ""


@attrs.frozen
class SpeechStarted:
    """The VAD heard speech start: utterance `utterance_id` is open from `start_ms`."""

    utterance_id: int
    start_ms: int


@attrs.frozen
class SpeechStopped:
    """The VAD heard the speech of `utterance_id` end at `end_ms`."""

    utterance_id: int
    end_ms: int


@attrs.frozen
class Committed:
    """Utterance `utterance_id` was closed (by the VAD or a commit) and goes to be decoded;
    None: a commit came with no utterance open."""

    utterance_id: int | None
    end_ms: int


@attrs.frozen
class Cleared:
    """The open utterance's audio was discarded (a clear); `utterance_id` will never have a
    final. None: nothing was open."""

    utterance_id: int | None


@attrs.frozen
class Configured:
    """The session's options are now `options`."""

    options: SessionOptions


# What only protocols that report turns are sent (`SessionOptions.turn_events`).
TurnEvent: TypeAlias = SpeechStarted | SpeechStopped | Committed | Cleared | Configured
TURN_EVENTS: Constant = (SpeechStarted, SpeechStopped, Committed, Cleared, Configured)

SessionEvent: TypeAlias = (Ready | Partial | Final | UtteranceEnd | Error | Warning | Close
                           | TurnEvent)


# -- client -> server ---------------------------------------------------------------------------


@attrs.frozen
class Audio:
    """Audio as the client sent it: in `audio_format`, or (None) its `SessionRequest`'s."""

    data: bytes = attrs.field(repr=lambda data: f"<{len(data)} bytes>")
    # A protocol whose client can change the format mid-session (OpenAI's Realtime) names it.
    audio_format: AudioFormat | None = None


@attrs.frozen
class Commit:
    """Finalize the open utterance now; the session goes on."""

    received_at: float


@attrs.frozen
class End:
    """Finalize everything, then close (1000)."""

    received_at: float


@attrs.frozen
class KeepAlive:
    """Nothing, but the client is there."""


@attrs.frozen
class Clear:
    """Discard the open utterance's audio without transcribing it; the session goes on."""

    received_at: float


@attrs.frozen
class Configure:
    """Go on with these options (language, hotwords, turn detection) from the next audio."""

    options: SessionOptions
    received_at: float


ClientCommand: TypeAlias = Audio | Commit | End | KeepAlive | Clear | Configure


# -- files --------------------------------------------------------------------------------------


@attrs.frozen
class FileSegment:
    """One transcribed piece of a file; times in ms from the start of the file."""

    start_ms: int
    end_ms: int
    text: str
    # Where the backend gives word timings (whisper does), the piece's words.
    words: tuple[Word, ...] = ()
    language: str | None = None


@attrs.frozen
class FileTranscript:
    """The text of a whole file, its timed pieces, and the length of its audio."""

    text: str
    segments: tuple[FileSegment, ...]
    duration_s: float

    @property
    def language(self) -> str | None:
        """The language most pieces were recognised in, where the backend says."""
        found = [segment.language for segment in self.segments if segment.language]
        return max(set(found), key=found.count) if found else None
