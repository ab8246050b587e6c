"""The wire protocols, one codec each, over the typed events they share.

A session emits typed events (`sttd.api` re-exports them: `Ready`, `Partial`, `Final`,
`UtteranceEnd`, `Error`, `Warning`, `Close`); each WebSocket protocol is one `Codec` that
decodes client messages into commands and encodes events: `NativeCodec` (``/v1/stt/ws``, sttd's
own JSON), `DeepgramCodec` (``/v1/listen``) and `RealtimeCodec` (``/v1/realtime``, OpenAI's
Realtime transcription sessions). OpenAI's file API (``/v1/audio/transcriptions``)
is `TranscriptionForm` and `render`. The parsing every protocol shares (languages, hotwords,
query values, client JSON) is in one place too.
"""

from sttd.api._codec import Codec
from sttd.api._deepgram import DeepgramCodec
from sttd.api._events import (
    FINAL_CAUSES,
    TURN_EVENTS,
    Clear,
    Cleared,
    Committed,
    Configure,
    Configured,
    SpeechStarted,
    SpeechStopped,
    TurnEvent,
    Audio,
    ClientCommand,
    Close,
    Commit,
    End,
    Error,
    FileSegment,
    FileTranscript,
    Final,
    FinalCause,
    KeepAlive,
    Partial,
    Ready,
    SessionEvent,
    SessionOptions,
    SessionRequest,
    UtteranceEnd,
    Warning,
    Word,
)
from sttd.api._languages import language_code, language_name
from sttd.api._native import (
    NativeCodec,
    ServerMessageError,
    Unknown,
    encode_command,
    parse_server_message,
    to_json,
)
from sttd.api._openai import RESPONSE_FORMATS, TranscriptionForm, render
from sttd.api._realtime import RealtimeCodec
from sttd.api._params import (
    MAX_HOTWORD_CHARS,
    MAX_HOTWORDS,
    MAX_TEXT_MESSAGE_BYTES,
    dumps,
    parse_hotwords,
    parse_task,
    parse_language,
    quoted,
)

__all__ = [
    "FINAL_CAUSES",
    "TURN_EVENTS",
    "Clear",
    "Cleared",
    "Committed",
    "Configure",
    "Configured",
    "RealtimeCodec",
    "SpeechStarted",
    "SpeechStopped",
    "TurnEvent",
    "MAX_HOTWORDS",
    "MAX_HOTWORD_CHARS",
    "MAX_TEXT_MESSAGE_BYTES",
    "RESPONSE_FORMATS",
    "Audio",
    "ClientCommand",
    "Close",
    "Codec",
    "Commit",
    "DeepgramCodec",
    "End",
    "Error",
    "FileSegment",
    "FileTranscript",
    "Final",
    "FinalCause",
    "KeepAlive",
    "NativeCodec",
    "Partial",
    "Ready",
    "ServerMessageError",
    "SessionEvent",
    "SessionOptions",
    "SessionRequest",
    "TranscriptionForm",
    "Unknown",
    "UtteranceEnd",
    "Warning",
    "Word",
    "dumps",
    "encode_command",
    "language_code",
    "language_name",
    "parse_hotwords",
    "parse_task",
    "parse_language",
    "parse_server_message",
    "quoted",
    "render",
    "to_json",
]
