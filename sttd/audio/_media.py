"""Compressed and container audio (FLAC, Ogg/Opus, MP3, M4A/AAC, WebM, ...) decoded with PyAV.

`MediaReader` opens a seekable file object with FFmpeg (through PyAV's Python I/O, so MP4 files
whose index sits at the end work), decodes its first audio stream one packet at a time, and
hands out 16 kHz mono float32 blocks of a fixed length, so that memory does not grow with the
length of the file. Samples are scaled to float in numpy and channels averaged, then the one
audio converter (`StreamConverter`) converts the rate with the state kept across frames, as for
WAV files; NaN and out-of-range values never reach the audio.

Only the demuxers in `_DEMUXERS` may open an upload: FFmpeg's playlist and concat demuxers
(HLS, DASH, ffconcat) would open other files or URLs named inside it.

Errors:

- `UnsupportedMedia`: FFmpeg cannot open the file with an accepted demuxer (it is empty, not
  in an accepted format, or so damaged that its header cannot be read: the message says what
  the file looks like), it holds no audio stream, or its codec or sample format cannot be
  decoded.
- `BadAudio`: the file opened as audio, but its audio runs `_MAX_BAD_PACKETS_IN_A_ROW`
  undecodable packets in a row, none of its packets decode, a frame has a sample rate or
  channel count out of range, or reading fails before any audio came out.
- `PayloadTooLarge`: the file declares, or decodes to, more than `max_duration_s` of audio.

Damage short of that is decoded past, as FFmpeg's own tools do: an undecodable packet is
skipped (the decoder resyncs on the next one), and a read error after some audio ends the audio
there, like a file cut short. Both are logged at WARNING when the reader finishes.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Iterator
from typing import IO, Final

import attrs
import av
import av.error
import numpy as np
import numpy.typing as npt
from av.audio.frame import AudioFrame
from av.audio.stream import AudioStream
from av.container import InputContainer
from av.packet import Packet

from sttd.audio._convert import (
    MAX_CHANNELS,
    MAX_SAMPLE_RATE_HZ,
    MIN_SAMPLE_RATE_HZ,
    AudioFormat,
    SampleFormat,
    StreamConverter,
)
from sttd.audio._pcm import SAMPLE_RATE_HZ
from sttd.audio._wav import is_wav
from sttd.errors import BadAudio, PayloadTooLarge, UnsupportedMedia

__all__ = ["ACCEPTED_FORMATS", "MediaReader"]

log = logging.getLogger(__name__)

ACCEPTED_FORMATS: Final = ("WAV, FLAC, Ogg (Opus, Vorbis, FLAC), MP3, MP4/M4A (AAC, ALAC), "
                           "WebM/Matroska, AAC (ADTS), AIFF, CAF, AMR, WMA, RF64, Wave64")
# FFmpeg demuxer names: av_match_list matches "mov" and "matroska" against the comma-joined
# names "mov,mp4,m4a,3gp,3g2,mj2" and "matroska,webm".
_DEMUXERS: Final = "aac,aiff,amr,asf,caf,flac,matroska,mov,mp3,ogg,wav,w64"
_CONTAINER_OPTIONS: Final = {
    "format_whitelist": _DEMUXERS,
    # No accepted demuxer opens other resources; should one try, no protocol is allowed.
    "protocol_whitelist": "none",
}
_CONTAINER_NAMES: Final = {"mov": "MP4", "matroska": "WebM/Matroska", "asf": "WMA/ASF", "ogg": "Ogg",
                            "flac": "FLAC", "mp3": "MP3", "aac": "AAC", "aiff": "AIFF", "caf": "CAF",
                            "amr": "AMR", "wav": "WAV", "w64": "Wave64"}
_AV_NUM_DATA_POINTERS: Final = 8  # see `_interleave`
# A run this long is not a glitch but a stream we cannot decode: 1 to 2 s of audio for most
# codecs, and it bounds the CPU spent on garbage that FFmpeg took for audio.
_MAX_BAD_PACKETS_IN_A_ROW: Final = 50
_SNIFF_BYTES: Final = 512
_MICROSECONDS: Final = 1_000_000
# FFmpeg's packed sample formats, as the converter names them (u8 is unsigned, as in WAV).
_SAMPLE_FORMATS: Final[dict[str, SampleFormat]] = {
    "u8": "pcm8", "s16": "pcm16", "s32": "pcm32", "flt": "float32", "dbl": "float64"}

_Float32Array = npt.NDArray[np.float32]


@attrs.define
class MediaReader:
    """Decodes a container file's first audio stream to 16 kHz mono float32 blocks.

    Create one with `from_file`; close it (or use it as a context manager) to free FFmpeg's
    state; it does not close the file. Each `read_block` decodes just enough packets for one
    block, so memory does not depend on the file's length. Reading is blocking file I/O and CPU
    work: async callers run each call in a worker thread, never two at once.
    """

    _container: InputContainer
    _stream: AudioStream
    _packets: Iterator[Packet[AudioStream]]
    _block_samples: int
    _max_samples: int | None
    _max_duration_s: float | None
    # Output converted but not yet handed out, oldest first: at most a packet's worth.
    _pending: deque[_Float32Array] = attrs.field(init=False, factory=deque)
    # The converter for the rate of the frames now coming (it can change mid-file).
    _converter: StreamConverter | None = attrs.field(default=None, init=False)
    _samples_out: int = attrs.field(default=0, init=False)
    _packets_read: int = attrs.field(default=0, init=False)
    _bad_packets: int = attrs.field(default=0, init=False)
    _bad_in_a_row: int = attrs.field(default=0, init=False)
    # FFmpeg's last decoding or reading error: its message, and its PyAV class for the log.
    _last_error: str = attrs.field(default="", init=False)
    _last_error_type: str = attrs.field(default="", init=False)
    _cut_short: bool = attrs.field(default=False, init=False)
    _exhausted: bool = attrs.field(default=False, init=False)

    @classmethod
    def from_file(cls, file: IO[bytes], *, block_s: float = 10.0,
                  max_duration_s: float | None = None) -> MediaReader:
        """Open the media file that starts at `file`'s position and find its first audio stream.

        `file` must be seekable. Raises `UnsupportedMedia`, `BadAudio` or `PayloadTooLarge`
        (from a declared duration over `max_duration_s`) as the module says, and `ValueError`
        unless `block_s` (and `max_duration_s`, if given) are positive and finite.
        """
        for name, value in (("block_s", block_s), ("max_duration_s", max_duration_s)):
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be positive and finite, got {value!r}")
        base = file.tell()
        head = file.read(_SNIFF_BYTES)
        file.seek(base)
        if not head:
            raise UnsupportedMedia(f"the file is empty; expected audio ({ACCEPTED_FORMATS})")
        container = _open_container(_FileWindow(file, base), head)
        try:
            stream = _audio_stream(container)
            _check_declared_duration(container, stream, max_duration_s)
            packets = container.demux(stream)
        except BaseException:
            container.close()
            raise
        block_samples = max(round(block_s * SAMPLE_RATE_HZ), 1)
        max_samples = None if max_duration_s is None else math.floor(max_duration_s * SAMPLE_RATE_HZ)
        log.debug("media.opened format=%s codec=%s rate_hz=%d channels=%d",
                  container.format.name, stream.codec_context.name, stream.codec_context.sample_rate,
                  stream.codec_context.channels)
        return cls(container, stream, packets, block_samples, max_samples, max_duration_s)

    @property
    def damaged_packets(self) -> int:
        """Packets skipped so far because they did not decode."""
        return self._bad_packets

    def read_block(self) -> _Float32Array | None:
        """The next block of samples, or None once the audio is exhausted.

        Every block but the last holds exactly `block_s` seconds. Decoded frames are copied
        into the block as they come, so a call holds one block and one packet's samples.
        """
        block = np.empty(self._block_samples, np.float32)
        filled = 0
        while True:
            while self._pending and filled < block.size:
                piece = self._pending[0]
                taken = min(block.size - filled, piece.size)
                block[filled : filled + taken] = piece[:taken]
                filled += taken
                if taken == piece.size:
                    self._pending.popleft()
                else:
                    self._pending[0] = piece[taken:]
            if filled == block.size or self._exhausted:
                break
            self._decode_next_packet()
        return block[:filled] if filled else None

    def close(self) -> None:
        """Free FFmpeg's state (idempotent); the file stays open."""
        self._container.close()

    def __enter__(self) -> MediaReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[_Float32Array]:
        while (block := self.read_block()) is not None:
            yield block

    def _decode_next_packet(self) -> None:
        try:
            packet = next(self._packets)
        except StopIteration:
            self._finish()
            return
        except av.error.FFmpegError as exc:
            if not self._samples_out:
                raise BadAudio(f"could not read the {self._describe()} audio: "
                               f"{_ffmpeg_reason(exc)}") from None
            # Past some audio, an unreadable rest is treated as a file cut short.
            self._cut_short = True
            self._note_error(exc)
            self._finish()
            return
        # The demuxer ends with an empty packet, which drains the decoder: not counted.
        self._packets_read += 1 if packet.size else 0
        try:
            frames = self._stream.codec_context.decode(packet)
        except av.error.FFmpegError as exc:
            self._bad_packets += 1
            self._bad_in_a_row += 1
            self._note_error(exc)
            if self._bad_in_a_row >= _MAX_BAD_PACKETS_IN_A_ROW:
                raise BadAudio(
                    f"the {self._describe()} audio is damaged: {self._bad_in_a_row} packets in a row "
                    f"did not decode, after {self._position_s():.1f} s of audio "
                    f"(FFmpeg: {self._last_error})") from None
            return
        self._bad_in_a_row = 0
        for frame in frames:
            self._add(self._convert(frame))

    def _convert(self, frame: AudioFrame) -> _Float32Array:
        """One frame as 16 kHz mono float32; the resampler's delay is held back until `_finish`."""
        rate_hz = frame.sample_rate
        if not MIN_SAMPLE_RATE_HZ <= rate_hz <= MAX_SAMPLE_RATE_HZ:
            raise BadAudio(f"the {self._describe()} audio's sample rate must be between "
                           f"{MIN_SAMPLE_RATE_HZ} and {MAX_SAMPLE_RATE_HZ} Hz, got {rate_hz}")
        fmt, interleaved = _interleaved(frame)
        if self._converter is None or self._converter.format != AudioFormat(rate_hz, *fmt):
            # A chained Ogg stream or a new ADTS configuration can change the format mid-file.
            self._flush_resampler()
            self._converter = StreamConverter.for_format(AudioFormat(rate_hz, *fmt))
        return self._converter.convert(interleaved)

    def _flush_resampler(self) -> None:
        if self._converter is not None:
            self._add(self._converter.convert(b"", last=True))
            self._converter = None

    def _add(self, samples: _Float32Array) -> None:
        if not samples.size:
            return
        self._samples_out += samples.size
        if self._max_samples is not None and self._samples_out > self._max_samples:
            raise PayloadTooLarge(
                f"the file's audio must be at most {self._max_duration_s:g} s long; "
                f"it decodes to more than that")
        self._pending.append(samples)

    def _finish(self) -> None:
        """Drain the resampler (and the decoder, if the demuxer did not), and check that
        something decoded."""
        self._exhausted = True
        if self._cut_short:  # the demuxer stopped before its draining packet
            try:
                for frame in self._stream.codec_context.decode(None):
                    self._add(self._convert(frame))
            except av.error.FFmpegError:
                pass  # what the decoder held is lost, as with the packet being read
        self._flush_resampler()
        if self._packets_read and self._bad_packets == self._packets_read:
            raise BadAudio(f"the {self._describe()} audio is damaged: none of its "
                           f"{self._packets_read} packets decoded (FFmpeg: {self._last_error})")
        if self._bad_packets or self._cut_short:
            log.warning("media.damaged format=%s codec=%s packets_skipped=%d packets=%d "
                        "cut_short=%s decoded_s=%.1f error=%s", self._container.format.name,
                        self._stream.codec_context.name, self._bad_packets, self._packets_read,
                        self._cut_short, self._position_s(), self._last_error_type)

    def _note_error(self, exc: av.error.FFmpegError) -> None:
        self._last_error, self._last_error_type = _ffmpeg_reason(exc), type(exc).__name__

    def _describe(self) -> str:
        return f"{_container_name(self._container)} file's {self._stream.codec_context.name}"

    def _position_s(self) -> float:
        return self._samples_out / SAMPLE_RATE_HZ


