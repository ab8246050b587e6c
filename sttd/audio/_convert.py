"""The one audio converter: interleaved samples of any rate, channel count and sample format to
16 kHz mono, chunk by chunk.

Every path audio enters by goes through `StreamConverter`: WAV files (`WavReader`,
`decode_wav`), compressed files decoded by FFmpeg (`MediaReader`, which hands it each decoded
frame's samples, interleaved), live streams at other rates or channel counts (Deepgram's ``/v1/listen``), and the
client library reading a file to stream. So a file sounds the same to the server whichever way
it arrives.

Theory of operation. Bytes are split into whole frames (one sample per channel); a partial frame
at the end of a chunk is carried to the next one. The frames are scaled to float32 in [-1, 1],
their channels averaged, and the rate converted by soxr's HQ filter, whose state is kept between
chunks: the filter holds back its delay until the chunk marked ``last``, so the chunks of one
stream, converted one by one, give the samples of the whole stream converted at once. The output
goes through `clean` (the filter rings past full scale on steep edges), so it is always finite
and in range.
"""

from __future__ import annotations

from typing import Final, Literal, Protocol

import attrs
import numpy as np
import numpy.typing as npt
import soxr  # type: ignore[import-untyped]  # soxr ships no py.typed marker; `_Resampler` types what we use

from sttd.audio._pcm import SAMPLE_RATE_HZ, clean, float32_to_pcm16

__all__ = [
    "MAX_CHANNELS",
    "MAX_SAMPLE_RATE_HZ",
    "MIN_SAMPLE_RATE_HZ",
    "SAMPLE_FORMATS",
    "AudioFormat",
    "SampleFormat",
    "StreamConverter",
]

# Below telephony rates no speech is left; the bounds also cap the resampling factor.
MIN_SAMPLE_RATE_HZ: Final = 4000
MAX_SAMPLE_RATE_HZ: Final = 384_000
MAX_CHANNELS: Final = 255  # Opus's limit, the highest of any format we read

SampleFormat = Literal["pcm8", "pcm16", "pcm24", "pcm32", "float32", "float64", "mulaw", "alaw"]
SAMPLE_FORMATS: Final[tuple[SampleFormat, ...]] = (
    "pcm8", "pcm16", "pcm24", "pcm32", "float32", "float64", "mulaw", "alaw")
_BYTES_PER_SAMPLE: Final[dict[SampleFormat, int]] = {
    "pcm8": 1, "pcm16": 2, "pcm24": 3, "pcm32": 4, "float32": 4, "float64": 8, "mulaw": 1,
    "alaw": 1}

_Float32Array = npt.NDArray[np.float32]
_Int16Array = npt.NDArray[np.int16]


class _Resampler(Protocol):
    """The part of `soxr.ResampleStream` we use."""

    def resample_chunk(self, x: _Float32Array, last: bool = False) -> _Float32Array: ...


