"""File transcription: cut audio at pauses with the streaming VAD and transcribe the pieces."""

from __future__ import annotations

import attrs
import numpy as np
import numpy.typing as npt

from sttd.audio import float32_to_pcm16, pcm16_to_float32
from sttd.backends.base import Request, Result
from sttd.engine import Engine
from sttd.settings import Settings
from sttd.stream import Job, UtteranceTracker
from sttd.vad import make_endpointer

__all__ = ["FileTranscript", "split_at_pauses", "transcribe_samples"]

_FEED_SAMPLES = 16000  # feed the tracker one second at a time


@attrs.frozen
class FileTranscript:
    """The text of a whole file and its timed pieces."""

    text: str
    segments: tuple[tuple[Job, Result], ...]
    duration_s: float


def split_at_pauses(pcm: npt.NDArray[np.int16], settings: Settings) -> list[Job]:
    """Utterances of `pcm`, found exactly as a live stream would find them."""
    tracker = UtteranceTracker(
        make_endpointer(settings.vad, threshold_rms=settings.vad_threshold,
                        silence_ms=settings.vad_silence_ms),
        max_utterance_s=settings.max_utterance_s,
    )
    jobs: list[Job] = []
    for offset in range(0, pcm.size, _FEED_SAMPLES):
        jobs.extend(tracker.feed(pcm[offset : offset + _FEED_SAMPLES]))
    jobs.extend(tracker.commit())
    return jobs


async def transcribe_samples(
    engine: Engine,
    samples: npt.NDArray[np.float32],
    settings: Settings,
    *,
    language: str | None,
    hotwords: tuple[str, ...],
) -> FileTranscript:
    """Transcribe 16 kHz mono `samples`, batching pieces up to the configured batch size."""
    jobs = split_at_pauses(float32_to_pcm16(samples), settings)
    pieces: list[tuple[Job, Result]] = []
    batch_size = settings.max_inference_batch_size
    for first in range(0, len(jobs), batch_size):
        batch = jobs[first : first + batch_size]
        requests = [
            Request(pcm16_to_float32(job.audio), "final", language, hotwords) for job in batch
        ]
        results = await engine.transcribe_batch(requests)
        pieces.extend((job, result) for job, result in zip(batch, results, strict=True)
                      if result.text.strip())
    text = " ".join(result.text.strip() for _, result in pieces)
    return FileTranscript(text=text, segments=tuple(pieces), duration_s=samples.size / 16000)
