"""Compressed and container uploads (FLAC, Ogg/Opus, MP3, M4A/AAC, WebM, ...) decoded by PyAV.

The media is made at test time with PyAV from the fixtures in references/, at 44.1 or 48 kHz and
in stereo, so that resampling and downmixing are exercised; the mock backend recognises the
fixtures by their energy envelope, so transcripts are exact even after lossy coding. Through
the real server: every format on both file routes, the refusals (415, 400, 413) and damaged
files. Without it: the reader's blocks, its sample counts against the numpy WAV path, its file
handling, its duration cap and its memory on a long file.
"""

from __future__ import annotations

import io
import logging
import os
import struct
import tempfile
import tracemalloc
import zlib
from collections.abc import Sequence
from functools import cache
from typing import Any, Final

import av
import httpx
import numpy as np
import numpy.typing as npt
import pytest
import soxr
import trio

from sttd.audio import (ACCEPTED_FORMATS, AudioFormat, MediaReader, StreamConverter, WavReader,
                        encode_wav, pcm16_to_float32)
from sttd.engine import MAX_MEDIA_AUDIO_S
from sttd.errors import PayloadTooLarge
from tests.conftest import REFERENCES, RunningServer, load_pcm, reference_texts, silence, start_server

TRANSCRIBE: Final = "/v1/stt/transcribe"
OPENAI: Final = "/v1/audio/transcriptions"
TIMEOUT_S: Final = 60
FIRST, SECOND = "ps_cards_001", "ps_goforward"
_FRAME_SAMPLES: Final = 4096  # what the encoder is fed at a time
_Pcm = npt.NDArray[np.int16]


def _speech() -> _Pcm:
    """Two fixtures with a 1 s pause between them, and a little silence at either end."""
    return np.concatenate((silence(0.5), load_pcm(FIRST), silence(1.0), load_pcm(SECOND), silence(0.5)))


def _expected_text() -> list[str]:
    refs = reference_texts()
    return [refs[FIRST], refs[SECOND]]


def encode_media(pcm: _Pcm, container: str, codec: str, *, rate_hz: int, layout: str = "stereo",
                 options: dict[str, str] | None = None) -> bytes:
    """`pcm` (16 kHz) resampled to `rate_hz`, the same on every channel of `layout`, encoded."""
    samples = pcm16_to_float32(pcm)
    if rate_hz != 16000:
        samples = soxr.resample(samples, 16000, rate_hz).astype(np.float32)
    channels = av.AudioLayout(layout).nb_channels
    out = io.BytesIO()
    with av.open(out, mode="w", format=container, options=options or {}) as output:
        stream = output.add_stream(codec, rate=rate_hz, layout=layout)
        for offset in range(0, samples.size, _FRAME_SAMPLES):
            output.mux(stream.encode(_packed_frame(samples[offset : offset + _FRAME_SAMPLES], channels,
                                                   layout, rate_hz=rate_hz, pts=offset)))
        output.mux(stream.encode(None))
    return out.getvalue()


def _packed_frame(mono: npt.NDArray[np.float32], channels: int, layout: str, *, rate_hz: int,
                  pts: int) -> av.AudioFrame:
    """`mono` on every channel, as interleaved float.

    Not `AudioFrame.from_ndarray` with planar audio: from 8 channels on, PyAV walks past a planar
    frame's plane pointers (see `sttd.audio._media._interleave`). A packed frame has one plane.
    """
    frame = av.AudioFrame(format="flt", layout=layout, samples=mono.size)
    frame.planes[0].update(np.repeat(mono.astype(np.float32), channels).tobytes())
    frame.sample_rate, frame.pts = rate_hz, pts
    return frame


def _has_encoder(name: str) -> bool:
    try:
        av.Codec(name, "w")
    except av.error.FFmpegError:
        return False
    return True


