"""Errors raised by sttd.

All of them derive from one base::

    SttdError
    ├── ClientError          the client sent something we refuse; carries the wire codes
    │   ├── InvalidParam          a query parameter is missing or out of range (1008 / 400)
    │   ├── InvalidMessage        a text frame we cannot parse or do not know (1003 / 400)
    │   ├── UnsupportedMedia      an upload that is not audio we can decode (1003 / 415)
    │   ├── BadAudio              audio we recognise but that is broken (1003 / 400)
    │   ├── PayloadTooLarge       a body or frame over its limit (1009 / 413)
    │   ├── UnsupportedLanguage   a language the loaded model cannot transcribe (1008 / 400)
    │   ├── Unsupported           a feature the loaded model does not have, e.g. hotwords (1008 / 400)
    │   ├── Overloaded            the server or this session is past capacity (1013 / 503)
    │   ├── Unauthorized          no valid bearer key where one is required (1008 / 401)
    │   ├── ShuttingDown          the server is draining (1001 / 503)
    │   └── RequestTimeout        the client stopped sending its request body (408)
    ├── BackendError         a speech backend failed on a request
    │   └── InferenceTimeout      no result within STT_INFERENCE_TIMEOUT_S
    └── ConfigError          a setting is missing or invalid; stops start-up

Each `ClientError` has a stable machine-readable `code` (sent as ``{"error": {"code": ...}}`` over
HTTP and ``{"type": "error", "code": ...}`` over the WebSocket), an `http_status` and a
`ws_close_code`. Messages say what was wrong, the value, and what was expected.
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "BadAudio",
    "ClientError",
    "ConfigError",
    "InferenceTimeout",
    "InvalidMessage",
    "InvalidParam",
    "Overloaded",
    "PayloadTooLarge",
    "RequestTimeout",
    "ShuttingDown",
    "SttdError",
    "Unauthorized",
    "Unsupported",
    "UnsupportedLanguage",
    "UnsupportedMedia",
    "UnsupportedWavEncoding",
]


class SttdError(Exception):
    """Base of every error sttd raises on purpose."""


class ClientError(SttdError):
    """The client's input was refused; `code`, `http_status` and `ws_close_code` say how."""

    code: str = "bad_request"
    http_status: int = 400
    ws_close_code: int = 1008


class InvalidParam(ClientError):
    """A query or form parameter is missing or invalid."""

    code = "invalid_param"
    http_status = 400
    ws_close_code = 1008

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class InvalidMessage(ClientError):
    """A WebSocket text frame is not JSON, or not a message type we know."""

    code = "invalid_message"
    http_status = 400
    ws_close_code = 1003

    def __init__(self, message: str, *, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        # The field at fault, and a protocol's own code for the refusal, where it has them.
        self.param = param
        if code is not None:
            self.code = code


class UnsupportedMedia(ClientError):
    """An upload that is not in a format we can decode."""

    code = "unsupported_media_type"
    http_status = 415
    ws_close_code = 1003


class BadAudio(ClientError):
    """Audio in a known container whose contents are broken or inconsistent."""

    code = "bad_audio"
    http_status = 400
    ws_close_code = 1003


class UnsupportedWavEncoding(BadAudio):
    """A well-formed WAV header naming an encoding the numpy reader does not decode (mu-law,
    A-law, ADPCM, ...): the file routes hand such a file to FFmpeg instead."""


class PayloadTooLarge(ClientError):
    """A body, upload or frame over its configured limit."""

    code = "payload_too_large"
    http_status = 413
    ws_close_code = 1009


class UnsupportedLanguage(ClientError):
    """The loaded model cannot transcribe the requested language."""

    code = "unsupported_language"
    http_status = 400
    ws_close_code = 1008
    param: str | None = "language"  # the request's field, for OpenAI's error shape


class Unsupported(ClientError):
    """The loaded model cannot do what was asked (hotwords on a CTC model); `param` names the
    request's field."""

    code = "unsupported"
    http_status = 400
    ws_close_code = 1008

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class Overloaded(ClientError):
    """The server, or this session's queues, are past capacity."""

    code = "overloaded"
    http_status = 503
    ws_close_code = 1013


class Unauthorized(ClientError):
    """A request without a valid bearer key where one is required."""

    code = "unauthorized"
    http_status = 401
    ws_close_code = 1008


class ShuttingDown(ClientError):
    """The server is draining: no new sessions or uploads."""

    code = "shutting_down"
    http_status = 503
    ws_close_code = 1001


class RequestTimeout(ClientError):
    """The client stopped sending its request body."""

    code = "request_timeout"
    http_status = 408
    ws_close_code = 1008


class BackendError(SttdError):
    """A speech backend failed to load or to transcribe."""

    code = "inference_failed"
    http_status = 502  # the file routes' answer: the engine behind the server failed


class InferenceTimeout(BackendError):
    """A request got no result within its time limit (the backend may be stuck)."""

    code = "inference_timeout"
    http_status = 504


class ConfigError(SttdError):
    """A setting is missing or invalid; the message names the variable."""
