"""Tests for sttd.audio: WAV decoding and encoding, PCM16 conversion and framing."""

from __future__ import annotations

import io
import struct
import tracemalloc

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sttd.audio import (
    SAMPLE_RATE_HZ,
    AudioFormat,
    StreamConverter,
    WavReader,
    decode_wav,
    encode_wav,
    float32_to_pcm16,
    pcm16_to_float32,
)
from sttd.errors import BadAudio, UnsupportedMedia

_FORMAT_PCM = 1
_FORMAT_FLOAT = 3
_FORMAT_EXTENSIBLE = 0xFFFE
_GUID_TAIL = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
_SINE_HZ = 440


def _chunk(chunk_id: bytes, body: bytes, size: int | None = None) -> bytes:
    """A RIFF chunk; `size` overrides the declared size (no pad byte is added then)."""
    if size is not None:
        return chunk_id + struct.pack("<I", size) + body
    return chunk_id + struct.pack("<I", len(body)) + body + b"\x00" * (len(body) & 1)


def _fmt(
    tag: int = _FORMAT_PCM,
    channels: int = 1,
    rate_hz: int = SAMPLE_RATE_HZ,
    bits: int = 16,
    block_align: int | None = None,
) -> bytes:
    align = channels * bits // 8 if block_align is None else block_align
    return _chunk(b"fmt ", struct.pack("<HHIIHH", tag, channels, rate_hz, (rate_hz * align) & 0xFFFFFFFF, align, bits))


def _extensible_fmt(subformat: int, bits: int = 16, channels: int = 1) -> bytes:
    align = channels * bits // 8
    body = struct.pack("<HHIIHH", _FORMAT_EXTENSIBLE, channels, SAMPLE_RATE_HZ, SAMPLE_RATE_HZ * align, align, bits)
    body += struct.pack("<HHIH", 22, bits, 0, subformat) + _GUID_TAIL
    return _chunk(b"fmt ", body)


def _riff(*chunks: bytes) -> bytes:
    body = b"".join(chunks)
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WAVE" + body


def _pcm16_bytes(*values: int) -> bytes:
    return np.array(values, dtype="<i2").tobytes()


def _signal(n: int, seed: int = 0) -> npt.NDArray[np.float32]:
    return np.random.default_rng(seed).uniform(-1.0, 1.0, n).astype(np.float32)


def _sine(rate_hz: int, duration_s: float = 1.0) -> npt.NDArray[np.float32]:
    t_s = np.arange(int(rate_hz * duration_s)) / rate_hz
    return (0.5 * np.sin(2 * np.pi * _SINE_HZ * t_s)).astype(np.float32)


def _assert_clean(x: npt.NDArray[np.float32]) -> None:
    assert x.dtype == np.float32
    assert x.ndim == 1
    assert x.flags["C_CONTIGUOUS"]
    assert np.all(np.isfinite(x))
    assert np.all(np.abs(x) <= 1.0)


_VALID_FMT = _fmt()
_SOME_DATA = _chunk(b"data", _pcm16_bytes(1, 2))


# --- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sample_format", "atol"),
    [
        ("pcm8", 1 / 2**7),
        ("pcm16", 1 / 2**15),
        ("pcm24", 1 / 2**23),
        ("pcm32", 1e-7),
        ("float32", 0.0),
        ("float64", 0.0),
    ],
)
@pytest.mark.parametrize("extensible", [False, True])
def test_round_trip_every_sample_format(sample_format: str, atol: float, extensible: bool) -> None:
    x = _signal(1001)  # odd length: 8-bit and 24-bit data chunks need a pad byte
    y = decode_wav(encode_wav(x, sample_format=sample_format, extensible=extensible))
    _assert_clean(y)
    assert y.shape == x.shape
    np.testing.assert_allclose(y, x, rtol=0, atol=atol)


def test_pcm16_round_trip_is_exact() -> None:
    codes = np.concatenate([np.array([-32768, -1, 0, 1, 32767], dtype=np.int16), np.arange(-32768, 32768, 7, dtype=np.int16)])
    x = pcm16_to_float32(codes)
    y = decode_wav(encode_wav(x))
    np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(float32_to_pcm16(y), codes)