_AAC_FRAME: Final = 1024
# container, codec, rate, layout, muxer options, and the samples (at that rate) that decoding
# may add: none where the container records the encoder's delay and padding; AAC's last frame
# in MP4, whose edit list trims only the delay; the delay and the last frame in raw ADTS.
FORMATS = [
    pytest.param("flac", "flac", 44100, "stereo", {}, 0, id="flac-44k1-stereo"),
    pytest.param("ogg", "libopus", 48000, "stereo", {}, 0, id="ogg-opus-48k-stereo"),
    pytest.param("mp3", "libmp3lame", 44100, "stereo", {}, 0, id="mp3-44k1-stereo",
                 marks=pytest.mark.skipif(not _has_encoder("libmp3lame"),
                                          reason="PyAV's FFmpeg has no libmp3lame")),
    # The ipod (M4A) muxer writes its moov index after the audio: reading it needs seeks.
    pytest.param("ipod", "aac", 44100, "stereo", {}, _AAC_FRAME, id="m4a-aac-44k1-stereo"),
    pytest.param("webm", "libopus", 48000, "stereo", {}, 0, id="webm-opus-48k-stereo"),
    pytest.param("adts", "aac", 22050, "mono", {}, 2 * _AAC_FRAME, id="adts-aac-22k05-mono"),
    # 7.1 decodes to 8 planes, one more than PyAV reads safely (see test_sixteen_channels).
    pytest.param("matroska", "aac", 48000, "7.1", {}, _AAC_FRAME, id="mka-aac-48k-7.1"),
    # RF64 is RIFF's 64-bit successor: not RIFF/WAVE, so FFmpeg reads it, not the numpy path.
    pytest.param("wav", "pcm_s16le", 48000, "5.1", {"rf64": "always"}, 0, id="rf64-48k-5.1"),
]


@cache
def _media(container: str, codec: str, rate_hz: int, layout: str, options: tuple[tuple[str, str], ...]) -> bytes:
    return encode_media(_speech(), container, codec, rate_hz=rate_hz, layout=layout, options=dict(options))


async def _post(server: RunningServer, route: str, name: str, data: bytes,
                **form: str) -> httpx.Response:
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(base_url=server.http_url, timeout=TIMEOUT_S) as client:
            return await client.post(route, files={"file": (name, data, "application/octet-stream")},
                                     data=form)


# --- every format on both routes ----------------------------------------------------------------


@pytest.mark.parametrize(("container", "codec", "rate_hz", "layout", "options", "added_samples"), FORMATS)
async def test_both_routes_transcribe_every_format(
    nursery: trio.Nursery, container: str, codec: str, rate_hz: int, layout: str,
    options: dict[str, str], added_samples: int,
) -> None:
    data = _media(container, codec, rate_hz, layout, tuple(options.items()))
    assert data[:4] != b"RIFF"
    if container == "ipod":
        assert data.index(b"moov") > data.index(b"mdat")
    server = await start_server(nursery)
    expected_ms = round(_speech().size / 16)
    added_ms = added_samples / rate_hz * 1000

    response = await _post(server, TRANSCRIBE, f"speech.{container}", data)
    assert response.status_code == 200, response.text
    body = response.json()
    assert [segment["text"] for segment in body["segments"]] == _expected_text()
    assert body["text"] == " ".join(_expected_text())
    if added_samples:
        assert 0 < body["duration_ms"] - expected_ms <= added_ms + 1
    else:
        assert body["duration_ms"] == expected_ms

    response = await _post(server, OPENAI, f"speech.{container}", data, model="whisper-1",
                           response_format="verbose_json")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["text"] == " ".join(_expected_text())
    assert [segment["text"] for segment in body["segments"]] == _expected_text()
    assert 0 <= body["duration"] * 1000 - expected_ms <= added_ms + 1


def _layout(names: Sequence[str], pause_s: float) -> _Pcm:
    return np.concatenate([np.concatenate((load_pcm(name), silence(pause_s))) for name in names])