@attrs.define
class _FileWindow:
    """`file` seen from `base` on, with no `close`: FFmpeg seeks from the start of what it is given."""

    _file: IO[bytes]
    _base: int

    def read(self, size: int = -1) -> bytes:
        return self._file.read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 0:
            offset += self._base
        return self._file.seek(offset, whence) - self._base

    def tell(self) -> int:
        return self._file.tell() - self._base

    def seekable(self) -> bool:
        return True


def _open_container(file: _FileWindow, head: bytes) -> InputContainer:
    """Open `file` with one of the accepted demuxers; `head` is its first bytes, for messages."""
    try:
        return av.open(file, mode="r", container_options=_CONTAINER_OPTIONS,
                       metadata_errors="replace")
    except av.error.FFmpegError as exc:
        looks_like, is_audio = _sniff(head)
        if is_audio:
            # Recognised but unreadable: most often an upload cut short, such as an MP4 file
            # whose index (written last) is missing. Not audio we can decode, so still 415.
            raise UnsupportedMedia(f"could not read the file as audio: it looks like {looks_like}, "
                                   f"but FFmpeg cannot open it ({_ffmpeg_reason(exc)}); "
                                   "is it cut short or damaged?") from None
        raise UnsupportedMedia(f"the file is not audio in a format we accept ({ACCEPTED_FORMATS}): "
                               f"it looks like {looks_like}") from None


