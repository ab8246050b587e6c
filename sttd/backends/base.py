"""The one protocol every speech backend implements, and the values it exchanges."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

import attrs
import numpy as np
import numpy.typing as npt

__all__ = ["ASRBackend", "Request", "Result", "Segment", "Word"]


@attrs.frozen
class Request:
    """Transcribe `audio` (16 kHz mono float32 in [-1, 1])."""

    audio: npt.NDArray[np.float32] = attrs.field(eq=False, repr=False)
    kind: Literal["partial", "final"] = "final"
    # None lets the backend detect the language.
    language: str | None = None
    hotwords: tuple[str, ...] = ()
    # Text the transcript must start with (words already shown to the client as stable);
    # backends that cannot force a prefix ignore it.
    prefix: str = ""

    @property
    def duration_s(self) -> float:
        return self.audio.size / 16000


@attrs.frozen
class Word:
    """One recognised word; times in seconds from the start of the request's audio."""

    word: str
    start_s: float
    end_s: float
    probability: float


@attrs.frozen
class Segment:
    """A stretch of recognised text; times in seconds from the start of the request's audio."""

    start_s: float
    end_s: float
    text: str


@attrs.frozen
class Result:
    """What a backend recognised in one request."""

    text: str
    segments: tuple[Segment, ...] = ()
    words: tuple[Word, ...] = ()
    language: str | None = None
    # Mean word probability in [0, 1], where the backend has one.
    confidence: float | None = None


class ASRBackend(Protocol):
    """A speech recogniser. `transcribe` blocks: callers run it in a worker thread."""

    @property
    def name(self) -> str: ...

    def check_language(self, language: str | None) -> None:
        """Raise `UnsupportedLanguage` if this backend cannot transcribe `language`."""
        ...

    def transcribe(self, requests: Sequence[Request]) -> list[Result]:
        """Transcribe each request; one result per request, in order.

        Raises `BackendError` when the whole call failed.
        """
        ...
