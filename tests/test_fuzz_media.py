"""Fuzzing the PyAV reader with hypothesis: arbitrary bytes, and valid files cut, overwritten,
spliced and bit-flipped.

Every input must end one of two ways: `UnsupportedMedia`, `BadAudio` or `PayloadTooLarge` with a
short message that says what was wrong (no FFmpeg errno, no PyAV file name), or 16 kHz mono
float32 blocks, finite and in [-1, 1], each of the asked length but the last. Nothing else may
escape: an FFmpeg error would be a 500 on the file routes.
"""

from __future__ import annotations

import io
from functools import cache
from typing import Final

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sttd.errors import BadAudio, PayloadTooLarge, UnsupportedMedia
from sttd.audio import MediaReader
from tests.conftest import load_pcm, silence
from tests.test_formats import encode_media

_EXAMPLES: Final = 150
_FUZZ = settings(max_examples=_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_MAX_ERROR_CHARS: Final = 400  # a sentence, plus the list of accepted formats
_BLOCK_S: Final = 0.5
# Bounds the work on a mutation that declares a lower sample rate or a longer stream.
_MAX_DURATION_S: Final = 30.0

_SEEDS: Final = {
    "flac": ("flac", "flac", 44100, "stereo"),
    "opus": ("ogg", "libopus", 48000, "stereo"),
    "mp3": ("mp3", "libmp3lame", 44100, "stereo"),
    "m4a": ("ipod", "aac", 44100, "stereo"),
    "webm": ("webm", "libopus", 48000, "mono"),
    "adts": ("adts", "aac", 22050, "mono"),
}


@cache
def _seed(name: str) -> bytes:
    container, codec, rate_hz, layout = _SEEDS[name]
    pcm = np.concatenate((silence(0.2), load_pcm("ps_goforward")[:16000], silence(0.2)))
    return encode_media(pcm, container, codec, rate_hz=rate_hz, layout=layout)


def _outcome(data: bytes) -> int | UnsupportedMedia | BadAudio | PayloadTooLarge:
    """Samples decoded, or the error; checks the blocks and the message on the way."""
    block_samples = round(_BLOCK_S * 16000)
    sizes = []
    try:
        with MediaReader.from_file(io.BytesIO(data), block_s=_BLOCK_S,
                                   max_duration_s=_MAX_DURATION_S) as reader:
            for block in reader:
                assert block.dtype == np.float32
                assert block.ndim == 1
                assert np.all(np.isfinite(block)), "NaN or Inf reached the decoded audio"
                assert np.all(np.abs(block) <= 1.0)
                sizes.append(block.size)
    except (UnsupportedMedia, BadAudio, PayloadTooLarge) as exc:
        message = str(exc)
        assert message.startswith(("the ", "could not read the ")), message
        assert len(message) <= _MAX_ERROR_CHARS, message
        assert "Errno" not in message and "<none>" not in message, message
        return exc
    assert all(size == block_samples for size in sizes[:-1])
    assert not sizes or 0 < sizes[-1] <= block_samples
    assert sum(sizes) <= _MAX_DURATION_S * 16000
    return sum(sizes)


_PREFIXES = st.sampled_from([b"", b"fLaC", b"OggS", b"ID3\x04\x00\x00\x00\x00\x00\x00", b"\xff\xfb\x90\x00",
                             b"\xff\xf1\x50\x80", b"\x00\x00\x00\x20ftypM4A ", b"\x1a\x45\xdf\xa3",
                             b"RF64\xff\xff\xff\xffWAVE", b"FORM\x00\x00\x00\x00AIFF", b"caff"])


@_FUZZ
@given(prefix=_PREFIXES, data=st.binary(max_size=4096))
def test_arbitrary_bytes(prefix: bytes, data: bytes) -> None:
    _outcome(prefix + data)


@pytest.mark.parametrize("name", list(_SEEDS))
@_FUZZ
@given(data=st.data())
def test_damaged_files(name: str, data: st.DataObject) -> None:
    original = _seed(name)
    size = len(original)
    kind = data.draw(st.sampled_from(["cut", "overwrite", "flip", "splice"]))
    if kind == "cut":
        damaged = original[: data.draw(st.integers(0, size))]
    elif kind == "overwrite":
        start = data.draw(st.integers(0, size))
        junk = data.draw(st.binary(min_size=1, max_size=512))
        damaged = original[:start] + junk + original[start + len(junk):]
    elif kind == "flip":
        flipped = bytearray(original)
        for position in data.draw(st.lists(st.integers(0, size - 1), min_size=1, max_size=16)):
            flipped[position] ^= 1 << data.draw(st.integers(0, 7))
        damaged = bytes(flipped)
    else:  # a stretch repeated or dropped, as a bad copy or a resumed upload would leave
        start = data.draw(st.integers(0, size))
        end = data.draw(st.integers(start, size))
        damaged = original[:end] + original[start:] if data.draw(st.booleans()) else original[:start] + original[end:]
    _outcome(damaged)


@pytest.mark.parametrize("name", list(_SEEDS))
def test_undamaged_seeds_decode(name: str) -> None:
    decoded = _outcome(_seed(name))
    assert isinstance(decoded, int)
    assert abs(decoded - 0.4 * 16000 - 16000) <= 2048  # lossy coders may pad by up to two frames