def test_encode_wav_writes_canonical_header() -> None:
    wav = encode_wav(np.zeros(3, np.float32), 8000, sample_format="pcm24", channels=2)
    assert wav[:4] == b"RIFF" and wav[8:16] == b"WAVEfmt "
    assert struct.unpack_from("<IHHIIHH", wav, 16) == (16, _FORMAT_PCM, 2, 8000, 8000 * 6, 6, 24)
    assert wav[36:44] == b"data" + struct.pack("<I", 18)
    assert struct.unpack_from("<I", wav, 4)[0] == len(wav) - 8 == 36 + 18


def test_encode_wav_extensible_header() -> None:
    wav = encode_wav(np.zeros(2, np.float32), sample_format="float32", extensible=True)
    tag, subformat = struct.unpack_from("<H", wav, 20)[0], wav[44:60]
    assert tag == _FORMAT_EXTENSIBLE
    assert subformat == struct.pack("<H", _FORMAT_FLOAT) + _GUID_TAIL


def test_encode_wav_rejects_bad_arguments() -> None:
    x = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="sample_format"):
        encode_wav(x, sample_format="mp3")
    with pytest.raises(ValueError, match="channels"):
        encode_wav(x, channels=0)
    with pytest.raises(ValueError, match="sample_rate_hz"):
        encode_wav(x, 0)
    with pytest.raises(ValueError, match="1-D"):
        encode_wav(np.zeros((2, 2), np.float32))


# --- exact sample decoding -------------------------------------------------------------------


def test_pcm8_is_unsigned_with_offset_128() -> None:
    y = decode_wav(_riff(_fmt(bits=8), _chunk(b"data", bytes([0, 128, 255]))))
    np.testing.assert_array_equal(y, np.array([-1.0, 0.0, 127 / 128], np.float32))


def test_pcm24_sign_extends() -> None:
    raw = bytes.fromhex("000080" "ffff7f" "ffffff" "010000" "000000")
    y = decode_wav(_riff(_fmt(bits=24), _chunk(b"data", raw)))
    expected = np.array([-(2**23), 2**23 - 1, -1, 1, 0], np.float64) / 2**23
    np.testing.assert_array_equal(y, expected.astype(np.float32))


def test_pcm32_full_scale() -> None:
    raw = np.array([-(2**31), 2**30, 0], dtype="<i4").tobytes()
    y = decode_wav(_riff(_fmt(bits=32), _chunk(b"data", raw)))
    np.testing.assert_array_equal(y, np.array([-1.0, 0.5, 0.0], np.float32))


@pytest.mark.parametrize("sample_format", ["float32", "float64"])
def test_nan_and_inf_are_cleaned(sample_format: str) -> None:
    x = np.array([np.nan, np.inf, -np.inf, 2.0, -3.0, 0.5, 1e300 if sample_format == "float64" else 1e30])
    y = decode_wav(encode_wav(x, sample_format=sample_format))
    np.testing.assert_array_equal(y, np.array([0.0, 1.0, -1.0, 1.0, -1.0, 0.5, 1.0], np.float32))


# --- resampling and downmix ------------------------------------------------------------------


@pytest.mark.parametrize("rate_hz", [8000, 22050, 44100, 48000])
def test_resamples_to_16k_and_keeps_frequency(rate_hz: int) -> None:
    y = decode_wav(encode_wav(_sine(rate_hz), rate_hz, sample_format="float32"))
    _assert_clean(y)
    assert abs(len(y) - SAMPLE_RATE_HZ) <= 1  # one second of audio
    spectrum = np.abs(np.fft.rfft(y))
    peak_hz = np.argmax(spectrum) * SAMPLE_RATE_HZ / len(y)
    assert abs(peak_hz - _SINE_HZ) <= 1.0
    assert abs(np.max(np.abs(y[1000:-1000])) - 0.5) < 0.01  # amplitude kept away from the edges


def test_resampled_full_scale_square_wave_stays_in_range() -> None:
    square = np.where(_sine(44100) >= 0, 1.0, -1.0).astype(np.float32)
    y = decode_wav(encode_wav(square, 44100, sample_format="float32"))
    _assert_clean(y)  # the resampler rings past full scale; decode_wav clips it back
    assert np.max(np.abs(y)) == 1.0


