"""WAV files: a pure-numpy RIFF/WAVE reader and writer.

Two readers share one chunk walker and the one audio converter (`StreamConverter`):
`decode_wav` decodes a whole file held in memory, and `WavReader` decodes a seekable file object
a bounded block at a time, so that memory does not grow with the length of the file. The walker
reads only chunk headers and the `fmt ` body, seeking past everything else, so that it can
accept what streaming writers produce (a `data` size of 0 or 0xFFFFFFFF) and so that it never
allocates from a declared size: every read is bounded by the bytes actually present. The
converter keeps the resampler's state between blocks, so both readers return the same samples.
Any input raises only `UnsupportedMedia` (not RIFF/WAVE) or `BadAudio` (RIFF/WAVE but broken;
`UnsupportedWavEncoding` for a well-formed header in an encoding other than PCM or IEEE float,
which FFmpeg can decode instead), or gives finite 16 kHz mono float32 samples in [-1, 1].
`is_wav` is the one test of a file's first bytes for RIFF/WAVE.
"""

from __future__ import annotations

import io
import math
import struct
from collections.abc import Iterator
from typing import IO, Final

import attrs
import numpy as np
import numpy.typing as npt

from sttd.audio._convert import (
    MAX_SAMPLE_RATE_HZ,
    MIN_SAMPLE_RATE_HZ,
    AudioFormat,
    SampleFormat,
    StreamConverter,
)
from sttd.audio._pcm import SAMPLE_RATE_HZ, quantise
from sttd.errors import BadAudio, UnsupportedMedia, UnsupportedWavEncoding

__all__ = ["WavReader", "decode_wav", "encode_wav", "is_wav"]

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
# Chunks walked looking for fmt and data. Real files have a handful; an upload of empty chunk
# headers would otherwise cost a second of CPU per 8 MB in one uncancellable worker-thread call.
_MAX_CHUNKS: Final = 4096
# A WavReader block reads at most this much of the data chunk, whatever block_s asks for: ten
# seconds of 48 kHz stereo float32 fit; 32 channels of 384 kHz float64 get shorter blocks.
_MAX_BLOCK_READ_BYTES: Final = 4 * 1024 * 1024
# KSDATAFORMAT_SUBTYPE_* GUIDs are the format tag followed by this fixed tail.
_SUBFORMAT_GUID_TAIL: Final = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
# sample_format -> (format tag, bits per sample)
_SAMPLE_FORMATS: Final[dict[SampleFormat, tuple[int, int]]] = {
    "pcm8": (_FORMAT_PCM, 8),
    "pcm16": (_FORMAT_PCM, 16),
    "pcm24": (_FORMAT_PCM, 24),
    "pcm32": (_FORMAT_PCM, 32),
    "float32": (_FORMAT_FLOAT, 32),
    "float64": (_FORMAT_FLOAT, 64),
}
_FORMAT_NAMES: Final = {tag_bits: name for name, tag_bits in _SAMPLE_FORMATS.items()}

_Float32Array = npt.NDArray[np.float32]


@attrs.frozen
class _WavFormat:
    """The fields of a validated `fmt ` chunk."""

    audio: AudioFormat
    block_align: int


@attrs.frozen
class _WavHeader:
    """Where a WAV file's samples are, relative to the file's start."""

    fmt: _WavFormat
    data_start: int
    # The declared size of the data chunk, or None to read to the end of the file.
    data_bytes: int | None


def is_wav(head: bytes) -> bool:
    """Whether a file's first 12 bytes are a RIFF/WAVE header."""
    return head[:4] == b"RIFF" and head[8:12] == b"WAVE"


def decode_wav(data: bytes) -> _Float32Array:
    """Decode a WAV file's bytes to 16 kHz mono float32 samples in [-1, 1].

    Raises `UnsupportedMedia` if `data` is not RIFF/WAVE and `BadAudio` if it is but its
    chunks or format fields are broken or unsupported.
    """
    header = _read_header(io.BytesIO(data))  # BytesIO shares the bytes; only headers are copied
    view = memoryview(data)
    end = len(view) if header.data_bytes is None else header.data_start + header.data_bytes
    converter = StreamConverter.for_format(header.fmt.audio)
    return converter.convert(view[header.data_start : end], last=True)


