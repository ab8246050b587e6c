"""The server's one sample format (16 kHz mono), and the conversions to and from PCM16.

Everything sttd transcribes is 16 kHz mono: float32 in [-1, 1] for the backends, int16 for the
VAD and the session's buffers. `clean` is the one place that makes samples finite and in range:
decoders and the resampler overshoot full scale, and float inputs may hold NaN or infinities.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

__all__ = ["SAMPLES_PER_MS", "SAMPLE_RATE_HZ", "clean", "float32_to_pcm16", "pcm16_to_float32", "quantise"]

SAMPLE_RATE_HZ: Final[int] = 16000
SAMPLES_PER_MS: Final[int] = SAMPLE_RATE_HZ // 1000

_Float32Array = npt.NDArray[np.float32]
_Int16Array = npt.NDArray[np.int16]


def clean(samples: npt.NDArray[np.floating]) -> _Float32Array:
    """`samples` as finite float32 in [-1, 1]: NaN to 0, infinities and overshoot clipped.

    Cleaned in the source precision, so that float64 beyond float32's range cannot overflow.
    """
    return _finite_clipped(samples).astype(np.float32, copy=False)


def _finite_clipped(samples: npt.NDArray[np.floating]) -> npt.NDArray[np.floating]:
    cleaned: npt.NDArray[np.floating] = np.nan_to_num(samples, nan=0.0, posinf=1.0, neginf=-1.0)
    np.clip(cleaned, -1.0, 1.0, out=cleaned)
    return cleaned


def pcm16_to_float32(pcm: _Int16Array) -> _Float32Array:
    """Convert int16 samples to float32 in [-1, 1) by dividing by 32768."""
    if pcm.dtype != np.int16:
        raise ValueError(f"pcm dtype must be int16, got {pcm.dtype}")
    return pcm.astype(np.float32) / np.float32(32768)


def float32_to_pcm16(x: npt.NDArray[np.floating]) -> _Int16Array:
    """Convert float samples to int16: NaN to 0, clip to [-1, 1], scale by 32768 and round."""
    return quantise(x, 16).astype(np.int16)


def quantise(x: npt.NDArray[np.floating], bits: int) -> npt.NDArray[np.int64]:
    """Signed integer codes for `bits`-bit PCM: cleaned (`clean`), scaled and rounded."""
    full_scale = 2 ** (bits - 1)
    cleaned = _finite_clipped(x.astype(np.float64))
    codes: npt.NDArray[np.int64] = np.clip(
        np.rint(cleaned * full_scale), -full_scale, full_scale - 1).astype(np.int64)
    return codes