async def test_m4a_spooled_to_disk_with_its_index_at_the_end(nursery: trio.Nursery) -> None:
    # Lossless ALAC at 48 kHz stereo is big enough to pass the 8 MiB the upload keeps in memory.
    refs = reference_texts()
    names = [FIRST, SECOND, "ps_librivox_0880", "ps_librivox_0930"] * 6
    data = encode_media(np.concatenate((silence(0.5), _layout(names, 1.0))), "ipod", "alac",
                        rate_hz=48000)
    assert len(data) > 8 * 1024 * 1024
    assert data.index(b"moov") > data.index(b"mdat")
    server = await start_server(nursery)
    response = await _post(server, TRANSCRIBE, "long.m4a", data)
    assert response.status_code == 200, response.text
    assert [segment["text"] for segment in response.json()["segments"]] == [refs[name] for name in names]


async def test_sample_rate_that_changes_mid_stream(nursery: trio.Nursery) -> None:
    # Two ADTS streams back to back: the decoder switches from 44.1 to 22.05 kHz mid-file.
    first = encode_media(np.concatenate((silence(0.5), load_pcm(FIRST), silence(0.5))), "adts", "aac",
                         rate_hz=44100)
    second = encode_media(np.concatenate((silence(0.5), load_pcm(SECOND), silence(0.5))), "adts", "aac",
                          rate_hz=22050, layout="mono")
    server = await start_server(nursery)
    response = await _post(server, TRANSCRIBE, "joined.aac", first + second)
    assert response.status_code == 200, response.text
    assert [segment["text"] for segment in response.json()["segments"]] == _expected_text()


# --- refusals ----------------------------------------------------------------------------------


def _png() -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    rows = b"".join(b"\x00" + bytes(3 * 4) for _ in range(4))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 4, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def _video_without_audio() -> bytes:
    out = io.BytesIO()
    with av.open(out, mode="w", format="mp4") as output:
        stream = output.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for index in range(5):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), index * 40, np.uint8), format="rgb24")
            output.mux(stream.encode(frame))
        output.mux(stream.encode(None))
    return out.getvalue()


def _not_accepted(looks_like: str) -> str:
    return f"the file is not audio in a format we accept ({ACCEPTED_FORMATS}): it looks like {looks_like}"


# Relative to the working directory, as FFmpeg's concat demuxer resolves it in its safe mode.
_FIXTURE_PATH = os.path.relpath(REFERENCES / f"{SECOND}.wav")
REFUSED = [
    pytest.param(lambda: b"", f"the file is empty; expected audio ({ACCEPTED_FORMATS})", id="empty"),
    pytest.param(lambda: "Transcribe me, please.\n".encode() * 40, _not_accepted("text"), id="text"),
    pytest.param(_png, _not_accepted("a PNG image"), id="png"),
    pytest.param(lambda: np.random.default_rng(7).integers(0, 256, 50_000, np.uint8).tobytes(),
                 _not_accepted("unrecognised binary data"), id="random-bytes"),
    pytest.param(_video_without_audio,
                 "the file is not audio: its MP4 container holds no audio stream (found video (mpeg4))",
                 id="video-without-audio"),
    # Playlists name other files: FFmpeg's concat demuxer would open the fixture and transcribe
    # it, HLS's would try.
    pytest.param(lambda: f"ffconcat version 1.0\nfile '{_FIXTURE_PATH}'\n".encode(), _not_accepted("text"),
                 id="ffconcat-playlist"),
    pytest.param(lambda: (f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:4.0,\nfile://{_FIXTURE_PATH}\n"
                          "#EXT-X-ENDLIST\n").encode(), _not_accepted("text"), id="hls-playlist"),
    pytest.param(lambda: _media("ipod", "aac", 44100, "stereo", ())[:-3000],
                 "could not read the file as audio: it looks like MP4/M4A, but FFmpeg cannot open it "
                 "(Invalid data found when processing input); is it cut short or damaged?",
                 id="m4a-without-its-index"),
    pytest.param(lambda: _media("flac", "flac", 44100, "stereo", ())[:30],
                 "could not read the file as audio: it looks like FLAC, but FFmpeg cannot open it "
                 "(Invalid data found when processing input); is it cut short or damaged?", id="flac-header-cut"),
]