@attrs.define
class WavReader:
    """Decodes a WAV file object to 16 kHz mono float32 blocks, reading a bounded amount at a time.

    Create one with `from_file`. Each `read_block` (or step of iteration) reads and converts
    at most about `block_s` seconds of audio, so memory does not depend on the file's length.
    The blocks, concatenated, equal what `decode_wav` returns for the same bytes. Reading is
    blocking file I/O and CPU work: async callers run each call in a worker thread.
    """

    _file: IO[bytes]
    _converter: StreamConverter
    _read_bytes: int
    # Bytes of the data chunk not yet read, or None to read to the end of the file.
    _remaining_bytes: int | None
    _finished: bool = attrs.field(default=False, init=False)

    @classmethod
    def from_file(cls, file: IO[bytes], *, block_s: float = 10.0) -> WavReader:
        """Parse the header of the WAV file that starts at `file`'s position.

        `file` must be seekable; the reader does not close it. Raises `UnsupportedMedia` if the
        file is not RIFF/WAVE and `BadAudio` if it is but its chunks or format fields are broken
        or unsupported, with the messages `decode_wav` gives. Raises `ValueError` unless
        `block_s` is positive and finite.
        """
        if not block_s > 0:
            raise ValueError(f"block_s must be > 0, got {block_s!r}")
        if math.isinf(block_s):  # it would pass the test above, then fail to round to frames
            raise ValueError(f"block_s must be finite, got {block_s!r}")
        base = file.tell()
        header = _read_header(file)
        file.seek(base + header.data_start)
        fmt = header.fmt
        frames = min(round(block_s * fmt.audio.sample_rate_hz),
                     _MAX_BLOCK_READ_BYTES // fmt.block_align)
        read_bytes = max(frames, 1) * fmt.block_align
        return cls(file, StreamConverter.for_format(fmt.audio), read_bytes, header.data_bytes)

    def read_block(self) -> _Float32Array | None:
        """The next non-empty block of samples, or None once the data chunk is exhausted."""
        while not self._finished:
            size = self._read_bytes
            if self._remaining_bytes is not None:
                size = min(size, self._remaining_bytes)
            raw = _read_up_to(self._file, size)
            if self._remaining_bytes is not None:
                self._remaining_bytes -= len(raw)
            # A short read is the end of the file; a partial frame there is dropped.
            self._finished = len(raw) < size or self._remaining_bytes == 0
            samples = self._converter.convert(raw, last=self._finished)
            if samples.size:
                return samples
        return None

    def __iter__(self) -> Iterator[_Float32Array]:
        while (block := self.read_block()) is not None:
            yield block


def encode_wav(
    samples: npt.NDArray[np.floating],
    sample_rate_hz: int = SAMPLE_RATE_HZ,
    *,
    sample_format: SampleFormat = "pcm16",
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
    if not MIN_SAMPLE_RATE_HZ <= sample_rate_hz <= MAX_SAMPLE_RATE_HZ:
        raise ValueError(
            f"sample_rate_hz must be between {MIN_SAMPLE_RATE_HZ} and {MAX_SAMPLE_RATE_HZ}, got {sample_rate_hz}"
        )
    if not 1 <= channels <= _MAX_CHANNELS:
        raise ValueError(f"channels must be between 1 and {_MAX_CHANNELS}, got {channels}")
    tag, bits = _SAMPLE_FORMATS[sample_format]
    frames = np.repeat(samples[:, np.newaxis], channels, axis=1)
    if tag == _FORMAT_FLOAT:
        payload = frames.astype(f"<f{bits // 8}").tobytes()
    elif bits == 8:
        payload = (quantise(frames, bits) + 128).astype(np.uint8).tobytes()
    elif bits == 24:
        # Keep the low three bytes of each little-endian int32.
        payload = quantise(frames, bits).astype("<i4")[..., np.newaxis].view(np.uint8)[..., :3].tobytes()
    else:
        payload = quantise(frames, bits).astype(f"<i{bits // 8}").tobytes()
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


def _read_header(file: IO[bytes]) -> _WavHeader:
    """Walk the chunk list from `file`'s position, seeking past the chunks it does not need."""
    base = file.tell()
    head = _read_up_to(file, _RIFF_HEADER_BYTES)
    if len(head) < _RIFF_HEADER_BYTES or not is_wav(head):
        raise UnsupportedMedia(f"expected a WAV file (RIFF/WAVE header), got {head!r}")
    fmt_body: bytes | None = None
    data_start: int | None = None
    data_bytes: int | None = None
    seen: list[str] = []
    offset = _RIFF_HEADER_BYTES
    walked = 0
    while fmt_body is None or data_start is None:
        if walked == _MAX_CHUNKS:
            raise BadAudio(f"WAV file must have its 'fmt ' and 'data' chunks among its first "
                           f"{_MAX_CHUNKS} chunks, found chunks {seen}...")
        walked += 1
        file.seek(base + offset)
        chunk_header = _read_up_to(file, _CHUNK_HEADER_BYTES)
        if len(chunk_header) < _CHUNK_HEADER_BYTES:
            break
        chunk_id = chunk_header[:4]
        (size,) = struct.unpack_from("<I", chunk_header, 4)
        start = offset + _CHUNK_HEADER_BYTES
        if len(seen) < _MAX_LISTED_CHUNKS:
            seen.append(chunk_id.decode("latin-1"))
        if chunk_id == b"fmt " and fmt_body is None:
            # _parse_fmt looks at no more than this; a shorter body is what the file holds.
            fmt_body = _read_up_to(file, min(size, _FMT_EXTENSIBLE_MIN_BYTES))
        elif chunk_id == b"data" and data_start is None:
            data_start = start
            if size == 0:
                # Streaming writers leave the size at 0 (or 0xFFFFFFFF, which runs past the end
                # of the file and so reads to it as well): take the rest of the file.
                break
            data_bytes = size
        offset = start + size + (size & 1)  # chunks are padded to an even length
    if fmt_body is None:
        raise BadAudio(f"WAV file must have a 'fmt ' chunk before its data, found chunks {seen}")
    fmt = _parse_fmt(fmt_body)  # before the data check: a file cut inside fmt says so
    if data_start is None:
        raise BadAudio(f"WAV file must have a 'data' chunk, found chunks {seen}")
    return _WavHeader(fmt, data_start, data_bytes)


def _read_up_to(file: IO[bytes], size: int) -> bytes:
    """`size` bytes of `file`, or fewer at its end, however short its individual reads are."""
    parts: list[bytes] = []
    remaining = size
    while remaining > 0:
        part = file.read(remaining)
        if not part:
            break
        parts.append(part)
        remaining -= len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _parse_fmt(body: bytes) -> _WavFormat:
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
        raise UnsupportedWavEncoding(
            f"WAV {field} must be 0x0001 (PCM) or 0x0003 (IEEE float), got {tag:#06x}")
    is_float = tag == _FORMAT_FLOAT
    allowed, kind = (_FLOAT_BITS, "IEEE float") if is_float else (_PCM_BITS, "PCM")
    if bits not in allowed:
        raise BadAudio(f"WAV bits_per_sample must be one of {', '.join(map(str, allowed))} for {kind}, got {bits}")
    if not 1 <= channels <= _MAX_CHANNELS:
        raise BadAudio(f"WAV channels must be between 1 and {_MAX_CHANNELS}, got {channels}")
    if not MIN_SAMPLE_RATE_HZ <= rate_hz <= MAX_SAMPLE_RATE_HZ:
        raise BadAudio(
            f"WAV sample_rate_hz must be between {MIN_SAMPLE_RATE_HZ} and {MAX_SAMPLE_RATE_HZ}, got {rate_hz}"
        )
    expected_align = channels * bits // 8
    if block_align != expected_align:
        raise BadAudio(f"WAV block_align must be channels * bits_per_sample / 8 = {expected_align}, got {block_align}")
    return _WavFormat(AudioFormat(rate_hz, channels, _FORMAT_NAMES[tag, bits]), block_align)


def _chunk(chunk_id: bytes, body: bytes) -> bytes:
    """One RIFF chunk with its pad byte."""
    return chunk_id + struct.pack("<I", len(body)) + body + b"\x00" * (len(body) & 1)
