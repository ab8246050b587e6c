"""A deterministic backend that recognises the fixtures in ``references/``.

It finds which fixture a request's audio came from by correlating 10 ms log-energy envelopes,
which survives resampling, requantisation and downmixing, and returns the words of that fixture
whose (evenly spread) positions fall inside the matched stretch. So a whole fixture gives its
reference text, a prefix of it (a partial) a proportional prefix of the text, and silence or
unknown audio gives "". Wire tests can therefore assert exact transcripts.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import attrs
import numpy as np
import numpy.typing as npt

from sttd.audio import SAMPLE_RATE_HZ, decode_wav
from sttd.backends.base import ASRBackend, Request, Result, RecognisedWord
from sttd.errors import BackendError, UnsupportedLanguage

__all__ = ["MockBackend", "default_references_dir"]

_HOP = SAMPLE_RATE_HZ // 100  # 10 ms
_HOP_S = _HOP / SAMPLE_RATE_HZ
# Frames louder than this (RMS, full scale = 1.0; about -40 dBFS) count as active.
_ACTIVE_RMS = 0.01
_MIN_CORRELATION = 0.8
# Active audio shorter than this (10 ms frames) gives no text: an envelope of under 300 ms
# correlates well with too many places in the fixtures to say which it came from (an
# utterance's first partial, after 250 ms of speech, matched a word in the middle of another).
_MIN_ACTIVE_FRAMES = 30
_MIN_RUN_FRAMES = 3  # 30 ms of loud frames mark where activity starts and ends
_FLOOR = 1e-10


def default_references_dir() -> Path:
    """The ``references/`` folder of this source tree."""
    return Path(__file__).resolve().parents[2] / "references"


@attrs.frozen
class _Fixture:
    name: str
    words: tuple[str, ...]
    envelope: npt.NDArray[np.float64] = attrs.field(eq=False, repr=False)
    # Active region (first, last+1) in envelope frames; words are spread evenly over it.
    active: tuple[int, int]

    def word_centres(self) -> npt.NDArray[np.float64]:
        first, stop = self.active
        count = len(self.words)
        return first + (np.arange(count) + 0.5) * (stop - first) / max(count, 1)


@attrs.frozen
class MockBackend(ASRBackend):
    """Replays reference transcripts for audio cut from the fixtures."""

    fixtures: tuple[_Fixture, ...]

    @property
    def name(self) -> str:
        return "mock"

    @classmethod
    def from_directory(cls, directory: str | Path | None = None) -> MockBackend:
        """Load ``refs.tsv`` and its WAVs from `directory` (default: ``references/``)."""
        root = Path(directory) if directory is not None else default_references_dir()
        table = root / "refs.tsv"
        try:
            with table.open(newline="", encoding="utf-8") as handle:
                rows = [row for row in csv.reader(handle, delimiter="\t") if row]
        except OSError as exc:
            raise BackendError(f"mock backend needs {table}: {exc.strerror}") from None
        fixtures = []
        for row in rows:
            if len(row) != 2:
                raise BackendError(f"{table}: expected 'file<TAB>text' rows, got {row!r}")
            name, text = row
            try:
                audio = decode_wav((root / name).read_bytes())
            except OSError as exc:
                raise BackendError(f"mock fixture {root / name}: {exc.strerror}") from None
            envelope = _envelope(audio)
            active = _active_span(envelope)
            if active is None:
                raise BackendError(f"mock fixture {name} holds no audio above {_ACTIVE_RMS} RMS")
            fixtures.append(_Fixture(name, tuple(text.split()), envelope, active))
        if not fixtures:
            raise BackendError(f"{table} lists no fixtures")
        return cls(tuple(fixtures))

    def check_language(self, language: str | None) -> None:
        if language is not None and language.split("-")[0].lower() != "en":
            raise UnsupportedLanguage(
                f"language must be 'auto' or English ('en') for the mock backend, got {language!r}"
            )

    def check_task(self, task: str) -> None:
        """Both tasks: the fixtures are English, which translates into itself."""

    def transcribe(self, requests: Sequence[Request]) -> list[Result]:
        return [self._transcribe_one(request) for request in requests]

    def _transcribe_one(self, request: Request) -> Result:
        self.check_language(request.language)
        envelope = _envelope(request.audio)
        active = _active_span(envelope)
        if active is None or active[1] - active[0] < _MIN_ACTIVE_FRAMES:
            return Result(text="", language="en")
        core = envelope[active[0] : active[1]]
        best: tuple[float, _Fixture, int] | None = None
        for fixture in self.fixtures:
            match = _best_offset(fixture.envelope, core)
            if match is not None and (best is None or match[0] > best[0]):
                best = (match[0], fixture, match[1])
        if best is None or best[0] < _MIN_CORRELATION:
            return Result(text="", language="en")
        _, fixture, offset = best
        centres = fixture.word_centres()
        inside = (centres >= offset) & (centres < offset + core.size)
        chosen = np.flatnonzero(inside)
        if chosen.size == 0:
            return Result(text="", language="en")
        spacing = (fixture.active[1] - fixture.active[0]) / len(fixture.words)
        shift = active[0] - offset  # fixture frame -> request frame
        words = tuple(
            RecognisedWord(
                word=fixture.words[i],
                start_s=max(0.0, (centres[i] - spacing / 2 + shift) * _HOP_S),
                end_s=(centres[i] + spacing / 2 + shift) * _HOP_S,
                probability=1.0,
            )
            for i in chosen
        )
        return Result(text=" ".join(word.word for word in words),
                      words=words if request.word_timings else (), language="en", confidence=1.0)


def _envelope(audio: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    frames = audio[: audio.size - audio.size % _HOP].astype(np.float64).reshape(-1, _HOP)
    energy: npt.NDArray[np.float64] = np.mean(frames * frames, axis=1)
    return np.log10(energy + _FLOOR)


def _active_span(envelope: npt.NDArray[np.float64]) -> tuple[int, int] | None:
    """First and last+1 frame of the runs of at least _MIN_RUN_FRAMES loud frames.

    Requiring a run keeps a lone noise frame near the threshold from moving the span, which
    would shift every word position (and the threshold can fall either side of it depending on
    where the 10 ms frames happen to start).
    """
    loud = (envelope > 2 * np.log10(_ACTIVE_RMS)).astype(np.int64)
    if loud.size < _MIN_RUN_FRAMES:
        return None
    runs = np.convolve(loud, np.ones(_MIN_RUN_FRAMES, np.int64), mode="valid")
    starts = np.flatnonzero(runs == _MIN_RUN_FRAMES)
    if starts.size == 0:
        return None
    return int(starts[0]), int(starts[-1]) + _MIN_RUN_FRAMES


def _best_offset(
    haystack: npt.NDArray[np.float64], needle: npt.NDArray[np.float64]
) -> tuple[float, int] | None:
    """Highest Pearson correlation of `needle` against windows of `haystack`, and where."""
    m = needle.size
    if m < 2 or haystack.size < m:
        return None
    centred = needle - needle.mean()
    norm = float(np.sqrt(np.sum(centred * centred)))
    if norm == 0.0:
        return None
    sums = np.concatenate(([0.0], np.cumsum(haystack)))
    squares = np.concatenate(([0.0], np.cumsum(haystack * haystack)))
    window_sum = sums[m:] - sums[:-m]
    window_var = squares[m:] - squares[:-m] - window_sum * window_sum / m
    dots = np.correlate(haystack, centred, mode="valid")
    with np.errstate(divide="ignore", invalid="ignore"):
        correlation = dots / (norm * np.sqrt(np.maximum(window_var, 0.0)))
    correlation = np.nan_to_num(correlation, nan=-1.0, posinf=-1.0, neginf=-1.0)
    offset = int(np.argmax(correlation))
    return float(correlation[offset]), offset