@pytest.mark.parametrize(("make", "message"), REFUSED)
@pytest.mark.parametrize("route", [TRANSCRIBE, OPENAI])
async def test_what_is_not_audio_gets_415(nursery: trio.Nursery, make: Any, message: str, route: str) -> None:
    """415 on sttd's route; on OpenAI's, the 400 in OpenAI's error shape that its SDKs raise
    as `BadRequestError`."""
    server = await start_server(nursery)
    response = await _post(server, route, "upload.bin", make(), model="whisper-1")
    error = {"code": "unsupported_media_type", "message": message}
    if route == OPENAI:
        assert response.status_code == 400, response.text
        error |= {"type": "invalid_request_error", "param": None}
    else:
        assert response.status_code == 415, response.text
    assert response.json() == {"error": error}
    await _assert_still_serving(server, errors={"unsupported_media_type": 1})


async def _assert_still_serving(server: RunningServer, *, errors: dict[str, int]) -> None:
    """A good upload still works, and the refusals were counted."""
    data = _media("ogg", "libopus", 48000, "stereo", ())
    response = await _post(server, TRANSCRIBE, "speech.opus", data)
    assert response.status_code == 200, response.text
    assert response.json()["text"] == " ".join(_expected_text())
    for code, count in errors.items():
        assert server.state.metrics.registry.get_sample_value("sttd_errors_total", {"code": code}) == count


def _with_streaminfo_samples(flac: bytes, total_samples: int) -> bytes:
    """A FLAC file whose STREAMINFO declares `total_samples` (0: unknown)."""
    # fLaC, a 4-byte block header, then 10 bytes before the 64 bits holding the sample rate
    # (20 bits), channels - 1 (3), bits - 1 (5) and the total samples (36).
    (packed,) = struct.unpack_from(">Q", flac, 18)
    packed = (packed & ~((1 << 36) - 1)) | total_samples
    return flac[:18] + struct.pack(">Q", packed) + flac[26:]


async def test_a_file_declaring_too_much_audio_gets_413(nursery: trio.Nursery) -> None:
    declared_s = MAX_MEDIA_AUDIO_S + 3600
    data = _with_streaminfo_samples(_media("flac", "flac", 44100, "stereo", ()), int(declared_s * 44100))
    server = await start_server(nursery)
    response = await _post(server, TRANSCRIBE, "bomb.flac", data)
    assert response.status_code == 413, response.text
    assert response.json() == {"error": {"code": "payload_too_large", "message":
        "the file's audio must be at most 14400 s long, it declares 18000.0 s"}}
    await _assert_still_serving(server, errors={"payload_too_large": 1})


# --- damaged files -----------------------------------------------------------------------------


def _packet_spans(data: bytes) -> list[tuple[float, int, int]]:
    """(start s, byte position, size) of each audio packet of `data`, in file order."""
    spans = []
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        assert stream.time_base is not None
        for packet in container.demux(stream):
            if packet.size and packet.pts is not None and packet.pos is not None:
                spans.append((float(packet.pts * stream.time_base), packet.pos, packet.size))
    return spans


def _pause_s() -> tuple[float, float]:
    """Where the pause between the two fixtures lies, in seconds."""
    start_s = 0.5 + load_pcm(FIRST).size / 16000
    return start_s, start_s + 1.0


async def test_a_file_cut_short_gives_what_it_holds(nursery: trio.Nursery) -> None:
    # Cut in the middle of the pause: the first fixture is whole, the second gone.
    data = _media("flac", "flac", 44100, "stereo", ())
    start_s, end_s = _pause_s()
    middle_s = (start_s + end_s) / 2
    cut_s, cut_at, _ = next(span for span in _packet_spans(data) if span[0] >= middle_s)
    server = await start_server(nursery)
    response = await _post(server, TRANSCRIBE, "cut.flac", data[:cut_at])
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["text"] == reference_texts()[FIRST]
    assert body["duration_ms"] == round(cut_s * 1000)


