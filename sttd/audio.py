"""WAV decoding and PCM16 helpers.

`decode_wav` is a pure-numpy RIFF/WAVE reader. It walks the chunk list itself so that it can
accept what streaming writers produce (a `data` size of 0 or 0xFFFFFFFF) and so that it never
allocates from a declared size: every slice is bounded by the bytes actually present. Any
input raises only `UnsupportedMedia` (not RIFF/WAVE) or `BadAudio` (RIFF/WAVE but broken), or
returns finite 16 kHz mono float32 samples in [-1, 1].
"""

from __future__ import annotations

import struct
from typing import Final

import attrs
import numpy as np
import numpy.typing as npt
import soxr  # type: ignore[import-untyped]  # soxr ships no py.typed marker; we call one function

from sttd.errors import BadAudio, UnsupportedMedia

__all__ = [
    "SAMPLE_RATE_HZ",
    "Pcm16Framer",
    "decode_wav",
    "encode_wav",
    "float32_to_pcm16",
    "pcm16_to_float32",
]

SAMPLE_RATE_HZ: Final[int] = 16000

_MIN_SAMPLE_RATE_HZ: Final = 4000  # below telephony rates; also bounds the upsampling factor
_MAX_SAMPLE_RATE_HZ: Final = 384_000
_MAX_CHANNELS: Final = 32
_RIFF_HEADER_BYTES: Final = 12  # "RIFF", u32 size, "WAVE"
_CHUNK_HEADER_BYTES: Final = 8  # 4-byte id, u32 little-endian size
_FMT_MIN_BYTES: Final = 16  # WAVEFORMAT / PCMWAVEFORMAT
_FMT_EXTENSIBLE_MIN_BYTES: Final = 40  # + cbSize, valid bits, channel mask, 16-byte SubFormat
_SUBFORMAT_OFFSET_BYTES: Final = 24
_FORMAT_PCM: Final = 0x0001
_FORMAT_FLOAT: Final = 0x0003
_FORMAT_EXTENSIBLE: Final = 0xFFFE
_PCM_BITS: Final = (8, 16, 24, 32)
_FLOAT_BITS: Final = (32, 64)
_MAX_LISTED_CHUNKS: Final = 8  # chunk ids quoted in a "missing chunk" message
# KSDATAFORMAT_SUBTYPE_* GUIDs are the format tag followed by this fixed tail.
_SUBFORMAT_GUID_TAIL: Final = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
# sample_format -> (format tag, bits per sample)
_SAMPLE_FORMATS: Final = {
    "pcm8": (_FORMAT_PCM, 8),
    "pcm16": (_FORMAT_PCM, 16),
    "pcm24": (_FORMAT_PCM, 24),
    "pcm32": (_FORMAT_PCM, 32),
    "float32": (_FORMAT_FLOAT, 32),
    "float64": (_FORMAT_FLOAT, 64),
}

_Float32Array = npt.NDArray[np.float32]
_Int16Array = npt.NDArray[np.int16]


@attrs.frozen
class _WavFormat:
    """The fields of a validated `fmt ` chunk."""

    is_float: bool
    channels: int
    sample_rate_hz: int
    bits_per_sample: int
    block_align: int


def decode_wav(data: bytes) -> _Float32Array:
    """Decode a WAV file's bytes to 16 kHz mono float32 samples in [-1, 1].

    Raises `UnsupportedMedia` if `data` is not RIFF/WAVE and `BadAudio` if it is but its
    chunks or format fields are broken or unsupported.
    """
    fmt, raw = _read_chunks(memoryview(data))
    frames = len(raw) // fmt.block_align
    mono = _downmix(_to_float32(raw[: frames * fmt.block_align], fmt), fmt.channels)
    if fmt.sample_rate_hz != SAMPLE_RATE_HZ and mono.size:
        resampled = soxr.resample(mono, fmt.sample_rate_hz, SAMPLE_RATE_HZ, quality="HQ")
        # The HQ filter rings past full scale on steep edges, so clip again.
        mono = np.clip(np.asarray(resampled, dtype=np.float32), -1.0, 1.0)
    return np.ascontiguousarray(mono, dtype=np.float32)


def pcm16_to_float32(pcm: _Int16Array) -> _Float32Array:
    """Convert int16 samples to float32 in [-1, 1) by dividing by 32768."""
    if pcm.dtype != np.int16:
        raise ValueError(f"pcm dtype must be int16, got {pcm.dtype}")
    return pcm.astype(np.float32) / np.float32(32768)


def float32_to_pcm16(x: npt.NDArray[np.floating]) -> _Int16Array:
    """Convert float samples to int16: NaN to 0, clip to [-1, 1], scale by 32768 and round."""
    return _quantise(x, 16).astype(np.int16)