def _rate_in_range(_inst: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not MIN_SAMPLE_RATE_HZ <= value <= MAX_SAMPLE_RATE_HZ:
        raise ValueError(f"{attribute.name} must be between {MIN_SAMPLE_RATE_HZ} and "
                         f"{MAX_SAMPLE_RATE_HZ}, got {value}")


@attrs.frozen
class AudioFormat:
    """How interleaved samples are laid out: rate, channels, and one sample's encoding.

    PCM formats are little-endian and signed, except ``pcm8``, which is unsigned (as in WAV).
    """

    sample_rate_hz: int = attrs.field(default=SAMPLE_RATE_HZ, validator=_rate_in_range)
    channels: int = attrs.field(
        default=1, validator=[attrs.validators.ge(1), attrs.validators.le(MAX_CHANNELS)])
    sample_format: SampleFormat = attrs.field(
        default="pcm16", validator=attrs.validators.in_(SAMPLE_FORMATS))

    @property
    def frame_bytes(self) -> int:
        """Bytes of one frame: a sample of every channel."""
        return self.channels * _BYTES_PER_SAMPLE[self.sample_format]

    @property
    def is_native(self) -> bool:
        """Whether this is already the server's format: 16 kHz mono PCM16."""
        return self == _NATIVE


_NATIVE: Final = AudioFormat()


@attrs.define
class StreamConverter:
    """Converts one stream of `format` audio to 16 kHz mono, a chunk at a time.

    One converter per stream: it keeps the partial frame between chunks and the resampler's
    state. Converting is CPU work (resampling especially: see `costly`); async callers with a
    costly converter run it in a worker thread, one call at a time.
    """

    format: AudioFormat
    _resampler: _Resampler | None
    _carry: bytes = attrs.field(init=False, default=b"")
    # Per-chunk questions, answered once: the format never changes.
    _native: bool = attrs.field(init=False)
    _frame_bytes: int = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._native = self.format.is_native
        self._frame_bytes = self.format.frame_bytes

    @classmethod
    def for_format(cls, fmt: AudioFormat) -> StreamConverter:
        """A converter for a stream of `fmt` audio."""
        resampler = None
        if fmt.sample_rate_hz != SAMPLE_RATE_HZ:
            resampler = soxr.ResampleStream(fmt.sample_rate_hz, SAMPLE_RATE_HZ, 1,
                                            dtype="float32", quality="HQ")
        return cls(fmt, resampler)

    @property
    def costly(self) -> bool:
        """Whether a chunk costs more than a copy (resampling, downmixing, rescaling)."""
        return not self._native

    @property
    def resamples(self) -> bool:
        """Whether the rate is converted: the costly part, which keeps a tail until `last`."""
        return self._resampler is not None

    @property
    def pending_bytes(self) -> int:
        """Bytes of a partial frame held back until the next chunk completes it."""
        return len(self._carry)

    def convert(self, data: bytes | memoryview, *, last: bool = False) -> _Float32Array:
        """16 kHz mono float32 samples of the whole frames `data` completes.

        With `last`, the stream ends here: the resampler's held-back tail comes out, and a
        partial frame left over is dropped.
        """
        raw = self._frames(data, last=last)
        fmt = self.format
        mono = _downmix(_to_float32(raw, fmt.sample_format), fmt.channels)
        return self._resample(mono, last=last)

    def convert_pcm16(self, data: bytes | memoryview, *, last: bool = False) -> _Int16Array:
        """As `convert`, but as int16; 16 kHz mono PCM16 in is copied out without arithmetic."""
        if self._native:
            raw = self._frames(data, last=last)
            return np.frombuffer(raw, dtype="<i2").astype(np.int16)
        return float32_to_pcm16(self.convert(data, last=last))

    def _frames(self, data: bytes | memoryview, *, last: bool) -> bytes | memoryview:
        """The whole frames of the carry plus `data`; the rest is carried (or, if `last`, lost)."""
        buf = self._carry + bytes(data) if self._carry else data
        usable = len(buf) - len(buf) % self._frame_bytes
        self._carry = b"" if last else bytes(buf[usable:])
        return buf[:usable] if usable < len(buf) else buf

    def _resample(self, mono: _Float32Array, *, last: bool) -> _Float32Array:
        if self._resampler is not None and (mono.size or last):
            mono = clean(np.asarray(self._resampler.resample_chunk(mono, last=last),
                                    dtype=np.float32))
        return np.ascontiguousarray(mono, dtype=np.float32)


def _g711_table(law: Literal["mulaw", "alaw"]) -> _Float32Array:
    """Each of the 256 G.711 code words (ITU-T G.711) as float32 in [-1, 1].

    Written here rather than taken from a library: the standard library's ``audioop`` is gone
    from Python 3.13, and its backport (audioop-lts) is a C extension for 8 lines of table.
    """
    codes = np.arange(256, dtype=np.int32)
    if law == "mulaw":
        inverted = ~codes & 0xFF
        exponent, mantissa = (inverted >> 4) & 0x07, inverted & 0x0F
        magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
        linear = np.where(inverted & 0x80, -magnitude, magnitude)
    else:
        toggled = codes ^ 0x55
        exponent, mantissa = (toggled >> 4) & 0x07, toggled & 0x0F
        magnitude = np.where(exponent == 0, (mantissa << 4) + 8,
                             ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0))
        linear = np.where(toggled & 0x80, magnitude, -magnitude)
    return linear.astype(np.float32) / np.float32(32768)


_G711: Final[dict[str, _Float32Array]] = {law: _g711_table(law) for law in ("mulaw", "alaw")}


def _to_float32(raw: bytes | memoryview, sample_format: SampleFormat) -> _Float32Array:
    """Interleaved samples as finite float32 in [-1, 1]; `raw` holds whole frames."""
    if sample_format in ("mulaw", "alaw"):
        return _G711[sample_format][np.frombuffer(raw, dtype=np.uint8)]
    if sample_format in ("float32", "float64"):
        values = np.frombuffer(raw, dtype="<f4" if sample_format == "float32" else "<f8")
        return clean(values)  # one copy (the buffer is read-only), cleaned in place
    if sample_format == "pcm8":
        unsigned = np.frombuffer(raw, dtype=np.uint8)
        return (unsigned.astype(np.float32) - np.float32(128)) / np.float32(128)
    if sample_format == "pcm24":
        # Place each 3-byte sample in the top of an int32, then shift right to sign-extend.
        widened = np.zeros((len(raw) // 3, 4), dtype=np.uint8)
        widened[:, 1:] = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3)
        ints = widened.view("<i4")[:, 0] >> 8
        bits = 24
    else:
        bits = 8 * _BYTES_PER_SAMPLE[sample_format]
        ints = np.frombuffer(raw, dtype=f"<i{bits // 8}")
    # int -> float32 rounds once; dividing by a power of two is then exact.
    return ints.astype(np.float32) / np.float32(2 ** (bits - 1))


def _downmix(interleaved: _Float32Array, channels: int) -> _Float32Array:
    """Average interleaved channels to one."""
    if channels == 1:
        return interleaved
    mixed: _Float32Array = interleaved.reshape(-1, channels).mean(axis=1, dtype=np.float32)
    return mixed