def test_16k_input_is_not_resampled() -> None:
    x = pcm16_to_float32(np.arange(-100, 100, dtype=np.int16))
    np.testing.assert_array_equal(decode_wav(encode_wav(x)), x)


def test_stereo_opposite_channels_cancel() -> None:
    left = np.arange(-500, 500, 3, dtype=np.int16)
    frames = np.stack([left, -left], axis=1)
    y = decode_wav(_riff(_fmt(channels=2), _chunk(b"data", frames.astype("<i2").tobytes())))
    np.testing.assert_array_equal(y, np.zeros(len(left), np.float32))


@pytest.mark.parametrize("channels", [2, 6, 32])
def test_identical_channels_give_the_signal(channels: int) -> None:
    x = pcm16_to_float32(float32_to_pcm16(_signal(777)))
    y = decode_wav(encode_wav(x, sample_format="pcm16", channels=channels))
    np.testing.assert_allclose(y, x, rtol=0, atol=1e-7)


def test_six_channels_are_averaged() -> None:
    frames = np.array([[600, 0, 0, 0, 0, 0], [100, 200, 300, -600, 0, 6000]], dtype="<i2")
    y = decode_wav(_riff(_fmt(channels=6), _chunk(b"data", frames.tobytes())))
    np.testing.assert_allclose(y, np.array([100, 1000], np.float32) / 32768, rtol=1e-6)


# --- chunk walking ---------------------------------------------------------------------------


def test_unknown_chunks_before_between_and_after() -> None:
    data = _chunk(b"data", _pcm16_bytes(1, -2, 3))
    wav = _riff(
        _chunk(b"JUNK", b"\x00" * 28),
        _chunk(b"bext", b"x" * 7),  # odd size: followed by a pad byte
        _fmt(),
        _chunk(b"fact", struct.pack("<I", 3)),
        _chunk(b"LIST", b"INFOISFT\x05\x00\x00\x00abcde"),
        data,
        _chunk(b"LIST", b"odd"),
        _chunk(b"id3 ", b"\xff" * 10),
    )
    np.testing.assert_array_equal(decode_wav(wav), np.array([1, -2, 3], np.float32) / 32768)


def test_odd_sized_data_chunk_then_another_chunk() -> None:
    wav = _riff(_fmt(bits=8), _chunk(b"data", bytes([128, 192, 64])), _chunk(b"LIST", b"abcd"))
    np.testing.assert_array_equal(decode_wav(wav), np.array([0.0, 0.5, -0.5], np.float32))


def test_fmt_after_data_is_found() -> None:
    wav = _riff(_chunk(b"data", _pcm16_bytes(16384)), _fmt())
    np.testing.assert_array_equal(decode_wav(wav), np.array([0.5], np.float32))


@pytest.mark.parametrize("declared", [0xFFFFFFFF, 0, 1000])
def test_data_size_past_end_uses_whole_frames_present(declared: int) -> None:
    stereo = _pcm16_bytes(100, 300, -200, -400) + b"\x01\x02\x03"  # 2 frames + a partial one
    y = decode_wav(_riff(_fmt(channels=2), _chunk(b"data", stereo, size=declared)))
    np.testing.assert_array_equal(y, np.array([200, -300], np.float32) / 32768)


def test_declared_sizes_allocate_nothing() -> None:
    huge_data = _riff(_fmt(rate_hz=44100), _chunk(b"data", _pcm16_bytes(1, 2, 3), size=0xFFFFFFFF))
    huge_fmt = _riff(_chunk(b"fmt ", _fmt()[8:] + _SOME_DATA, size=0xFFFFFFF0))
    tracemalloc.start()
    try:
        assert decode_wav(huge_data).shape == (1,)  # 3 samples at 44.1 kHz -> 1 at 16 kHz
        with pytest.raises(BadAudio, match="'data' chunk"):  # the fmt chunk swallowed it
            decode_wav(huge_fmt)
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak_bytes < 1 << 20


