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

The messages are the server's own typed events, read by the module that writes them
(`sttd.api`): ``client.Final is sttd.api.Final``, and each has ``raw``, the message as it came.
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

Reading audio files (`read_audio`, which is `sttd.audio.read_audio`) raises
`sttd.errors.UnsupportedMedia` or `sttd.errors.BadAudio`, as the server would for the same file.

The ``sttd stream`` and ``sttd transcribe`` commands are built on this package too (its private
``_cli`` and ``_mic`` modules, which `sttd.cli` imports only for those commands).
"""

from sttd.api import Error, Final, Partial, Ready, Unknown, UtteranceEnd, Warning, Word
from sttd.audio import read_audio
from sttd.client._errors import (
    ConnectFailed,
    ProtocolError,
    RequestFailed,
    SessionClosed,
    SessionRefused,
    TranscriptionFailed,
)
from sttd.client._files import Progress, transcribe_file
from sttd.client._session import (
    OnSent,
    Pcm,
    ServerMessage,
    StreamingSession,
    connect,
    http_base_url,
    parse_message,
    pcm_bytes,
    stream_file,
    stream_pcm,
    websocket_url,
)

__all__ = [
    "ConnectFailed",
    "Error",
    "Final",
    "OnSent",
    "Partial",
    "Pcm",
    "Progress",
    "ProtocolError",
    "Ready",
    "RequestFailed",
    "ServerMessage",
    "SessionClosed",
    "SessionRefused",
    "StreamingSession",
    "TranscriptionFailed",
    "Unknown",
    "UtteranceEnd",
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