def encode_wav(
    samples: npt.NDArray[np.floating],
    sample_rate_hz: int = SAMPLE_RATE_HZ,
    *,
    sample_format: str = "pcm16",
    channels: int = 1,
    extensible: bool = False,
) -> bytes:
    """Encode mono float32 samples as a WAV file (for tests, benchmarks and clients).

    PCM formats clip to [-1, 1] and map NaN to 0; float formats store the values unchanged.
    With `channels > 1` every channel carries the same signal. Nothing is resampled.
    """
    if sample_format not in _SAMPLE_FORMATS:
        raise ValueError(f"sample_format must be one of {', '.join(_SAMPLE_FORMATS)}, got {sample_format!r}")
    if samples.ndim != 1:
        raise ValueError(f"samples must be 1-D (mono), got shape {samples.shape}")
    if not _MIN_SAMPLE_RATE_HZ <= sample_rate_hz <= _MAX_SAMPLE_RATE_HZ:
        raise ValueError(
            f"sample_rate_hz must be between {_MIN_SAMPLE_RATE_HZ} and {_MAX_SAMPLE_RATE_HZ}, got {sample_rate_hz}"
        )
    if not 1 <= channels <= _MAX_CHANNELS:
        raise ValueError(f"channels must be between 1 and {_MAX_CHANNELS}, got {channels}")
    tag, bits = _SAMPLE_FORMATS[sample_format]
    frames = np.repeat(samples[:, np.newaxis], channels, axis=1)
    if tag == _FORMAT_FLOAT:
        payload = frames.astype(f"<f{bits // 8}").tobytes()
    elif bits == 8:
        payload = (_quantise(frames, bits) + 128).astype(np.uint8).tobytes()
    elif bits == 24:
        # Keep the low three bytes of each little-endian int32.
        payload = _quantise(frames, bits).astype("<i4")[..., np.newaxis].view(np.uint8)[..., :3].tobytes()
    else:
        payload = _quantise(frames, bits).astype(f"<i{bits // 8}").tobytes()
    block_align = channels * bits // 8
    fmt = struct.pack(
        "<HHIIHH",
        _FORMAT_EXTENSIBLE if extensible else tag,
        channels,
        sample_rate_hz,
        sample_rate_hz * block_align,
        block_align,
        bits,
    )
    if extensible:
        extension_bytes = _FMT_EXTENSIBLE_MIN_BYTES - _FMT_MIN_BYTES - 2
        # Valid bits equal the container; channel mask 0 assigns no speaker positions.
        fmt += struct.pack("<HHI", extension_bytes, bits, 0) + struct.pack("<H", tag) + _SUBFORMAT_GUID_TAIL
    body = _chunk(b"fmt ", fmt) + _chunk(b"data", payload)
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WAVE" + body