def test_empty_data_chunk_gives_empty_array() -> None:
    for wav in (_riff(_fmt(), _chunk(b"data", b"")), _riff(_fmt(rate_hz=44100), _chunk(b"data", b"", size=0))):
        y = decode_wav(wav)
        assert y.dtype == np.float32 and y.shape == (0,)


def test_partial_frame_only_gives_empty_array() -> None:
    y = decode_wav(_riff(_fmt(bits=24, channels=2), _chunk(b"data", b"\x01\x02\x03\x04\x05")))
    assert y.dtype == np.float32 and y.shape == (0,)


# --- errors ----------------------------------------------------------------------------------



_NOT_WAVS = [
    b"",
    b"RIFF",
    b"RIFF\x00\x00\x00\x00WAV",
    b"ID3\x04\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00",
    b"OggS\x00\x02" + b"\x00" * 30,
    b"RIFX\x24\x00\x00\x00WAVEfmt ",
    b"RIFF\x24\x00\x00\x00AVI LIST",
    bytes(range(256)),
]


@pytest.mark.parametrize("data", _NOT_WAVS)
def test_not_riff_wave_is_unsupported_media(data: bytes) -> None:
    with pytest.raises(UnsupportedMedia, match=r"expected a WAV file \(RIFF/WAVE header\), got"):
        decode_wav(data)


_BROKEN_WAVS = [
    (_riff(), r"'fmt ' chunk.*found chunks \[\]"),
    (_riff(_SOME_DATA), r"'fmt ' chunk.*\['data'\]"),
    (_riff(_chunk(b"LIST", b"abcd"), _SOME_DATA), r"'fmt ' chunk.*\['LIST', 'data'\]"),
    (_riff(_VALID_FMT), r"'data' chunk.*\['fmt '\]"),
    (_riff(_VALID_FMT, _chunk(b"LIST", b"ab")), r"'data' chunk.*\['fmt ', 'LIST'\]"),
    (_riff(_chunk(b"fmt ", b"\x01\x00" * 7), _SOME_DATA), "fmt chunk must be at least 16 bytes, got 14"),
    (_riff(_chunk(b"fmt ", b"\x01\x00" * 5, size=16)), "fmt chunk must be at least 16 bytes, got 10"),
    (_riff(_fmt(tag=2, bits=4), _SOME_DATA), r"format tag must be 0x0001 \(PCM\) or 0x0003 \(IEEE float\), got 0x0002"),
    (_riff(_fmt(tag=6, bits=8), _SOME_DATA), "format tag .* got 0x0006"),
    (_riff(_fmt(tag=7, bits=8), _SOME_DATA), "format tag .* got 0x0007"),
    (_riff(_fmt(bits=12, block_align=2), _SOME_DATA), "^WAV bits_per_sample must be one of 8, 16, 24, 32 for PCM, got 12$"),
    (_riff(_fmt(tag=_FORMAT_FLOAT, bits=16), _SOME_DATA), "bits_per_sample must be one of 32, 64 for IEEE float, got 16"),
    (_riff(_fmt(bits=0, block_align=0), _SOME_DATA), "bits_per_sample .* got 0"),
    (_riff(_fmt(channels=0), _SOME_DATA), "channels must be between 1 and 32, got 0"),
    (_riff(_fmt(channels=33), _SOME_DATA), "channels must be between 1 and 32, got 33"),
    (_riff(_fmt(rate_hz=0), _SOME_DATA), "sample_rate_hz must be between 4000 and 384000, got 0"),
    (_riff(_fmt(rate_hz=384_001), _SOME_DATA), "sample_rate_hz .* got 384001"),
    (_riff(_fmt(rate_hz=0xFFFFFFFF, block_align=2), _SOME_DATA), "sample_rate_hz .* got 4294967295"),
    (_riff(_fmt(block_align=3), _SOME_DATA), r"block_align must be channels \* bits_per_sample / 8 = 2, got 3"),
    (_riff(_fmt(channels=2, block_align=0), _SOME_DATA), "block_align .* = 4, got 0"),
    (_riff(_fmt(tag=_FORMAT_EXTENSIBLE), _SOME_DATA), "at least 40 bytes for WAVE_FORMAT_EXTENSIBLE, got 16"),
    (_riff(_extensible_fmt(subformat=2), _SOME_DATA), "extensible SubFormat must be .* got 0x0002"),
    (_riff(_extensible_fmt(subformat=_FORMAT_PCM, bits=20), _SOME_DATA), "bits_per_sample .* for PCM, got 20"),
]