async def test_damaged_packets_are_skipped(nursery: trio.Nursery, caplog: pytest.LogCaptureFixture) -> None:
    # Garbage over the packets in the middle of the pause: the decoder skips what it cannot
    # decode and resyncs; both fixtures come through whole.
    data = bytearray(_media("ipod", "aac", 44100, "stereo", ()))
    start_s, end_s = _pause_s()
    damaged = [span for span in _packet_spans(bytes(data)) if start_s + 0.2 <= span[0] <= end_s - 0.3]
    rng = np.random.default_rng(3)
    for _, position, size in damaged:
        data[position : position + size] = rng.integers(0, 256, size, np.uint8).tobytes()
    server = await start_server(nursery)
    with caplog.at_level(logging.WARNING, logger="sttd.audio._media"):
        response = await _post(server, TRANSCRIBE, "damaged.m4a", bytes(data))
    assert response.status_code == 200, response.text
    assert [segment["text"] for segment in response.json()["segments"]] == _expected_text()
    [record] = [record for record in caplog.records if record.name == "sttd.audio._media"]
    assert record.getMessage().startswith(
        f"media.damaged format=mov,mp4,m4a,3gp,3g2,mj2 codec=aac packets_skipped={len(damaged)} ")


async def test_audio_that_never_decodes_gets_400(nursery: trio.Nursery) -> None:
    # An intact MP4 index over random bytes: every AAC packet fails.
    data = bytearray(_media("ipod", "aac", 44100, "stereo", ()))
    start, end = data.index(b"mdat") + 4, data.index(b"moov") - 4
    data[start:end] = np.random.default_rng(5).integers(0, 256, end - start, np.uint8).tobytes()
    server = await start_server(nursery)
    response = await _post(server, TRANSCRIBE, "noise.m4a", bytes(data))
    assert response.status_code == 400, response.text
    assert response.json() == {"error": {"code": "bad_audio", "message":
        "the MP4 file's aac audio is damaged: 50 packets in a row did not decode, after 0.0 s of "
        "audio (FFmpeg: Invalid data found when processing input)"}}
    await _assert_still_serving(server, errors={"bad_audio": 1})


# --- the reader, without the server --------------------------------------------------------------


def _read_all(reader: MediaReader | WavReader) -> npt.NDArray[np.float32]:
    return np.concatenate(list(reader))


def _stereo_s16(pcm: _Pcm, rate_hz: int) -> _Pcm:
    """`pcm` at `rate_hz`, as int16 (what a lossless file at that rate holds)."""
    resampled = soxr.resample(pcm16_to_float32(pcm), 16000, rate_hz)
    return np.clip(np.rint(resampled * 32768), -32768, 32767).astype(np.int16)


def _flac_s16(pcm: _Pcm, rate_hz: int, layout: str = "stereo") -> bytes:
    """FLAC of exactly the int16 samples `pcm`, on every channel of `layout`."""
    channels = av.AudioLayout(layout).nb_channels
    out = io.BytesIO()
    with av.open(out, mode="w", format="flac") as output:
        stream = output.add_stream("flac", rate=rate_hz, layout=layout)
        for offset in range(0, pcm.size, _FRAME_SAMPLES):
            chunk = np.repeat(pcm[offset : offset + _FRAME_SAMPLES], channels)[np.newaxis, :]
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="s16", layout=layout)
            frame.sample_rate = rate_hz
            frame.pts = offset
            output.mux(stream.encode(frame))
        output.mux(stream.encode(None))
    return out.getvalue()


def test_lossless_file_decodes_as_the_wav_path_does() -> None:
    # The same 44.1 kHz stereo samples as FLAC (FFmpeg) and as WAV (numpy): the same audio.
    pcm = _stereo_s16(_speech(), 44100)
    via_ffmpeg = _read_all(MediaReader.from_file(io.BytesIO(_flac_s16(pcm, 44100))))
    via_numpy = _read_all(WavReader.from_file(io.BytesIO(encode_wav(pcm16_to_float32(pcm), 44100, channels=2))))
    assert via_ffmpeg.dtype == np.float32
    assert via_ffmpeg.size == via_numpy.size == round(pcm.size * 16000 / 44100)
    np.testing.assert_allclose(via_ffmpeg, via_numpy, rtol=0, atol=1e-6)