def _audio_stream(container: InputContainer) -> AudioStream:
    """The first audio stream, if FFmpeg can decode it."""
    if not container.streams.audio:
        found = ", ".join(f"{stream.type} ({_codec_name(stream)})" for stream in container.streams)
        raise UnsupportedMedia(f"the file is not audio: its {_container_name(container)} "
                               f"container holds no audio stream (found {found or 'no streams'})")
    stream = container.streams.audio[0]
    if stream.codec_context is None:  # FFmpeg has no decoder for its codec
        raise UnsupportedMedia(f"the file's audio codec {_codec_name(stream)!r} is not one we can decode")
    return stream


def _container_name(container: InputContainer) -> str:
    """A short name for the format FFmpeg opened: "mov,mp4,m4a,3gp,3g2,mj2" is MP4."""
    name = container.format.name.split(",")[0]
    return _CONTAINER_NAMES.get(name, name)


def _codec_name(stream: object) -> str:
    context = getattr(stream, "codec_context", None)
    return str(getattr(context, "name", "unknown")) if context is not None else "unknown"


def _check_declared_duration(container: InputContainer, stream: AudioStream,
                             max_duration_s: float | None) -> None:
    """Refuse at once a file whose header declares more audio than we would decode."""
    if max_duration_s is None:
        return
    if stream.duration is not None and stream.time_base is not None:
        declared_s = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        declared_s = container.duration / _MICROSECONDS
    else:
        return
    if declared_s > max_duration_s:
        raise PayloadTooLarge(f"the file's audio must be at most {max_duration_s:g} s long, "
                              f"it declares {declared_s:.1f} s")