@pytest.mark.parametrize(("data", "message"), _BROKEN_WAVS)
def test_broken_wav_is_bad_audio(data: bytes, message: str) -> None:
    with pytest.raises(BadAudio, match=message):
        decode_wav(data)


# --- streaming reader ------------------------------------------------------------------------


class _ShortReads(io.RawIOBase):
    """A seekable file over `data` whose reads return at most `max_read` bytes; records each request."""

    def __init__(self, data: bytes, max_read: int) -> None:
        self._inner = io.BytesIO(data)
        self._max_read = max_read
        self.requests: list[int] = []

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]  # RawIOBase's buffer type is wider
        self.requests.append(len(buffer))
        data = self._inner.read(min(len(buffer), self._max_read))
        buffer[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._inner.seek(offset, whence)

    def tell(self) -> int:
        return self._inner.tell()


def _stream(data: bytes, *, block_s: float = 10.0, max_read: int | None = None) -> list[npt.NDArray[np.float32]]:
    file = io.BytesIO(data) if max_read is None else _ShortReads(data, max_read)
    return list(WavReader.from_file(file, block_s=block_s))  # type: ignore[arg-type]  # _ShortReads is a binary file


def _joined(blocks: list[npt.NDArray[np.float32]]) -> npt.NDArray[np.float32]:
    for block in blocks:
        _assert_clean(block)
        assert block.size > 0
    return np.concatenate([np.zeros(0, np.float32), *blocks])


@pytest.mark.parametrize("sample_format", ["pcm8", "pcm16", "pcm24", "pcm32", "float32", "float64"])
@pytest.mark.parametrize("rate_hz", [8000, 16000, 22050, 44100, 48000])
@pytest.mark.parametrize(("channels", "extensible"), [(1, False), (2, False), (6, True)])
def test_reader_blocks_join_to_decode_wav(sample_format: str, rate_hz: int, channels: int, extensible: bool) -> None:
    data = encode_wav(_signal(rate_hz * 2 + 7), rate_hz, sample_format=sample_format, channels=channels,
                      extensible=extensible)
    expected = decode_wav(data)
    blocks = _stream(data, block_s=0.3)  # many blocks, each an odd number of input frames at 44.1 kHz
    assert len(blocks) == 7  # 2 s in 0.3 s blocks; the resampler flushes with the last
    np.testing.assert_array_equal(_joined(blocks), expected)  # the stream resampler is exact across blocks


def test_reader_blocks_have_the_asked_length() -> None:
    x = pcm16_to_float32(float32_to_pcm16(_signal(SAMPLE_RATE_HZ * 25)))
    blocks = _stream(encode_wav(x), block_s=10.0)
    assert [block.size for block in blocks] == [160_000, 160_000, 80_000]
    np.testing.assert_array_equal(np.concatenate(blocks), x)


def test_reader_reads_at_most_4_mib_per_block() -> None:
    data = encode_wav(_signal(40_000), 384_000, sample_format="float64", channels=32)  # 0.1 s in 10_240_000 bytes
    file = _ShortReads(data, max_read=len(data))
    blocks = list(WavReader.from_file(file, block_s=10.0))  # type: ignore[arg-type]  # a binary file
    # The RIFF header, the fmt header and body, the data header, then the data in 4 MiB reads up
    # to its declared size.
    assert file.requests == [12, 8, 16, 8, 4 * 1024 * 1024, 4 * 1024 * 1024, 10_240_000 - 8 * 1024 * 1024]
    np.testing.assert_array_equal(_joined(blocks), decode_wav(data))


_WALKED_WAVS = [
    pytest.param(
        _riff(
            _chunk(b"JUNK", b"\x00" * 28),
            _chunk(b"bext", b"x" * 7),
            _fmt(channels=2, rate_hz=22050),
            _chunk(b"LIST", b"INFOISFT\x05\x00\x00\x00abcde"),
            _chunk(b"data", _pcm16_bytes(*range(-3000, 3000, 7))),
            _chunk(b"id3 ", b"\xff" * 10),
        ),
        id="unknown-chunks",
    ),
    pytest.param(_riff(_fmt(bits=8), _chunk(b"data", bytes(range(0, 255, 2))), _chunk(b"LIST", b"abcd")), id="odd-data"),
    pytest.param(_riff(_chunk(b"data", _pcm16_bytes(*range(0, 9000, 9))), _fmt()), id="fmt-after-data"),
    pytest.param(_riff(_fmt(channels=2), _chunk(b"data", _pcm16_bytes(1, 3, 5, 7, 9) + b"\x01", size=0)), id="size-0"),
    pytest.param(
        _riff(_fmt(channels=2, rate_hz=44100), _chunk(b"data", _pcm16_bytes(*range(999)), size=0xFFFFFFFF)),
        id="size-ffffffff",
    ),
    pytest.param(_riff(_fmt(bits=24), _chunk(b"data", bytes(range(200)), size=1000)), id="size-past-eof"),
    pytest.param(_riff(_fmt(rate_hz=44100), _chunk(b"data", b"", size=0)), id="empty"),
    pytest.param(_riff(_fmt(bits=24, channels=2), _chunk(b"data", b"\x01\x02\x03\x04\x05")), id="partial-frame"),
]


@pytest.mark.parametrize("data", _WALKED_WAVS)
@pytest.mark.parametrize("max_read", [1, 3, 8, 4096])
def test_reader_walks_chunks_like_decode_wav_with_any_read_size(data: bytes, max_read: int) -> None:
    expected = decode_wav(data)
    np.testing.assert_array_equal(_joined(_stream(data, block_s=0.01, max_read=max_read)), expected)
    np.testing.assert_array_equal(_joined(_stream(data)), expected)


def test_reader_starts_at_the_file_position_and_leaves_the_file_open() -> None:
    wav = encode_wav(_signal(5000), 22050, sample_format="pcm24")
    file = io.BytesIO(b"preamble" + wav + b"trailer")
    file.seek(len(b"preamble"))
    np.testing.assert_array_equal(_joined(list(WavReader.from_file(file, block_s=0.05))), decode_wav(wav))
    assert not file.closed


def test_reader_read_block_returns_none_at_the_end() -> None:
    reader = WavReader.from_file(io.BytesIO(encode_wav(_signal(100))))
    first = reader.read_block()
    assert first is not None and first.shape == (100,)
    assert reader.read_block() is None
    assert reader.read_block() is None


@pytest.mark.parametrize("data", _NOT_WAVS)
def test_reader_refuses_what_decode_wav_refuses_as_unsupported_media(data: bytes) -> None:
    with pytest.raises(UnsupportedMedia) as whole:
        decode_wav(data)
    with pytest.raises(UnsupportedMedia) as streamed:
        WavReader.from_file(_ShortReads(data, max_read=5))  # type: ignore[arg-type]  # a binary file
    assert str(streamed.value) == str(whole.value)


@pytest.mark.parametrize(("data", "message"), _BROKEN_WAVS)
def test_reader_refuses_what_decode_wav_refuses_as_bad_audio(data: bytes, message: str) -> None:
    with pytest.raises(BadAudio) as whole:
        decode_wav(data)
    with pytest.raises(BadAudio, match=message) as streamed:
        WavReader.from_file(_ShortReads(data, max_read=5))  # type: ignore[arg-type]  # a binary file
    assert str(streamed.value) == str(whole.value)


def test_reader_declared_sizes_allocate_nothing() -> None:
    huge_data = _riff(_fmt(rate_hz=44100), _chunk(b"data", _pcm16_bytes(1, 2, 3), size=0xFFFFFFFF))
    huge_fmt = _riff(_chunk(b"fmt ", _fmt()[8:] + _SOME_DATA, size=0xFFFFFFF0))
    tracemalloc.start()
    try:
        assert [block.shape for block in _stream(huge_data)] == [(1,)]
        with pytest.raises(BadAudio, match="'data' chunk"):
            WavReader.from_file(io.BytesIO(huge_fmt))
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak_bytes < 1 << 20


@pytest.mark.parametrize("block_s", [0.0, -1.0, float("nan")])
def test_reader_rejects_a_bad_block_length(block_s: float) -> None:
    with pytest.raises(ValueError, match=f"^block_s must be > 0, got {block_s!r}$"):
        WavReader.from_file(io.BytesIO(encode_wav(_signal(10))), block_s=block_s)


# --- PCM16 helpers and the framer ------------------------------------------------------------


def test_pcm16_float32_conversions() -> None:
    pcm = np.array([-32768, -16384, 0, 1, 32767], dtype=np.int16)
    f = pcm16_to_float32(pcm)
    assert f.dtype == np.float32
    np.testing.assert_array_equal(f, np.array([-1.0, -0.5, 0.0, 1 / 32768, 32767 / 32768], np.float32))
    x = np.array([1.0, -1.0, 2.0, -2.0, np.nan, 0.5, 0.25 / 32768, 0.75 / 32768, np.inf], np.float32)
    q = float32_to_pcm16(x)
    assert q.dtype == np.int16
    np.testing.assert_array_equal(q, np.array([32767, -32768, 32767, -32768, 0, 16384, 0, 1, 32767], np.int16))
    every = np.arange(-32768, 32768, dtype=np.int16)
    np.testing.assert_array_equal(float32_to_pcm16(pcm16_to_float32(every)), every)


def test_pcm16_to_float32_rejects_other_dtypes() -> None:
    with pytest.raises(ValueError, match="int16, got int32"):
        pcm16_to_float32(np.zeros(2, np.int32))


def _framer() -> StreamConverter:
    """The converter a native session uses: 16 kHz mono PCM16 in, int16 out."""
    return StreamConverter.for_format(AudioFormat())


def test_framer_carries_odd_byte() -> None:
    framer = _framer()
    assert not framer.costly
    first = framer.convert_pcm16(b"\x01\x02\x03")
    assert first.dtype == np.int16
    np.testing.assert_array_equal(first, np.array([0x0201], np.int16))
    assert framer.pending_bytes == 1
    np.testing.assert_array_equal(framer.convert_pcm16(b"\xff"), np.array([-253], np.int16))  # 0xff03
    assert framer.pending_bytes == 0
    assert framer.convert_pcm16(b"").shape == (0,)
    assert framer.convert_pcm16(b"\x80").shape == (0,)
    assert framer.pending_bytes == 1
    np.testing.assert_array_equal(framer.convert_pcm16(b"\x00\xff\xff"), np.array([128, -1], np.int16))
    assert framer.pending_bytes == 0


def test_framer_output_does_not_alias_input() -> None:
    buf = bytearray(b"\x01\x00\x02\x00")
    out = _framer().convert_pcm16(buf)
    buf[0] = 9
    out[1] = 7  # writeable: a copy, not a read-only view of the bytes
    np.testing.assert_array_equal(out, np.array([1, 7], np.int16))


@given(data=st.binary(max_size=200), cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=12))
def test_framer_any_split_matches_one_feed(data: bytes, cuts: list[int]) -> None:
    bounds = [0, *sorted(min(c, len(data)) for c in cuts), len(data)]
    framer = _framer()
    parts = [framer.convert_pcm16(data[a:b]) for a, b in zip(bounds, bounds[1:])]
    expected = np.frombuffer(data[: len(data) - len(data) % 2], dtype="<i2")
    np.testing.assert_array_equal(np.concatenate([np.zeros(0, np.int16), *parts]), expected)
    assert framer.pending_bytes == len(data) % 2