def test_16k_mono_flac_is_bit_exact() -> None:
    pcm = _speech()
    decoded = _read_all(MediaReader.from_file(io.BytesIO(_flac_s16(pcm, 16000, "mono"))))
    np.testing.assert_array_equal(decoded, pcm16_to_float32(pcm))


@pytest.mark.parametrize("block_s", [0.37, 1.0, 2.5, 10.0])
@pytest.mark.parametrize(("container", "codec", "rate_hz"),
                         [("flac", "flac", 44100), ("ogg", "libopus", 48000)], ids=["flac", "opus"])
def test_blocks_have_the_asked_length(block_s: float, container: str, codec: str, rate_hz: int) -> None:
    data = _media(container, codec, rate_hz, "stereo", ())
    with MediaReader.from_file(io.BytesIO(data), block_s=block_s) as reader:
        sizes = [block.size for block in reader]
        assert reader.read_block() is None
    block_samples = round(block_s * 16000)
    assert sum(sizes) == _speech().size
    assert sizes[:-1] == [block_samples] * (len(sizes) - 1)
    assert 0 < sizes[-1] <= block_samples


def test_reader_starts_at_the_file_position_and_leaves_the_file_open() -> None:
    data = _media("ogg", "libopus", 48000, "stereo", ())
    expected = _read_all(MediaReader.from_file(io.BytesIO(data)))
    file = io.BytesIO(b"a prefix that is not part of the upload" + data)
    file.seek(len(b"a prefix that is not part of the upload"))
    with MediaReader.from_file(file) as reader:
        np.testing.assert_array_equal(_read_all(reader), expected)
    assert not file.closed


@pytest.mark.parametrize("on_disk", [False, True], ids=["in-memory", "on-disk"])
def test_index_at_the_end_from_a_spooled_file(on_disk: bool) -> None:
    data = _media("ipod", "aac", 44100, "stereo", ())
    expected = _read_all(MediaReader.from_file(io.BytesIO(data)))
    with tempfile.SpooledTemporaryFile(max_size=8 * 1024 * 1024) as spooled:
        spooled.write(data)
        if on_disk:
            spooled.rollover()
        spooled.seek(0)
        with MediaReader.from_file(spooled) as reader:  # type: ignore[arg-type]  # a binary file
            np.testing.assert_array_equal(_read_all(reader), expected)


def test_declared_duration_over_the_cap_is_refused_at_open() -> None:
    data = _media("flac", "flac", 44100, "stereo", ())
    with pytest.raises(PayloadTooLarge) as caught:
        MediaReader.from_file(io.BytesIO(data), max_duration_s=4.0)
    assert str(caught.value) == "the file's audio must be at most 4 s long, it declares 5.9 s"


def test_decoded_duration_over_the_cap_is_refused() -> None:
    # The same file with its length left unknown: the cap applies as it decodes.
    data = _with_streaminfo_samples(_media("flac", "flac", 44100, "stereo", ()), 0)
    blocks = []
    with MediaReader.from_file(io.BytesIO(data), block_s=1.0, max_duration_s=4.0) as reader:
        with pytest.raises(PayloadTooLarge) as caught:
            while (block := reader.read_block()) is not None:
                blocks.append(block)
    assert str(caught.value) == "the file's audio must be at most 4 s long; it decodes to more than that"
    assert sum(block.size for block in blocks) <= 4 * 16000


def test_long_file_decodes_in_bounded_memory() -> None:
    # Ten minutes of 44.1 kHz stereo FLAC: 38.4 MB once decoded to 16 kHz float32. The reader
    # holds one 10 s block (640 kB) and a packet's samples; the caller holds the previous block.
    minutes = 10
    block_bytes = 10 * 16000 * 4
    unit = np.concatenate((_speech(), silence(5.0)))
    pcm = np.resize(unit, minutes * 60 * 16000)
    data = encode_media(pcm, "flac", "flac", rate_hz=44100)
    decoded_bytes = pcm.size * 4
    tracemalloc.start()
    try:
        total = 0
        with MediaReader.from_file(io.BytesIO(data)) as reader:
            while (block := reader.read_block()) is not None:
                total += block.size
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == pcm.size
    assert decoded_bytes == 38_400_000
    assert peak < 3 * block_bytes, f"peak {peak} bytes"  # 1.92 MB, a twentieth of the audio