def _interleaved(frame: AudioFrame) -> tuple[tuple[int, SampleFormat], bytes]:
    """A decoded frame's channel count and sample format, and its samples as interleaved bytes:
    what the one audio converter takes (it scales, downmixes and resamples them)."""
    fmt = frame.format
    channels = frame.layout.nb_channels
    if not 1 <= channels <= MAX_CHANNELS:
        raise BadAudio(f"the file's audio must have between 1 and {MAX_CHANNELS} channels, "
                       f"got {channels}")
    sample_format = _SAMPLE_FORMATS.get(fmt.packed.name)
    if sample_format is None:
        raise UnsupportedMedia(f"the file's audio sample format {fmt.name!r} is not supported")
    if fmt.is_planar and channels >= _AV_NUM_DATA_POINTERS:
        frame = _interleave(frame)
    codes = frame.to_ndarray()
    # Planar frames come as (channels, samples), packed ones as (1, samples * channels); both
    # in the machine's byte order, which is little-endian wherever sttd runs (x86-64, ARM64).
    interleaved = codes.T if frame.format.is_planar else codes
    return (channels, sample_format), np.ascontiguousarray(interleaved).tobytes()


def _interleave(frame: AudioFrame) -> AudioFrame:
    """`frame` (planar) as one packed frame, converted by FFmpeg.

    PyAV finds a frame's planes by walking FFmpeg's plane pointers up to a NULL, which is there
    only for fewer than 8 channels (`AVFrame.data` holds 8): from 8 on (7.1 AAC has 8), `planes`
    and `to_ndarray` read past the pointers and can crash the process. A packed frame has one
    plane.
    """
    try:
        converted = av.AudioResampler(format=frame.format.packed).resample(frame)
    except av.error.FFmpegError as exc:
        raise BadAudio(f"the file's {frame.layout.nb_channels}-channel audio could not be converted "
                       f"(FFmpeg: {_ffmpeg_reason(exc)})") from None
    if len(converted) != 1 or converted[0].samples != frame.samples:  # a format change buffers nothing
        raise BadAudio(f"the file's {frame.layout.nb_channels}-channel audio could not be converted")
    return converted[0]