@pytest.mark.parametrize("rate_hz, channels", [(8000, 1), (48000, 2), (44100, 6), (16000, 2)])
@given(cuts=st.lists(st.integers(min_value=0, max_value=4800), max_size=8))
@settings(max_examples=20, deadline=None)
def test_converter_any_split_matches_one_call(rate_hz: int, channels: int, cuts: list[int]) -> None:
    """The converter every live stream and file goes through: chunks of any size, partial
    frames among them, give exactly the samples of one call over the whole stream."""
    rng = np.random.default_rng(rate_hz + channels)
    data = (rng.normal(0, 8000, rate_hz // 10 * channels).clip(-32768, 32767)
            .astype("<i2").tobytes() + b"\x07")  # a partial frame at the very end
    fmt = AudioFormat(rate_hz, channels)
    whole = StreamConverter.for_format(fmt).convert_pcm16(data, last=True)
    converter = StreamConverter.for_format(fmt)
    assert converter.costly
    bounds = [0, *sorted(min(c, len(data)) for c in cuts), len(data)]
    parts = [converter.convert_pcm16(data[a:b]) for a, b in zip(bounds, bounds[1:])]
    parts.append(converter.convert_pcm16(b"", last=True))
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    assert whole.size == pytest.approx(len(data) // (2 * channels) * SAMPLE_RATE_HZ / rate_hz,
                                       abs=2)
    assert converter.pending_bytes == 0


def test_converter_downmixes_and_resamples_like_a_wav_file() -> None:
    """A stereo 48 kHz stream converted live equals the same audio read as a WAV file."""
    tone = (0.5 * np.sin(2 * np.pi * 440 * np.arange(48000) / 48000)).astype(np.float32)
    wav = encode_wav(tone, 48000, channels=2)
    pcm = wav[44:]  # the data chunk of encode_wav's canonical header
    live = StreamConverter.for_format(AudioFormat(48000, 2)).convert_pcm16(pcm, last=True)
    np.testing.assert_array_equal(live, float32_to_pcm16(decode_wav(wav)))


# --- fuzzing ---------------------------------------------------------------------------------


def _decode_or_refuse(data: bytes) -> None:
    """decode_wav and WavReader both refuse `data` with the same error, or decode it alike."""
    try:
        y = decode_wav(data)
    except (UnsupportedMedia, BadAudio) as whole:
        with pytest.raises(type(whole)) as streamed:
            _stream(data, block_s=0.01)
        assert str(streamed.value) == str(whole)
        return
    _assert_clean(y)
    np.testing.assert_array_equal(_joined(_stream(data, block_s=0.01, max_read=7)), y)


_fmt_fields = st.builds(
    _fmt,
    tag=st.sampled_from([_FORMAT_PCM, _FORMAT_FLOAT, 2, _FORMAT_EXTENSIBLE]),
    channels=st.integers(0, 8),
    rate_hz=st.sampled_from([0, 1, 8000, 11025, SAMPLE_RATE_HZ, 44100, 384_000]),
    bits=st.sampled_from([8, 12, 16, 24, 32, 64]),
)


@settings(deadline=None)
@given(st.binary(max_size=512))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    _decode_or_refuse(data)


@settings(deadline=None)
@given(st.binary(max_size=512))
def test_fuzz_riff_wave_then_arbitrary_bytes(tail: bytes) -> None:
    _decode_or_refuse(b"RIFF\xff\xff\xff\xffWAVE" + tail)


@settings(deadline=None)
@given(fmt=_fmt_fields, data_size=st.sampled_from([0, 7, 0xFFFFFFFF, None]), tail=st.binary(max_size=512))
def test_fuzz_valid_header_then_arbitrary_bytes(fmt: bytes, data_size: int | None, tail: bytes) -> None:
    _decode_or_refuse(_riff(fmt, _chunk(b"data", tail, size=data_size)))


@settings(deadline=None)
@given(
    sample_format=st.sampled_from(["pcm8", "pcm16", "pcm24", "pcm32", "float32", "float64"]),
    extensible=st.booleans(),
    position=st.integers(0, 79),
    value=st.integers(0, 255),
)
def test_fuzz_corrupt_one_header_byte(sample_format: str, extensible: bool, position: int, value: int) -> None:
    wav = bytearray(encode_wav(_signal(64), 8000, sample_format=sample_format, channels=2, extensible=extensible))
    header_bytes = 68 if extensible else 44
    wav[position % header_bytes] = value
    _decode_or_refuse(bytes(wav))
