"""Speech backends behind one protocol, and the registry that loads them by name."""

from __future__ import annotations

from sttd.backends.base import ASRBackend, BatchPartlyFailed, RecognisedWord, Request, Result
from sttd.backends.registry import load_backend, resolve_backend_name, resolve_lanes

__all__ = [
    "ASRBackend",
    "BatchPartlyFailed",
    "RecognisedWord",
    "Request",
    "Result",
    "load_backend",
    "resolve_backend_name",
    "resolve_lanes",
]
