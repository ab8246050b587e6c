"""Fuzzing the WAV parser and the PCM16 framer with hypothesis (issue 6, bad input).

Every input must end one of three ways: `UnsupportedMedia` (not RIFF/WAVE), `BadAudio` with a
message naming what is broken, or finite 16 kHz mono float32 samples in [-1, 1]. `WavReader`,
read in odd block lengths through short reads, must agree with `decode_wav` on all of them: the
same error message, or the same samples. Where the right answer is known (a header field out of
range, a size that lies, a file cut short) the tests assert exactly that answer.
"""

from __future__ import annotations

import struct
from typing import Final

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sttd.audio import (
    SAMPLE_RATE_HZ,
    AudioFormat,
    StreamConverter,
    WavReader,
    decode_wav,
    encode_wav,
)
from sttd.errors import BadAudio, UnsupportedMedia

_EXAMPLES: Final = 300
_FUZZ = settings(max_examples=_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_PCM: Final = 0x0001
_FLOAT: Final = 0x0003
_EXTENSIBLE: Final = 0xFFFE
_GUID_TAIL: Final = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
_U32_MAX: Final = 0xFFFFFFFF
_MAX_ERROR_CHARS: Final = 300  # an error message is a sentence, not a dump of the input
# Declared sizes a broken or streaming writer leaves behind.
_LYING_SIZES = st.one_of(
    st.sampled_from([0, 1, 2, 3, 0x7FFFFFFF, 0x80000000, _U32_MAX - 1, _U32_MAX]),
    st.integers(0, _U32_MAX),
)
_Samples = npt.NDArray[np.float32]


# --- building RIFF files -------------------------------------------------------------------------


def _chunk(chunk_id: bytes, body: bytes, *, size: int | None = None, pad: bool = True) -> bytes:
    """A chunk; `size` replaces the declared size, and `pad` False leaves out an odd body's pad byte."""
    declared = len(body) if size is None else size
    return chunk_id + struct.pack("<I", declared) + body + b"\x00" * (len(body) & 1 if pad else 0)


def _riff(*chunks: bytes, size: int | None = None) -> bytes:
    body = b"".join(chunks)
    return b"RIFF" + struct.pack("<I", 4 + len(body) if size is None else size) + b"WAVE" + body


def _fmt_body(tag: int, channels: int, rate_hz: int, bits: int, block_align: int | None = None,
              subformat: int | None = None) -> bytes:
    align = (channels * bits // 8) & 0xFFFF if block_align is None else block_align
    body = struct.pack("<HHIIHH", tag, channels, rate_hz, (rate_hz * align) & _U32_MAX, align, bits)
    if subformat is not None:
        body += struct.pack("<HHIH", 22, bits, 0, subformat) + _GUID_TAIL
    return body


def _pcm16(values: npt.NDArray[np.int16]) -> bytes:
    return values.astype("<i2").tobytes()


_FORMATS = st.sampled_from(["pcm8", "pcm16", "pcm24", "pcm32", "float32", "float64"])
_RATES_HZ = st.sampled_from([4000, 8000, 11025, SAMPLE_RATE_HZ, 22050, 44100, 48000, 96000])


@st.composite
def _valid_wavs(draw: st.DrawFn, *, rates_hz: st.SearchStrategy[int] = _RATES_HZ) -> bytes:
    """A well-formed WAV file in any supported encoding, 0 to 300 frames long."""
    samples = np.asarray(draw(st.lists(st.floats(-1.0, 1.0, width=32), max_size=300)), np.float32)
    return encode_wav(samples, draw(rates_hz), sample_format=draw(_FORMATS),
                      channels=draw(st.integers(1, 4)), extensible=draw(st.booleans()))


# --- the oracle both readers must satisfy --------------------------------------------------------


class _Trickle:
    """A seekable binary file over `data` whose reads return at most `max_read` bytes."""

    def __init__(self, data: bytes, max_read: int) -> None:
        self._data = data
        self._position = 0
        self._max_read = max_read

    def read(self, size: int = -1) -> bytes:
        end = len(self._data) if size < 0 else self._position + min(size, self._max_read)
        part = self._data[self._position : end]
        self._position += len(part)
        return part

    def seek(self, offset: int, whence: int = 0) -> int:
        assert whence == 0, "the reader only seeks to absolute positions"
        self._position = offset
        return offset

    def tell(self) -> int:
        return self._position


def _assert_clean(samples: _Samples) -> None:
    assert samples.dtype == np.float32
    assert samples.ndim == 1
    assert np.all(np.isfinite(samples)), "NaN or Inf reached the decoded audio"
    assert np.all(np.abs(samples) <= 1.0)


def _assert_clear(error: UnsupportedMedia | BadAudio) -> None:
    message = str(error)
    assert message.startswith(("WAV ", "expected a WAV file"))
    assert len(message) <= _MAX_ERROR_CHARS, message
    message.encode("utf-8")  # it goes into a JSON body as UTF-8


def _decode_both(data: bytes, *, block_s: float = 0.01, max_read: int = 7) -> _Samples | UnsupportedMedia | BadAudio:
    """`decode_wav`'s samples or error, after checking that `WavReader` gives the same."""
    try:
        whole: _Samples | UnsupportedMedia | BadAudio = decode_wav(data)
    except (UnsupportedMedia, BadAudio) as exc:
        whole = exc
    try:
        blocks = list(WavReader.from_file(_Trickle(data, max_read), block_s=block_s))  # type: ignore[arg-type]  # a binary file
    except (UnsupportedMedia, BadAudio) as exc:
        assert type(exc) is type(whole) and str(exc) == str(whole)
        _assert_clear(exc)
        return exc
    assert isinstance(whole, np.ndarray), f"WavReader accepted what decode_wav refused: {whole}"
    for block in blocks:
        _assert_clean(block)
        assert block.size > 0
    _assert_clean(whole)
    np.testing.assert_array_equal(np.concatenate([np.zeros(0, np.float32), *blocks]), whole)
    return whole


def _assert_bad_audio(outcome: object, match: str) -> None:
    assert isinstance(outcome, BadAudio), f"expected BadAudio matching {match!r}, got {outcome!r}"
    assert match in str(outcome), str(outcome)


# --- a grammar of broken files -------------------------------------------------------------------


_CHUNK_IDS = st.one_of(st.sampled_from([b"fmt ", b"data", b"LIST", b"JUNK", b"fact", b"FMT ", b"dat"]),
                       st.binary(min_size=4, max_size=4))


@st.composite
def _fmt_bodies(draw: st.DrawFn) -> bytes:
    """`fmt ` bodies from plausible to absurd: any tag, channels, rate, bits and alignment."""
    tag = draw(st.sampled_from([_PCM, _FLOAT, _EXTENSIBLE, 0x0000, 0x0002, 0x0006, 0x0011, 0xFFFF]))
    bits = draw(st.sampled_from([0, 1, 4, 8, 12, 16, 20, 24, 32, 48, 64, 0xFFFF]))
    channels = draw(st.sampled_from([0, 1, 2, 6, 32, 33, 0xFFFF]))
    rate_hz = draw(st.sampled_from([0, 1, 3999, 4000, 8000, SAMPLE_RATE_HZ, 44100, 384_000, 384_001, _U32_MAX]))
    align = draw(st.none() | st.integers(0, 0xFFFF))
    subformat = draw(st.sampled_from([_PCM, _FLOAT, 0x0002])) if tag == _EXTENSIBLE else None
    body = _fmt_body(tag, channels, rate_hz, bits, align, subformat)
    cut = draw(st.sampled_from([None, None, None, 0, 2, 14, 15, 16, 18, 39]))
    return body if cut is None else body[:cut]


@st.composite
def _chunks(draw: st.DrawFn) -> bytes:
    chunk_id = draw(_CHUNK_IDS)
    if chunk_id == b"fmt ":
        body = draw(_fmt_bodies())
    else:
        # Data that holds NaN and Inf as float32 and float64, and plain bytes.
        specials = struct.pack("<ffdd", float("nan"), float("inf"), float("-inf"), 1e300)
        body = draw(st.sampled_from([b"", specials]) | st.binary(max_size=200))
    size = draw(st.none() | _LYING_SIZES)
    return _chunk(chunk_id, body, size=size, pad=draw(st.booleans()))


@_FUZZ
@given(chunks=st.lists(_chunks(), max_size=6), riff_size=st.none() | _LYING_SIZES,
       cut=st.none() | st.integers(0, 2000), block_s=st.floats(1e-4, 20.0), max_read=st.integers(1, 64))
def test_chunk_grammar(chunks: list[bytes], riff_size: int | None, cut: int | None, block_s: float,
                       max_read: int) -> None:
    data = _riff(*chunks, size=riff_size)[:cut]
    outcome = _decode_both(data, block_s=block_s, max_read=max_read)
    if isinstance(outcome, np.ndarray):
        # Nothing is allocated from a declared size: the output is bounded by the input (the most
        # upsampling is 4 kHz to 16 kHz, one 8-bit channel per byte).
        assert outcome.size <= 4 * len(data) + 16


@_FUZZ
@given(data=st.binary(max_size=600), prefix=st.sampled_from([b"", b"RIFF", b"RIFF\xff\xff\xff\xffWAVE",
                                                             b"RIFF\x00\x00\x00\x00WAVEfmt "]))
def test_arbitrary_bytes(data: bytes, prefix: bytes) -> None:
    outcome = _decode_both(prefix + data)
    if not (prefix + data).startswith(b"RIFF") or (prefix + data)[8:12] != b"WAVE":
        assert isinstance(outcome, UnsupportedMedia)


# --- header fields -------------------------------------------------------------------------------


def _expected_fmt_error(tag: int, channels: int, rate_hz: int, bits: int, align: int) -> str | None:
    """What `_parse_fmt` must say about these fields, checked in its order; None if valid."""
    if tag not in (_PCM, _FLOAT):
        return "format tag must be 0x0001 (PCM) or 0x0003 (IEEE float)"
    allowed = (32, 64) if tag == _FLOAT else (8, 16, 24, 32)
    if bits not in allowed:
        return f"bits_per_sample must be one of {', '.join(map(str, allowed))}"
    if not 1 <= channels <= 32:
        return f"channels must be between 1 and 32, got {channels}"
    if not 4000 <= rate_hz <= 384_000:
        return f"sample_rate_hz must be between 4000 and 384000, got {rate_hz}"
    if align != channels * bits // 8:
        return f"block_align must be channels * bits_per_sample / 8 = {channels * bits // 8}, got {align}"
    return None


@_FUZZ
@given(
    tag=st.sampled_from([_PCM, _FLOAT]) | st.integers(0, 0xFFFF).filter(lambda t: t != _EXTENSIBLE),
    channels=st.sampled_from([0, 1, 2, 32, 33, 0xFFFF]) | st.integers(0, 0xFFFF),
    rate_hz=st.sampled_from([0, 3999, 4000, 44100, 384_000, 384_001, _U32_MAX]) | st.integers(0, _U32_MAX),
    bits=st.sampled_from([0, 8, 16, 24, 32, 64, 0xFFFF]) | st.integers(0, 0xFFFF),
    align_delta=st.sampled_from([0, 0, 0, 1, -1]) | st.integers(-70000, 70000),
)
def test_every_fmt_field_is_checked(tag: int, channels: int, rate_hz: int, bits: int, align_delta: int) -> None:
    align = channels * bits // 8 + align_delta
    if not 0 <= align <= 0xFFFF:
        align = 0
    data = _riff(_chunk(b"fmt ", _fmt_body(tag, channels, rate_hz, bits, align)),
                 _chunk(b"data", bytes(64)))
    outcome = _decode_both(data)
    expected = _expected_fmt_error(tag, channels, rate_hz, bits, align)
    if expected is None:
        assert isinstance(outcome, np.ndarray)
    else:
        _assert_bad_audio(outcome, expected)


@_FUZZ
@given(subformat=st.integers(0, 0xFFFF), bits=st.sampled_from([8, 16, 20, 24, 32, 64]),
       cut=st.integers(16, 40))
def test_extensible_fmt_uses_its_subformat(subformat: int, bits: int, cut: int) -> None:
    body = _fmt_body(_EXTENSIBLE, 1, SAMPLE_RATE_HZ, bits, subformat=subformat)[:cut]
    outcome = _decode_both(_riff(_chunk(b"fmt ", body), _chunk(b"data", bytes(64))))
    if cut < 40:
        _assert_bad_audio(outcome, f"at least 40 bytes for WAVE_FORMAT_EXTENSIBLE, got {cut}")
        return
    expected = _expected_fmt_error(subformat, 1, SAMPLE_RATE_HZ, bits, bits // 8)
    if expected is None:
        assert isinstance(outcome, np.ndarray)
    else:
        _assert_bad_audio(outcome, expected.replace("format tag", "extensible SubFormat"))


# --- sizes that lie ------------------------------------------------------------------------------


@_FUZZ
@given(values=st.lists(st.integers(-32768, 32767), max_size=100), riff_size=_LYING_SIZES)
def test_riff_size_is_ignored(values: list[int], riff_size: int) -> None:
    pcm = np.array(values, np.int16)
    chunks = (_chunk(b"fmt ", _fmt_body(_PCM, 1, SAMPLE_RATE_HZ, 16)), _chunk(b"data", _pcm16(pcm)))
    np.testing.assert_array_equal(_decode_both(_riff(*chunks, size=riff_size)),
                                  pcm.astype(np.float32) / 32768)


@_FUZZ
@given(values=st.lists(st.integers(-32768, 32767), max_size=100), declared=_LYING_SIZES,
       trailer=st.sampled_from([b"", _chunk(b"LIST", b"INFOabcd"), b"\x01"]), channels=st.sampled_from([1, 2]))
def test_data_size_that_lies(values: list[int], declared: int, trailer: bytes, channels: int) -> None:
    """The declared size bounds the data; 0, and sizes past the end, read to the end of the file."""
    payload = _pcm16(np.array(values, np.int16)) + trailer
    data = _riff(_chunk(b"fmt ", _fmt_body(_PCM, channels, SAMPLE_RATE_HZ, 16)),
                 _chunk(b"data", payload, size=declared, pad=False))
    used = payload if declared == 0 or declared >= len(payload) else payload[:declared]
    frames = np.frombuffer(used[: len(used) - len(used) % (2 * channels)], "<i2").reshape(-1, channels)
    expected = (frames.astype(np.float32) / np.float32(32768)).mean(axis=1, dtype=np.float32)
    np.testing.assert_array_equal(_decode_both(data), expected)


@_FUZZ
@given(declared=st.integers(40, _U32_MAX), before=st.sampled_from(["fmt", "data"]))
def test_chunk_past_the_end_hides_what_follows(declared: int, before: str) -> None:
    """An unknown chunk whose size runs past what follows it swallows the chunks after it."""
    fmt = _chunk(b"fmt ", _fmt_body(_PCM, 1, SAMPLE_RATE_HZ, 16))
    data = _chunk(b"data", bytes(8))
    junk = _chunk(b"JUNK", b"", size=declared)  # a body shorter than `declared`: the rest follows
    rest = fmt + data if before == "fmt" else data
    assert declared >= len(rest)  # the size runs past the end of the file
    outcome = _decode_both(_riff(junk, rest) if before == "fmt" else _riff(fmt, junk, rest))
    if before == "fmt":
        _assert_bad_audio(outcome, "must have a 'fmt ' chunk before its data, found chunks ['JUNK']")
    else:
        _assert_bad_audio(outcome, "must have a 'data' chunk, found chunks ['fmt ', 'JUNK']")


@_FUZZ
@given(wav=_valid_wavs(rates_hz=st.just(SAMPLE_RATE_HZ)), cut=st.integers(0, 10_000))
def test_truncated_anywhere(wav: bytes, cut: int) -> None:
    """A file cut short refuses cleanly in its header, and gives the whole frames before the cut in its data."""
    cut = cut % (len(wav) + 1)
    outcome = _decode_both(wav[:cut])
    (fmt_size,) = struct.unpack_from("<I", wav, 16)
    data_start = 12 + 8 + fmt_size + 8
    if cut < 12:
        assert isinstance(outcome, UnsupportedMedia)
    elif cut < 20:
        _assert_bad_audio(outcome, "must have a 'fmt ' chunk")
    elif cut < 20 + min(fmt_size, 40):
        _assert_bad_audio(outcome, "fmt chunk must be at least")
    elif cut < data_start:
        _assert_bad_audio(outcome, "must have a 'data' chunk, found chunks ['fmt ']")
    else:
        full = decode_wav(wav)
        (channels, _rate, _byte_rate, align) = struct.unpack_from("<HIIH", wav, 22)
        frames = (cut - data_start) // align
        assert isinstance(outcome, np.ndarray) and channels >= 1
        np.testing.assert_array_equal(outcome, full[:frames])


# --- chunk order, missing chunks, padding --------------------------------------------------------


@_FUZZ
@given(others=st.lists(st.tuples(st.sampled_from([b"LIST", b"JUNK", b"fact", b"FMT ", b"Data"]),
                                 st.binary(max_size=20)), max_size=4),
       missing=st.sampled_from(["fmt", "data", "both"]))
def test_missing_fmt_or_data(others: list[tuple[bytes, bytes]], missing: str) -> None:
    chunks = [_chunk(chunk_id, body) for chunk_id, body in others]
    if missing == "data":
        chunks.insert(0, _chunk(b"fmt ", _fmt_body(_PCM, 1, SAMPLE_RATE_HZ, 16)))
    elif missing == "fmt":
        chunks.append(_chunk(b"data", bytes(6)))
    ids = [chunk[:4].decode("latin-1") for chunk in chunks][:8]
    outcome = _decode_both(_riff(*chunks))
    if missing == "data":
        _assert_bad_audio(outcome, f"must have a 'data' chunk, found chunks {ids}")
    else:
        _assert_bad_audio(outcome, f"must have a 'fmt ' chunk before its data, found chunks {ids}")


@_FUZZ
@given(values=st.lists(st.integers(-32768, 32767), min_size=1, max_size=50),
       between=st.lists(st.binary(max_size=9), max_size=3), streamed=st.booleans())
def test_fmt_after_data(values: list[int], between: list[bytes], streamed: bool) -> None:
    """fmt after data is found; but a data size of 0 means "to the end", so fmt cannot follow it."""
    pcm = np.array(values, np.int16)
    fmt = _chunk(b"fmt ", _fmt_body(_PCM, 1, SAMPLE_RATE_HZ, 16))
    data = _chunk(b"data", _pcm16(pcm), size=0 if streamed else None)
    outcome = _decode_both(_riff(data, *(_chunk(b"LIST", body) for body in between), fmt))
    if streamed:
        _assert_bad_audio(outcome, "must have a 'fmt ' chunk before its data, found chunks ['data']")
    else:
        np.testing.assert_array_equal(outcome, pcm.astype(np.float32) / 32768)


@_FUZZ
@given(values=st.lists(st.integers(0, 255), min_size=1, max_size=51), extras=st.lists(st.binary(max_size=11), max_size=4))
def test_odd_chunk_padding(values: list[int], extras: list[bytes]) -> None:
    """Odd-sized chunks (8-bit data, odd extras) carry a pad byte that is skipped, never read as audio."""
    pcm8 = bytes(values)
    data = _riff(*(_chunk(b"JUNK", extra) for extra in extras),
                 _chunk(b"fmt ", _fmt_body(_PCM, 1, SAMPLE_RATE_HZ, 8)),
                 *(_chunk(b"LIST", extra) for extra in extras),
                 _chunk(b"data", pcm8),
                 *(_chunk(b"id3 ", extra) for extra in extras))
    expected = (np.frombuffer(pcm8, np.uint8).astype(np.float32) - 128) / 128
    np.testing.assert_array_equal(_decode_both(data), expected)


@_FUZZ
@given(extra=st.binary(min_size=1, max_size=11).filter(lambda body: len(body) % 2 == 1))
def test_missing_pad_byte_is_refused_or_decoded_cleanly(extra: bytes) -> None:
    """A writer that forgets the pad byte shifts every later chunk by one: never a crash."""
    fmt = _chunk(b"fmt ", _fmt_body(_PCM, 1, SAMPLE_RATE_HZ, 16))
    _decode_both(_riff(_chunk(b"JUNK", extra, pad=False), fmt, _chunk(b"data", bytes(10))))
    _decode_both(_riff(fmt, _chunk(b"JUNK", extra, pad=False), _chunk(b"data", bytes(10))))


# --- NaN and Inf ---------------------------------------------------------------------------------


_NASTY_FLOATS = st.one_of(
    st.sampled_from([float("nan"), float("inf"), float("-inf"), -0.0, 1e-45, 3.4e38, -3.4e38]),
    st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True),
)


@_FUZZ
@given(values=st.lists(_NASTY_FLOATS, max_size=200), sample_format=st.sampled_from(["float32", "float64"]),
       rate_hz=_RATES_HZ, channels=st.integers(1, 3), extensible=st.booleans())
def test_nan_and_inf_never_reach_the_audio(values: list[float], sample_format: str, rate_hz: int,
                                           channels: int, extensible: bool) -> None:
    x = np.array(values, np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        wav = encode_wav(x, rate_hz, sample_format=sample_format, channels=channels, extensible=extensible)
    outcome = _decode_both(wav, block_s=0.005)
    assert isinstance(outcome, np.ndarray)  # _decode_both checked it is finite and in [-1, 1]
    if rate_hz == SAMPLE_RATE_HZ:
        # NaN is silence, +-Inf and anything past full scale clip; the rest is kept.
        with np.errstate(over="ignore"):
            stored = x.astype(np.float32 if sample_format == "float32" else np.float64)
        expected = np.clip(np.nan_to_num(stored, nan=0.0, posinf=1.0, neginf=-1.0), -1.0, 1.0)
        np.testing.assert_allclose(outcome, expected.astype(np.float32), rtol=0, atol=1e-6)


# --- the PCM16 framer ----------------------------------------------------------------------------


@_FUZZ
@given(frames=st.lists(st.sampled_from([b"", b"\x01", b"\x00\x80", b"\xff\x7f\x01"]) | st.binary(max_size=9),
                       max_size=40))
def test_framer_zero_and_odd_length_frames(frames: list[bytes]) -> None:
    """Empty frames give no samples, an odd byte waits for the next frame, and nothing is lost."""
    framer = StreamConverter.for_format(AudioFormat())  # a native session's framing
    outputs = []
    fed = 0
    for frame in frames:
        out = framer.convert_pcm16(frame)
        fed += len(frame)
        assert out.dtype == np.int16
        if not frame:
            assert out.size == 0
        assert framer.pending_bytes == fed % 2
        outputs.append(out)
    joined = b"".join(frames)
    expected = np.frombuffer(joined[: len(joined) - len(joined) % 2], "<i2")
    np.testing.assert_array_equal(np.concatenate([np.zeros(0, np.int16), *outputs]), expected)


@pytest.mark.parametrize("block_s", [float("inf"), float("nan"), 0.0, -1.0])
def test_reader_refuses_a_block_length_it_cannot_use(block_s: float) -> None:
    with pytest.raises(ValueError, match="block_s must be"):
        WavReader.from_file(_Trickle(encode_wav(np.zeros(4, np.float32)), 64), block_s=block_s)  # type: ignore[arg-type]  # a binary file


@pytest.mark.parametrize(("junk_chunks", "decodes"), [(4094, True), (4095, False), (1_000_000, False)])
def test_chunk_walk_is_bounded(junk_chunks: int, decodes: bool) -> None:
    """fmt and data must come within the first 4096 chunks, so empty chunk headers cost no CPU."""
    pcm = np.array([1, -2, 3], np.int16)
    data = _riff(b"JUNK\x00\x00\x00\x00" * junk_chunks, _chunk(b"fmt ", _fmt_body(_PCM, 1, SAMPLE_RATE_HZ, 16)),
                 _chunk(b"data", _pcm16(pcm)))
    outcome = _decode_both(data, max_read=64)
    if decodes:
        np.testing.assert_array_equal(outcome, pcm.astype(np.float32) / 32768)
    else:
        _assert_bad_audio(outcome, "chunks among its first 4096 chunks, found chunks ['JUNK', 'JUNK',")
