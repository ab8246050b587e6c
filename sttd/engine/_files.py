"""File transcription: read an audio file a block at a time, cut it at pauses with the streaming
VAD, and transcribe the pieces in batches.

`sttd.audio.open_audio` picks the reader: a RIFF/WAVE file is read in pure numpy; anything else
goes to FFmpeg (through PyAV), which accepts FLAC, Ogg/Opus, MP3, M4A/AAC, WebM and a few more,
and refuses what is not audio with `UnsupportedMedia`. Both give 16 kHz mono float32 blocks of
`block_s` seconds.

Memory does not grow with the file's length: at any time we hold one decoded block, the VAD's
open utterance, and at most one batch of pieces plus the finals of one block; of a transcribed
piece we keep only its text and timings. The cuts are those `split_at_pauses` finds in the whole
file at once, which are those a live stream of the same audio would get.

A compressed file may hold far more audio than its size suggests (an hour of silence is a few
hundred kilobytes of FLAC), so its audio is capped at `MAX_MEDIA_AUDIO_S`: memory would stay
flat, but the time spent on one request would not. A WAV file's audio is bounded by the upload
limit itself and is not capped.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator
from functools import partial
from typing import IO, Final, Literal

import attrs
import numpy as np
import numpy.typing as npt
import trio

from sttd.api import FileSegment, FileTranscript
from sttd.audio import (
    SAMPLE_RATE_HZ,
    AudioReader,
    MediaReader,
    float32_to_pcm16,
    open_audio,
    pcm16_to_float32,
)
from sttd.backends.base import Request
from sttd.engine._engine import Engine
from sttd.settings import Settings
from sttd.session import Utterance, UtteranceTracker, stream_words
from sttd.vad import make_endpointer

__all__ = [
    "MAX_MEDIA_AUDIO_S",
    "check_audio",
    "file_segments",
    "split_at_pauses",
    "transcribe_file",
]

log = logging.getLogger(__name__)

_FEED_SAMPLES: Final = SAMPLE_RATE_HZ  # feed the tracker one second at a time
# Audio decoded and cut per worker-thread call: long enough that thread hops cost little,
# short enough that a call (and so the wait on cancellation) stays in the milliseconds.
_BLOCK_S: Final = 10.0
# The most audio a compressed upload may decode to (4 hours), refused with `PayloadTooLarge`
# (413) as soon as its header declares more or its decoding passes it.
MAX_MEDIA_AUDIO_S: Final = 4 * 3600.0


def split_at_pauses(pcm: npt.NDArray[np.int16], settings: Settings) -> list[Utterance]:
    """Utterances of `pcm`, found exactly as a live stream would find them."""
    splitter = _PauseSplitter.from_settings(settings)
    return [*splitter.feed(pcm), *splitter.finish()]


async def transcribe_file(
    engine: Engine,
    file: IO[bytes],
    settings: Settings,
    *,
    language: str | None,
    hotwords: tuple[str, ...],
    task: Literal["transcribe", "translate"] = "transcribe",
    word_timings: bool = True,
    block_s: float = _BLOCK_S,
) -> FileTranscript:
    """Transcribe the audio file that starts at `file`'s position, in memory independent of its length.

    Reading, decoding and cutting run in worker threads, `block_s` seconds of audio per call.
    Pieces go to the engine in batches of ``max_inference_batch_size`` as soon as a batch is
    full, and the last, smaller batch at the end of the file. `file` must be seekable; it is
    not closed. Cancellation waits for the block or the engine call in flight. Raises
    `UnsupportedMedia` if `file` is not audio in a format we accept, `BadAudio` if it is but is
    broken, `PayloadTooLarge` if compressed audio runs past `MAX_MEDIA_AUDIO_S`, and
    `BackendError` if the engine fails. Without `word_timings` the segments carry no words
    (a whisper engine then skips its word alignment).
    """
    segments: list[FileSegment] = []
    duration_s = 0.0
    async with contextlib.aclosing(file_segments(
            engine, file, settings, language=language, hotwords=hotwords, task=task,
            word_timings=word_timings, block_s=block_s)) as batches:
        async for batch, duration_s in batches:
            segments.extend(batch)
    return FileTranscript(
        text=" ".join(segment.text for segment in segments),
        segments=tuple(segments),
        duration_s=duration_s,
    )


async def file_segments(
    engine: Engine,
    file: IO[bytes],
    settings: Settings,
    *,
    language: str | None,
    hotwords: tuple[str, ...],
    task: Literal["transcribe", "translate"] = "transcribe",
    word_timings: bool = True,
    block_s: float = _BLOCK_S,
) -> AsyncGenerator[tuple[list[FileSegment], float]]:
    """`transcribe_file` as it goes: each batch's segments with text, in order, with the audio
    read so far (seconds); the last item has the file's whole duration (and maybe no segment).

    Holds no nursery or cancel scope across its yields; close it (`contextlib.aclosing`) if it
    is left before its end.
    """
    reader, splitter = await trio.to_thread.run_sync(partial(_open, file, settings, block_s=block_s))
    try:
        batch_size = settings.max_inference_batch_size
        waiting: list[Utterance] = []
        finished = False
        while not finished:
            jobs, finished = await trio.to_thread.run_sync(_split_next_block, reader, splitter)
            waiting.extend(jobs)
            while len(waiting) >= batch_size or (finished and waiting):
                batch, waiting = waiting[:batch_size], waiting[batch_size:]
                log.debug("file.batch pieces=%d position_s=%.1f", len(batch),
                          splitter.position / SAMPLE_RATE_HZ)
                segments = await _transcribe_batch(engine, batch, language=language,
                                                   hotwords=hotwords, task=task,
                                                   word_timings=word_timings)
                if segments:
                    yield segments, splitter.position / SAMPLE_RATE_HZ
        yield [], splitter.position / SAMPLE_RATE_HZ
    finally:
        if isinstance(reader, MediaReader):
            reader.close()  # no thread is in it: the calls above are not abandoned on cancel


@attrs.define
class _PauseSplitter:
    """Feeds an utterance tracker whole seconds of audio, whatever sizes it is given.

    The tracker checks its length limit and trims once per feed, so feeding the same seconds
    makes the cuts independent of how the audio was blocked.
    """

    _tracker: UtteranceTracker
    _carry: npt.NDArray[np.int16] = attrs.field(init=False, factory=lambda: np.zeros(0, np.int16))

    @classmethod
    def from_settings(cls, settings: Settings) -> _PauseSplitter:
        endpointer = make_endpointer(settings.vad, threshold_rms=settings.vad_threshold,
                                     silence_ms=settings.vad_silence_ms)
        return cls(UtteranceTracker(endpointer, max_utterance_s=settings.max_utterance_s))

    @property
    def position(self) -> int:
        """Samples given so far."""
        return self._tracker.position + self._carry.size

    def feed(self, pcm: npt.NDArray[np.int16]) -> list[Utterance]:
        """Add audio; returns the finals it completes, oldest first."""
        audio = np.concatenate((self._carry, pcm)) if self._carry.size else pcm
        whole = audio.size - audio.size % _FEED_SAMPLES
        jobs: list[Utterance] = []
        for offset in range(0, whole, _FEED_SAMPLES):
            jobs.extend(self._tracker.feed(audio[offset : offset + _FEED_SAMPLES]))
        self._carry = audio[whole:].copy()
        return jobs

    def finish(self) -> list[Utterance]:
        """Feed the last partial second and finalize the open utterance; returns the finals."""
        jobs = self._tracker.feed(self._carry) if self._carry.size else []
        self._carry = self._carry[:0]
        return [*jobs, *self._tracker.commit()]


async def check_audio(file: IO[bytes]) -> None:
    """Raise what `transcribe_file` would for `file` not being audio we read (`UnsupportedMedia`,
    or `BadAudio` for audio whose header is broken), before any of it is transcribed: a streamed
    answer's status goes out before its transcription begins. Opens the file's reader (in a
    worker thread) and closes it; `file` is left at the position it had."""
    position = file.tell()

    def probe() -> None:
        reader = open_audio(file, block_s=_BLOCK_S, max_duration_s=MAX_MEDIA_AUDIO_S)
        if isinstance(reader, MediaReader):
            reader.close()

    try:
        await trio.to_thread.run_sync(probe)
    finally:
        file.seek(position)


def _open(
    file: IO[bytes], settings: Settings, *, block_s: float
) -> tuple[AudioReader, _PauseSplitter]:
    """Open the file's reader, then build the VAD (Silero loads a model). Blocks: run it in a thread."""
    reader = open_audio(file, block_s=block_s, max_duration_s=MAX_MEDIA_AUDIO_S)
    try:
        return reader, _PauseSplitter.from_settings(settings)
    except BaseException:
        if isinstance(reader, MediaReader):
            reader.close()
        raise


def _split_next_block(reader: AudioReader, splitter: _PauseSplitter) -> tuple[list[Utterance], bool]:
    """Cut the next block of `reader`, or finish at the end of the file.

    Returns the finals completed and whether the file is done. Blocks: run it in a thread.
    """
    block = reader.read_block()
    if block is None:
        return splitter.finish(), True
    return splitter.feed(float32_to_pcm16(block)), False


async def _transcribe_batch(
    engine: Engine, jobs: list[Utterance], *, language: str | None, hotwords: tuple[str, ...],
    task: Literal["transcribe", "translate"], word_timings: bool,
) -> list[FileSegment]:
    """Transcribe `jobs` in one engine call; the pieces that have text."""
    requests = [Request(pcm16_to_float32(job.audio), "final", language, hotwords, origin="file",
                        task=task, word_timings=word_timings)
                for job in jobs]
    results = await engine.transcribe_batch(requests)
    segments = []
    for job, result in zip(jobs, results, strict=True):
        text = result.text.strip()
        if not text:
            continue
        segments.append(FileSegment(job.start_ms, job.end_ms, text,
                                    stream_words(result.words, job.start_ms), result.language))
    return segments
