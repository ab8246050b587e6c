"""The errors the client raises on purpose, one tree under `RequestFailed`::

    RequestFailed             `code` and `message` (an `sttd.errors.SttdError`)
    ├── ConnectFailed         the server could not be reached, or did not answer in time
    ├── SessionRefused        the session ended before ``ready`` (an error and its close code), or
    │                         the WebSocket handshake was refused (an HTTP status)
    ├── SessionClosed         audio or a message sent after the session was closed
    ├── TranscriptionFailed   the HTTP API answered with an error (status, code, message)
    └── ProtocolError         the server sent something this client cannot read
"""

from __future__ import annotations

from sttd.api import Error
from sttd.errors import SttdError

__all__ = [
    "ConnectFailed",
    "ProtocolError",
    "RequestFailed",
    "SessionClosed",
    "SessionRefused",
    "TranscriptionFailed",
]


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
