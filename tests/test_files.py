"""File transcription: long and hour-long uploads through the real server, the block-by-block
pipeline behind them, and spooling the upload to disk."""

from __future__ import annotations

import io
import itertools
import os
import struct
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import httpx
import numpy as np
import numpy.typing as npt
import pytest
import soxr
import trio
from prometheus_client import CollectorRegistry

from sttd.audio import decode_wav, encode_wav, float32_to_pcm16, pcm16_to_float32
from sttd.api import FileSegment, Word
from sttd.backends.base import ASRBackend, Request, Result
from sttd.backends.mock import MockBackend
from sttd.engine import Engine, split_at_pauses, transcribe_file
from sttd.errors import InvalidParam, PayloadTooLarge
from sttd.metrics import Metrics
from sttd.settings import Settings
from sttd.admission._multipart import read_multipart_file
from tests.conftest import load_pcm, reference_texts, silence, start_server

TRANSCRIBE = "/v1/stt/transcribe"
NAMES = ["ps_librivox_0880", "ps_cards_001", "ps_goforward", "ps_librivox_0930"]
_HEADER_BYTES = 44  # a canonical PCM WAV header: RIFF, fmt and data chunk headers
_PREROLL_MS = 300  # UtteranceTracker defaults: audio kept before speech and after it
_TAIL_MS = 200