@attrs.define
class Pcm16Framer:
    """Turns a stream of byte chunks of any length into int16 sample arrays, carrying an odd trailing byte to the next chunk."""

    _carry: bytes = attrs.field(default=b"", init=False)

    def feed(self, data: bytes) -> _Int16Array:
        """Return the little-endian int16 samples completed by `data` (a copy, possibly empty)."""
        buf = self._carry + data
        usable = len(buf) - len(buf) % 2
        self._carry = buf[usable:]
        return np.frombuffer(buf, dtype="<i2", count=usable // 2).astype(np.int16)

    @property
    def pending_bytes(self) -> int:
        """Bytes held back until the next `feed` completes their sample (0 or 1)."""
        return len(self._carry)


def _read_chunks(data: memoryview) -> tuple[_WavFormat, memoryview]:
    """Return the validated format and the `data` body, cut to the bytes present."""
    if len(data) < _RIFF_HEADER_BYTES or bytes(data[:4]) != b"RIFF" or bytes(data[8:12]) != b"WAVE":
        raise UnsupportedMedia(f"expected a WAV file (RIFF/WAVE header), got {bytes(data[:_RIFF_HEADER_BYTES])!r}")
    fmt_body: memoryview | None = None
    data_body: memoryview | None = None
    seen: list[str] = []
    offset = _RIFF_HEADER_BYTES
    while offset + _CHUNK_HEADER_BYTES <= len(data) and (fmt_body is None or data_body is None):
        chunk_id = bytes(data[offset : offset + 4])
        (size,) = struct.unpack_from("<I", data, offset + 4)
        start = offset + _CHUNK_HEADER_BYTES
        if len(seen) < _MAX_LISTED_CHUNKS:
            seen.append(chunk_id.decode("latin-1"))
        if chunk_id == b"fmt " and fmt_body is None:
            fmt_body = data[start : start + size]
        elif chunk_id == b"data" and data_body is None:
            if size == 0 or start + size > len(data):
                # Streaming writers leave the size at 0 or 0xFFFFFFFF: take the rest of the file.
                data_body = data[start:]
                break
            data_body = data[start : start + size]
        offset = start + size + (size & 1)  # chunks are padded to an even length
    if fmt_body is None:
        raise BadAudio(f"WAV file must have a 'fmt ' chunk before its data, found chunks {seen}")
    fmt = _parse_fmt(fmt_body)  # before the data check: a file cut inside fmt says so
    if data_body is None:
        raise BadAudio(f"WAV file must have a 'data' chunk, found chunks {seen}")
    return fmt, data_body


def _parse_fmt(body: memoryview) -> _WavFormat:
    """Validate a `fmt ` chunk body."""
    if len(body) < _FMT_MIN_BYTES:
        raise BadAudio(f"WAV fmt chunk must be at least {_FMT_MIN_BYTES} bytes, got {len(body)}")
    tag, channels, rate_hz, _byte_rate, block_align, bits = struct.unpack_from("<HHIIHH", body)
    field = "format tag"
    if tag == _FORMAT_EXTENSIBLE:
        if len(body) < _FMT_EXTENSIBLE_MIN_BYTES:
            raise BadAudio(
                f"WAV fmt chunk must be at least {_FMT_EXTENSIBLE_MIN_BYTES} bytes "
                f"for WAVE_FORMAT_EXTENSIBLE, got {len(body)}"
            )
        (tag,) = struct.unpack_from("<H", body, _SUBFORMAT_OFFSET_BYTES)
        field = "extensible SubFormat"
    if tag not in (_FORMAT_PCM, _FORMAT_FLOAT):
        raise BadAudio(f"WAV {field} must be 0x0001 (PCM) or 0x0003 (IEEE float), got {tag:#06x}")
    is_float = tag == _FORMAT_FLOAT
    allowed, kind = (_FLOAT_BITS, "IEEE float") if is_float else (_PCM_BITS, "PCM")
    if bits not in allowed:
        raise BadAudio(f"WAV bits_per_sample must be one of {', '.join(map(str, allowed))} for {kind}, got {bits}")
    if not 1 <= channels <= _MAX_CHANNELS:
        raise BadAudio(f"WAV channels must be between 1 and {_MAX_CHANNELS}, got {channels}")
    if not _MIN_SAMPLE_RATE_HZ <= rate_hz <= _MAX_SAMPLE_RATE_HZ:
        raise BadAudio(
            f"WAV sample_rate_hz must be between {_MIN_SAMPLE_RATE_HZ} and {_MAX_SAMPLE_RATE_HZ}, got {rate_hz}"
        )
    expected_align = channels * bits // 8
    if block_align != expected_align:
        raise BadAudio(f"WAV block_align must be channels * bits_per_sample / 8 = {expected_align}, got {block_align}")
    return _WavFormat(is_float, channels, rate_hz, bits, block_align)


def _to_float32(raw: memoryview, fmt: _WavFormat) -> _Float32Array:
    """Interleaved samples as finite float32 in [-1, 1]; `raw` holds whole frames."""
    bits = fmt.bits_per_sample
    if fmt.is_float:
        values = np.frombuffer(raw, dtype=f"<f{bits // 8}")
        # Clip in the source precision so that float64 beyond float32's range cannot overflow.
        cleaned: npt.NDArray[np.floating] = np.clip(np.nan_to_num(values, nan=0.0, posinf=1.0, neginf=-1.0), -1.0, 1.0)
        return cleaned.astype(np.float32)
    if bits == 8:
        unsigned = np.frombuffer(raw, dtype=np.uint8)
        return (unsigned.astype(np.float32) - np.float32(128)) / np.float32(128)
    if bits == 24:
        # Place each 3-byte sample in the top of an int32, then shift right to sign-extend.
        widened = np.zeros((len(raw) // 3, 4), dtype=np.uint8)
        widened[:, 1:] = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3)
        ints = widened.view("<i4")[:, 0] >> 8
    else:
        ints = np.frombuffer(raw, dtype=f"<i{bits // 8}")
    # int -> float32 rounds once; dividing by a power of two is then exact.
    return ints.astype(np.float32) / np.float32(2 ** (bits - 1))


def _downmix(interleaved: _Float32Array, channels: int) -> _Float32Array:
    """Average interleaved channels to one."""
    if channels == 1:
        return interleaved
    mixed: _Float32Array = interleaved.reshape(-1, channels).mean(axis=1, dtype=np.float32)
    return mixed


def _quantise(x: npt.NDArray[np.floating], bits: int) -> npt.NDArray[np.int64]:
    """Signed integer codes for `bits`-bit PCM: NaN to 0, clip to [-1, 1], scale, round."""
    full_scale = 2 ** (bits - 1)
    clipped = np.clip(np.nan_to_num(x.astype(np.float64), nan=0.0), -1.0, 1.0)
    codes: npt.NDArray[np.int64] = np.clip(np.rint(clipped * full_scale), -full_scale, full_scale - 1).astype(np.int64)
    return codes


def _chunk(chunk_id: bytes, body: bytes) -> bytes:
    """One RIFF chunk with its pad byte."""
    return chunk_id + struct.pack("<I", len(body)) + body + b"\x00" * (len(body) & 1)