def test_sixteen_channels() -> None:
    # Opus decodes to planar float; PyAV's `to_ndarray` walks past the plane pointers of a
    # planar frame with 8 channels or more (and can crash), so the reader interleaves first.
    layout, frames, frame_samples = "16 channels", 10, 960
    tone = (0.5 * np.sin(2 * np.pi * 440 * np.arange(frames * frame_samples) / 48000)).astype(np.float32)
    out = io.BytesIO()
    with av.open(out, mode="w", format="ogg") as output:
        stream = output.add_stream("libopus", rate=48000, layout=layout, options={"mapping_family": "255"})
        for offset in range(0, tone.size, frame_samples):
            output.mux(stream.encode(_packed_frame(tone[offset : offset + frame_samples], 16, layout,
                                                   rate_hz=48000, pts=offset)))
        output.mux(stream.encode(None))
    with av.open(io.BytesIO(out.getvalue())) as container:
        decoder = container.streams.audio[0].codec_context
        assert (decoder.channels, decoder.format.name) == (16, "fltp")
    decoded = _read_all(MediaReader.from_file(io.BytesIO(out.getvalue())))
    assert decoded.size == frames * frame_samples // 3
    # Every channel holds the tone, so their mean does too (its RMS is 0.5 / sqrt(2)).
    assert float(np.sqrt(np.mean(decoded[1600:] ** 2))) == pytest.approx(0.5 / np.sqrt(2), rel=0.1)


# --- raw G.711 streams -------------------------------------------------------------------------


@pytest.mark.parametrize(("sample_format", "codec"), [("mulaw", "pcm_mulaw"), ("alaw", "pcm_alaw")])
def test_g711_code_words_decode_as_ffmpeg_decodes_them(sample_format: str, codec: str) -> None:
    """Every one of the 256 code words, through sttd's converter and FFmpeg's own decoder."""
    decoder = av.CodecContext.create(codec, "r")
    decoder.sample_rate, decoder.layout = 16000, "mono"
    frames = decoder.decode(av.Packet(bytes(range(256))))
    ffmpeg = np.concatenate([frame.to_ndarray().reshape(-1) for frame in frames])
    converter = StreamConverter.for_format(AudioFormat(16000, 1, sample_format))  # type: ignore[arg-type]
    ours = np.concatenate([converter.convert_pcm16(bytes(range(0, 100))),  # any chunking
                           converter.convert_pcm16(bytes(range(100, 256)), last=True)])
    assert ffmpeg.dtype == np.int16 and ffmpeg.size == 256
    assert ours.tolist() == ffmpeg.tolist()


# --- telephony WAVs: RIFF/WAVE whose encoding the numpy reader leaves to FFmpeg ----------------


@pytest.mark.parametrize("codec", ["pcm_mulaw", "pcm_alaw", "adpcm_ima_wav"])
async def test_telephony_wavs_go_to_ffmpeg(nursery: trio.Nursery, codec: str) -> None:
    data = encode_media(_speech(), "wav", codec, rate_hz=8000, layout="mono", options={})
    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE"
    server = await start_server(nursery)
    for route, form in ((TRANSCRIBE, {}), (OPENAI, {"model": "m"})):
        response = await _post(server, route, "call.wav", data, **form)
        assert response.status_code == 200, response.text
        assert response.json()["text"] == " ".join(_expected_text())
    # The numpy path still refuses what it cannot read, and says which encoding it was.
    broken = bytearray(data)
    broken[20:22] = (0x0055).to_bytes(2, "little")  # MPEG Layer 3 in a WAV of mu-law bytes
    response = await _post(server, TRANSCRIBE, "call.wav", bytes(broken))
    assert response.status_code in (400, 415), response.text