def _layout(
    names: Sequence[str], silences_s: Sequence[float]
) -> tuple[npt.NDArray[np.int16], list[tuple[int, int]]]:
    """Each fixture followed by its silence, as 16 kHz PCM16, and where each fixture lies (ms)."""
    parts: list[npt.NDArray[np.int16]] = []
    spans: list[tuple[int, int]] = []
    position = 0
    for name, gap_s in zip(names, silences_s, strict=True):
        speech, pause = load_pcm(name), silence(gap_s)
        spans.append((position // 16, (position + speech.size) // 16))
        parts.extend((speech, pause))
        position += speech.size + pause.size
    return np.concatenate(parts), spans


def _segments(body: dict[str, Any]) -> list[tuple[int, int]]:
    return [(segment["start_ms"], segment["end_ms"]) for segment in body["segments"]]


# --- long files through the real server ------------------------------------------------------


LONG_NAMES = [*NAMES] * 4
# A 12 s pause is longer than a decoded block, so some blocks hold no speech at all.
LONG_SILENCES_S = [0.8, 1.5, 12.0, 2.5] * 4


@pytest.mark.parametrize(("rate_hz", "sample_format", "channels"),
                         [(16000, "pcm16", 1), (44100, "pcm24", 2)], ids=["16k-pcm16", "44k1-pcm24-stereo"])
async def test_long_file_gives_the_references_in_order(
    nursery: trio.Nursery, rate_hz: int, sample_format: str, channels: int
) -> None:
    refs = reference_texts()
    pcm, spans = _layout(LONG_NAMES, LONG_SILENCES_S)
    samples = pcm16_to_float32(pcm)
    if rate_hz != 16000:
        samples = soxr.resample(samples, 16000, rate_hz).astype(np.float32)
    data = encode_wav(samples, rate_hz, sample_format=sample_format, channels=channels)
    # Batches of 3 go to the engine while the file is still being read; the last holds 1.
    server = await start_server(nursery, max_inference_batch_size=3)
    with trio.fail_after(60):
        async with httpx.AsyncClient(base_url=server.http_url, timeout=60) as client:
            response = await client.post(TRANSCRIBE, files={"file": ("long.wav", data, "audio/wav")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["text"] == " ".join(refs[name] for name in LONG_NAMES)
    assert [s["text"] for s in body["segments"]] == [refs[name] for name in LONG_NAMES]
    # The cuts are those of the whole file decoded and split at once.
    whole = split_at_pauses(float32_to_pcm16(decode_wav(data)), server.state.settings)
    assert _segments(body) == [(job.start_ms, job.end_ms) for job in whole]
    for (start_ms, end_ms), (speech_start_ms, speech_end_ms) in zip(_segments(body), spans, strict=True):
        assert speech_start_ms - _PREROLL_MS <= start_ms < speech_end_ms
        assert speech_start_ms < end_ms <= speech_end_ms + _TAIL_MS
    assert body["duration_ms"] == round(decode_wav(data).size / 16)


@pytest.mark.parametrize(("path", "form", "timed"), [
    (TRANSCRIBE, {}, False),
    ("/v1/audio/transcriptions", {"model": "m"}, False),
    ("/v1/audio/transcriptions", {"model": "m", "response_format": "verbose_json"}, False),
    ("/v1/audio/transcriptions", {"model": "m", "response_format": "verbose_json",
                                  "timestamp_granularities[]": "word"}, True),
])
async def test_a_file_route_asks_for_word_timings_only_where_its_answer_shows_them(
        nursery: trio.Nursery, mock_requests: list[Request], path: str,
        form: dict[str, str], timed: bool) -> None:
    pcm, _ = _layout(NAMES[:2], [0.8, 0.8])
    server = await start_server(nursery)
    mock_requests.clear()  # the engine's start-up measurement
    with trio.fail_after(30):
        async with httpx.AsyncClient(base_url=server.http_url, timeout=30) as client:
            response = await client.post(path, data=form, files={
                "file": ("two.wav", encode_wav(pcm16_to_float32(pcm)), "audio/wav")})
    assert response.status_code == 200, response.text
    assert [request.word_timings for request in mock_requests] == [timed, timed]
    assert bool(response.json().get("words")) is timed


HOUR_S = 3600
UNIT_S = 16  # a pause, the four fixtures with pauses of at least 1 s; 225 of them make the hour


def _write_hour(path: Path) -> list[str]:
    """Write an hour of 16 kHz PCM16 WAV to `path`, 16 s at a time; returns the fixtures in it.

    16 s is a whole number of the VAD's feeds (1 s) and frames (20 or 32 ms), and of the mock
    backend's 10 ms hops, so every repeat is cut and transcribed the same way.
    """
    speech, _ = _layout(NAMES, [1.0, 1.0, 1.0, 1.0])
    unit = np.concatenate((silence(1.0), speech, np.zeros(UNIT_S * 16000 - 16000 - speech.size, np.int16)))
    assert unit.size == UNIT_S * 16000
    repeats = HOUR_S // UNIT_S
    total = HOUR_S * 16000
    with path.open("wb") as out:
        out.write(b"RIFF" + struct.pack("<I", 36 + 2 * total) + b"WAVE")
        out.write(b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, 16000, 32000, 2, 16))
        out.write(b"data" + struct.pack("<I", 2 * total))
        for _ in range(repeats):
            out.write(unit.astype("<i2").tobytes())
    assert path.stat().st_size == _HEADER_BYTES + 2 * total
    return NAMES * repeats


async def test_one_hour_file(nursery: trio.Nursery, tmp_path: Path) -> None:
    refs = reference_texts()
    path = tmp_path / "hour.wav"
    names = _write_hour(path)
    server = await start_server(nursery, max_upload_bytes=200 * 1024 * 1024)
    with trio.fail_after(240), path.open("rb") as audio:
        async with httpx.AsyncClient(base_url=server.http_url, timeout=240) as client:
            # httpx streams a file object in chunks rather than reading it whole.
            response = await client.post(TRANSCRIBE, files={"file": ("hour.wav", audio, "audio/wav")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(names) == 900
    assert len(body["segments"]) == len(names)
    assert [s["text"] for s in body["segments"]] == [refs[name] for name in names]
    assert body["text"] == " ".join(refs[name] for name in names)
    assert body["duration_ms"] == 3_600_000


# --- the block-by-block pipeline ---------------------------------------------------------------


@attrs.define
class _RecordingBackend(ASRBackend):
    """The mock backend, noting for each piece how far `file` had been read when it was decoded."""

    inner: MockBackend
    file: io.BytesIO
    positions: list[int] = attrs.field(factory=list)

    @property
    def name(self) -> str:
        return "recording"

    def check_language(self, language: str | None) -> None:
        self.inner.check_language(language)

    def transcribe(self, requests: Sequence[Request]) -> list[Result]:
        self.positions.extend([self.file.tell()] * len(requests))
        return self.inner.transcribe(requests)


async def _transcribe(
    nursery: trio.Nursery, data: bytes, settings: Settings, *, block_s: float
) -> tuple[list[int], list[FileSegment], float]:
    """transcribe_file over `data` with the mock backend: where each piece was decoded, the
    pieces with text, and the duration."""
    file = io.BytesIO(data)
    backend = _RecordingBackend(MockBackend.from_directory(), file)
    engine = Engine.from_settings(backend, settings, Metrics.create(CollectorRegistry()))
    await nursery.start(engine.run)
    result = await transcribe_file(engine, file, settings, language=None, hotwords=(), block_s=block_s)
    assert result.text == " ".join(segment.text for segment in result.segments)
    return backend.positions, list(result.segments), result.duration_s


async def test_batches_go_to_the_engine_as_soon_as_they_fill(nursery: trio.Nursery) -> None:
    refs = reference_texts()
    # Seven 5 s blocks, each holding one fixture and the pause that ends it.
    names = list(itertools.islice(itertools.cycle(NAMES), 7))
    blocks = [np.concatenate((silence(0.5), load_pcm(name))) for name in names]
    pcm = np.concatenate([np.concatenate((b, np.zeros(5 * 16000 - b.size, np.int16))) for b in blocks])
    assert pcm.size == 7 * 5 * 16000
    block_bytes = 5 * 16000 * 2
    positions, segments, duration_s = await _transcribe(
        nursery, encode_wav(pcm16_to_float32(pcm)), Settings(backend="mock", max_inference_batch_size=2),
        block_s=5.0)
    # Each pair is transcribed right after the block that completes it, before the next block
    # is read; the last piece at the end of the file.
    assert positions == [_HEADER_BYTES + blocks_read * block_bytes for blocks_read in (2, 2, 4, 4, 6, 6, 7)]
    assert [segment.text for segment in segments] == [refs[name] for name in names]
    assert duration_s == 35.0


def _expected_segments(pcm: npt.NDArray[np.int16], settings: Settings) -> list[FileSegment]:
    """The pieces of `pcm` split at once and transcribed one by one with the mock backend."""
    jobs = split_at_pauses(pcm, settings)
    results = MockBackend.from_directory().transcribe([Request(pcm16_to_float32(job.audio)) for job in jobs])
    pieces = [
        FileSegment(job.start_ms, job.end_ms, result.text.strip(), tuple(
            Word(word.word.strip(), job.start_ms + round(word.start_s * 1000),
                     job.start_ms + round(word.end_s * 1000), word.probability)
            for word in result.words), result.language)
        for job, result in zip(jobs, results)]
    return [piece for piece in pieces if piece.text]


@pytest.mark.parametrize("block_s", [0.37, 1.0, 2.5, 10.0, 60.0])
async def test_cuts_do_not_depend_on_the_block_length(nursery: trio.Nursery, block_s: float) -> None:
    # Utterances longer than 2 s are cut at their quietest point, which the tracker checks once
    # per feed: the pipeline must feed it the same seconds whatever the block length.
    settings = Settings(backend="mock", max_utterance_s=2.0, max_inference_batch_size=4)
    pcm, _ = _layout(LONG_NAMES, [0.6, 0.55, 3.3, 0.9] * 4)
    pcm = np.concatenate((pcm, load_pcm("ps_goforward")[:12345]))  # ends inside speech, mid-second
    assert len(split_at_pauses(pcm, settings)) > len(LONG_NAMES)  # the long fixtures are cut
    expected = _expected_segments(pcm, settings)
    _, segments, duration_s = await _transcribe(nursery, encode_wav(pcm16_to_float32(pcm)), settings,
                                                block_s=block_s)
    assert segments == expected
    assert duration_s == pcm.size / 16000


# --- spooling the upload -------------------------------------------------------------------------


_BOUNDARY = "sttd-test-boundary"


def _multipart(content: bytes) -> bytes:
    return (
        f'--{_BOUNDARY}\r\nContent-Disposition: form-data; name="note"\r\n\r\nhello\r\n'
        f'--{_BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
        "Content-Type: audio/wav\r\n\r\n"
    ).encode() + content + f"\r\n--{_BOUNDARY}--\r\n".encode()


async def _chunks(body: bytes, chunk_bytes: int) -> AsyncIterator[bytes]:
    for offset in range(0, len(body), chunk_bytes):
        yield body[offset : offset + chunk_bytes]


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _read(body: bytes, chunk_bytes: int, max_bytes: int) -> tuple[io.BufferedIOBase, dict[str, str]]:
    upload, fields = await read_multipart_file(
        _chunks(body, chunk_bytes), "multipart/form-data", {"boundary": _BOUNDARY},
        field="file", max_bytes=max_bytes)
    return upload, fields  # type: ignore[return-value]  # a binary temporary file


needs_proc = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts descriptors in /proc")


@needs_proc
@pytest.mark.parametrize(("size", "on_disk"), [(0, 0), (100_000, 0), (8 * 1024 * 1024, 0), (9 * 1024 * 1024, 1)])
@pytest.mark.parametrize("chunk_bytes", [4093, 1 << 20, 3 << 20])
async def test_upload_spools_to_disk_past_8_mib(size: int, on_disk: int, chunk_bytes: int) -> None:
    content = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    before = _open_fds()
    upload, fields = await _read(_multipart(content), chunk_bytes, max_bytes=16 * 1024 * 1024)
    assert _open_fds() == before + on_disk
    with upload:
        assert upload.tell() == 0
        assert upload.read() == content
        assert fields == {"note": "hello"}
    assert _open_fds() == before


async def _refusal(body: bytes, max_bytes: int) -> tuple[str, int]:
    """The error reading `body` raises, and how many more descriptors are open while it is alive.

    Counting inside the handler, where the traceback still holds the reader's frames, tells a
    file the reader closed from one that garbage collection would close later.
    """
    before = _open_fds()
    try:
        await _read(body, 1 << 20, max_bytes=max_bytes)
    except (PayloadTooLarge, InvalidParam) as exc:
        return f"{type(exc).__name__}: {exc}", _open_fds() - before
    raise AssertionError("the upload was accepted")


@needs_proc
async def test_refused_uploads_close_their_file() -> None:
    content = bytes(12 * 1024 * 1024)  # on disk by the time the limit is passed
    assert await _refusal(_multipart(content), max_bytes=10 * 1024 * 1024) == (
        "PayloadTooLarge: request body must be at most 10485760 bytes (STT_MAX_UPLOAD_BYTES)", 0)
    truncated = _multipart(content)[:-20]  # no closing boundary
    message, leaked = await _refusal(truncated, max_bytes=16 * 1024 * 1024)
    assert message.startswith("InvalidParam: malformed multipart body: ")
    assert leaked == 0