def _ffmpeg_reason(exc: av.error.FFmpegError) -> str:
    """FFmpeg's message without PyAV's errno and file name decorations."""
    return exc.strerror or type(exc).__name__


# (offset, signature, what it is, whether it is audio we accept), tried in order.
_SIGNATURES: Final[tuple[tuple[int, bytes, str, bool], ...]] = (
    (0, b"fLaC", "FLAC", True),
    (0, b"OggS", "Ogg", True),
    (0, b"ID3", "MP3", True),
    (4, b"ftyp", "MP4/M4A", True),
    (0, b"\x1a\x45\xdf\xa3", "WebM/Matroska", True),
    (0, b"RF64", "an RF64 WAV file", True),
    (0, b"riff\x2e\x91\xcf\x11", "Wave64", True),
    (0, b"caff", "CAF", True),
    (0, b"#!AMR", "AMR", True),
    (0, b"\x30\x26\xb2\x75\x8e\x66\xcf\x11", "ASF/WMA", True),
    (0, b"\x89PNG", "a PNG image", False),
    (0, b"\xff\xd8\xff", "a JPEG image", False),
    (0, b"GIF8", "a GIF image", False),
    (0, b"%PDF", "a PDF document", False),
    (0, b"PK\x03\x04", "a ZIP archive (or an Office document)", False),
    (0, b"\x1f\x8b", "gzip data", False),
)


def _sniff(head: bytes) -> tuple[str, bool]:
    """What a file's first bytes suggest it is, and whether that is an audio format we accept."""
    for offset, signature, name, is_audio in _SIGNATURES:
        if head[offset : offset + len(signature)] == signature:
            return name, is_audio
    if is_wav(head):
        return "WAV", True
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "AIFF", True
    if head[:4] == b"RIFF":
        return f"a RIFF file of type {head[8:12].decode('latin-1')!r}, not WAVE", False
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xF6 == 0xF0:
        return "AAC (ADTS)", True
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:
        return "MP3", True
    if _is_text(head):
        return "text", False
    return "unrecognised binary data", False


def _is_text(head: bytes) -> bool:
    """Whether `head` is UTF-8 text (it may stop inside a character) without control codes."""
    text = head.decode("utf-8", errors="ignore")
    if len(text.encode("utf-8")) < len(head) - 3:
        return False
    return all(char.isprintable() or char in "\t\n\r\f" for char in text)
