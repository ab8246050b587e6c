"""Open an audio file of any accepted format: the numpy WAV reader, or FFmpeg for the rest."""

from __future__ import annotations

import os
from typing import IO, Final

import numpy as np
import numpy.typing as npt

from sttd.audio._media import MediaReader
from sttd.audio._pcm import float32_to_pcm16
from sttd.audio._wav import WavReader, is_wav
from sttd.errors import UnsupportedWavEncoding

__all__ = ["AudioReader", "open_audio", "read_audio"]

AudioReader = WavReader | MediaReader
_HEAD_BYTES: Final = 12


def open_audio(file: IO[bytes], *, block_s: float = 10.0,
               max_duration_s: float | None = None) -> AudioReader:
    """A reader of 16 kHz mono float32 blocks for the audio file that starts at `file`'s position.

    A RIFF/WAVE file in PCM or IEEE float is read in pure numpy; anything else (a WAV in
    another encoding too: mu-law, A-law, ADPCM...) goes to FFmpeg, which may decode at most
    `max_duration_s` of audio. `file` must be seekable; it is not closed, but a `MediaReader`
    must be. Blocking: run it in a worker thread. Raises `UnsupportedMedia`, `BadAudio` or
    `PayloadTooLarge` as the readers do.
    """
    base = file.tell()
    head = file.read(_HEAD_BYTES)
    file.seek(base)
    if is_wav(head):
        try:
            return WavReader.from_file(file, block_s=block_s)
        except UnsupportedWavEncoding:
            file.seek(base)  # telephony WAVs that FFmpeg's wav demuxer decodes
    return MediaReader.from_file(file, block_s=block_s, max_duration_s=max_duration_s)


def read_audio(path: str | os.PathLike[str]) -> npt.NDArray[np.int16]:
    """A whole file's audio as 16 kHz mono int16, read exactly as the server reads an upload.

    Blocking file I/O and CPU work: async callers run it in a worker thread. Raises
    `UnsupportedMedia` or `BadAudio` as `open_audio` does, and `OSError` if the file cannot
    be read.
    """
    with open(path, "rb") as file:
        reader = open_audio(file)
        try:
            blocks = list(reader)
        finally:
            if isinstance(reader, MediaReader):
                reader.close()
    if not blocks:
        return np.zeros(0, np.int16)
    return float32_to_pcm16(np.concatenate(blocks))
