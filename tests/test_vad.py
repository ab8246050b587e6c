"""Tests for sttd.vad: the energy classifier and the endpointer's exact event positions."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sttd.vad import EnergyClassifier, Endpointer, SpeechEnd, SpeechStart, VadEvent, frame_rms

SAMPLES_PER_MS = 16
FRAME = 320  # 20 ms at 16 kHz
# A 300 Hz sine completes exactly 6 periods per 20 ms frame, so every whole frame of it has the
# same RMS, 1000 / sqrt(2) ~ 707, well above the threshold of 300.
SPEECH_AMPLITUDE = 1000
THRESHOLD = 300.0


def sine(ms: int, amplitude: int = SPEECH_AMPLITUDE, hz: int = 300) -> npt.NDArray[np.int16]:
    t_s = np.arange(ms * SAMPLES_PER_MS) / 16000
    return np.round(amplitude * np.sin(2 * np.pi * hz * t_s)).astype(np.int16)


def quiet(ms: int) -> npt.NDArray[np.int16]:
    return np.zeros(ms * SAMPLES_PER_MS, np.int16)


def signal(*parts: npt.NDArray[np.int16]) -> npt.NDArray[np.int16]:
    return np.concatenate(parts)


def endpointer(silence_ms: int = 500, min_speech_ms: int = 60, frame_ms: int = 20) -> Endpointer:
    return Endpointer(EnergyClassifier(THRESHOLD, frame_ms), silence_ms=silence_ms, min_speech_ms=min_speech_ms)


def ms(milliseconds: int) -> int:
    return milliseconds * SAMPLES_PER_MS


# --- the classifier ----------------------------------------------------------------------------


def test_frame_rms() -> None:
    assert frame_rms(np.zeros(0, np.int16)) == 0.0
    assert frame_rms(np.array([3, -4], np.int16)) == pytest.approx(math.sqrt(12.5))
    assert frame_rms(np.full(10, -32768, np.int16)) == 32768.0  # no int16 overflow
    assert frame_rms(sine(20)) == pytest.approx(SPEECH_AMPLITUDE / math.sqrt(2), rel=1e-3)


@pytest.mark.parametrize(("frame_ms", "samples"), [(10, 160), (20, 320), (30, 480)])
def test_classifier_frame_samples(frame_ms: int, samples: int) -> None:
    assert EnergyClassifier(THRESHOLD, frame_ms).frame_samples == samples


def test_classifier_is_speech_strictly_above_threshold() -> None:
    classifier = EnergyClassifier(THRESHOLD)
    frame = np.zeros(FRAME, np.int16)
    assert classifier.is_speech(frame, 300.0) is False
    assert classifier.is_speech(frame, 300.001) is True
    assert classifier.is_speech(frame, 0.0) is False


def test_the_energy_classifier_decides_every_frame_from_its_rms_alone() -> None:
    classifier = EnergyClassifier(THRESHOLD)
    assert [classifier.decide(rms) for rms in (0.0, 300.0, 300.001)] == [False, False, True]


@pytest.mark.parametrize("kwargs", [{"threshold_rms": 0}, {"threshold_rms": -1}, {"threshold_rms": 1, "frame_ms": 0}])
def test_classifier_validates(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="must be > 0"):
        EnergyClassifier(**kwargs)


def test_endpointer_validates() -> None:
    with pytest.raises(ValueError, match="silence_ms"):
        endpointer(silence_ms=0)
    with pytest.raises(ValueError, match="min_speech_ms"):
        endpointer(min_speech_ms=-1)


# --- events ------------------------------------------------------------------------------------


def test_one_burst_gives_start_and_end_at_exact_samples() -> None:
    vad = endpointer()
    events = vad.feed(signal(quiet(1000), sine(1000), quiet(1000)))
    assert events == [SpeechStart(ms(1000)), SpeechEnd(ms(2000))]
    assert vad.position == ms(3000)
    assert vad.in_speech is False


def test_silence_alone_gives_nothing() -> None:
    vad = endpointer()
    assert vad.feed(quiet(5000)) == []
    assert vad.feed(sine(1000, amplitude=400)) == []  # RMS 283: below the threshold
    assert vad.in_speech is False


def test_speech_end_waits_exactly_silence_ms() -> None:
    vad = endpointer(silence_ms=500)
    assert vad.feed(signal(quiet(1000), sine(1000), quiet(480))) == [SpeechStart(ms(1000))]
    assert vad.in_speech is True
    assert vad.feed(quiet(19)) == []  # not a whole frame yet
    assert vad.feed(quiet(1)) == [SpeechEnd(ms(2000))]  # 500 ms of silence: emitted now
    assert vad.position == ms(2500)
    assert vad.in_speech is False


@pytest.mark.parametrize("silence_ms", [20, 100, 300, 1000])
def test_speech_end_emitted_on_the_frame_completing_silence_ms(silence_ms: int) -> None:
    vad = endpointer(silence_ms=silence_ms)
    vad.feed(signal(quiet(200), sine(400)))
    positions = []
    for _ in range(200):
        if vad.feed(quiet(20)) == [SpeechEnd(ms(600))]:
            positions.append(vad.position)
    assert positions == [ms(600 + silence_ms)]


def test_speech_start_is_the_first_frame_of_the_run() -> None:
    vad = endpointer(min_speech_ms=60)
    events = []
    for _ in range(10):
        events.extend(vad.feed(quiet(20)))
    for index in range(5):
        events.extend(vad.feed(sine(20)))
        # Emitted after the third speech frame (60 ms), pointing back at the first.
        assert events == ([SpeechStart(ms(200))] if index >= 2 else [])


@pytest.mark.parametrize(
    ("min_speech_ms", "burst_ms", "expected"),
    [
        (60, 20, []),
        (60, 40, []),
        (60, 60, [SpeechStart(ms(1000)), SpeechEnd(ms(1060))]),
        (100, 80, []),
        (100, 100, [SpeechStart(ms(1000)), SpeechEnd(ms(1100))]),
        (0, 20, [SpeechStart(ms(1000)), SpeechEnd(ms(1020))]),
    ],
)
def test_blips_shorter_than_min_speech_are_ignored(min_speech_ms: int, burst_ms: int, expected: list[VadEvent]) -> None:
    vad = endpointer(min_speech_ms=min_speech_ms)
    assert vad.feed(signal(quiet(1000), sine(burst_ms), quiet(1000))) == expected


def test_separate_blips_do_not_add_up() -> None:
    # Three 40 ms blips 20 ms apart: 120 ms of speech, but never 60 ms in a row.
    blip = signal(sine(40), quiet(20))
    vad = endpointer(min_speech_ms=60)
    assert vad.feed(signal(quiet(500), blip, blip, blip, quiet(1000))) == []


def test_pause_shorter_than_silence_ms_keeps_one_utterance() -> None:
    vad = endpointer(silence_ms=500)
    events = vad.feed(signal(quiet(1000), sine(500), quiet(480), sine(500), quiet(1000)))
    assert events == [SpeechStart(ms(1000)), SpeechEnd(ms(2480))]


def test_two_bursts_give_two_utterances() -> None:
    vad = endpointer(silence_ms=500)
    events = vad.feed(signal(quiet(1000), sine(500), quiet(500), sine(300), quiet(700)))
    assert events == [SpeechStart(ms(1000)), SpeechEnd(ms(1500)), SpeechStart(ms(2000)), SpeechEnd(ms(2300))]


def test_unaligned_speech_snaps_to_frames() -> None:
    # Speech from 1005 ms to 2005 ms: the frames [1000, 1020) and [2000, 2020) are three quarters
    # and one quarter sine, RMS about 612 and 354, both above 300, so both count as speech.
    vad = endpointer()
    events = vad.feed(signal(quiet(1005), sine(1000), quiet(995)))
    assert events == [SpeechStart(ms(1000)), SpeechEnd(ms(2020))]


def test_other_frame_sizes() -> None:
    # 30 ms frames: a sine starting at 1000 ms first fills the frame [990, 1020) by two thirds.
    vad = endpointer(frame_ms=30, min_speech_ms=90)
    events = vad.feed(signal(quiet(1000), sine(600), quiet(1000)))
    assert events == [SpeechStart(ms(990)), SpeechEnd(ms(1620))]


def test_events_in_one_feed_come_in_order() -> None:
    vad = endpointer(silence_ms=200)
    burst = signal(sine(100), quiet(300))
    events = vad.feed(signal(*[burst] * 4))
    assert events == [
        event for k in range(4) for event in (SpeechStart(ms(400 * k)), SpeechEnd(ms(400 * k + 100)))
    ]


# --- feed() splitting --------------------------------------------------------------------------


_SPLIT_SIGNAL = signal(
    quiet(300), sine(40), quiet(100), sine(700), quiet(300), sine(213), quiet(600),
    sine(1000, amplitude=600, hz=440), quiet(517), sine(60), quiet(510),
)
_SPLIT_EVENTS = endpointer().feed(_SPLIT_SIGNAL)


def test_split_signal_reference_events() -> None:
    # The 40 ms blip is ignored; 700 + 300 + 213 ms merge (a 300 ms pause < 500 ms), ending with
    # the frame [1640, 1660) that is 13/20 sine. The 440 Hz burst at 2253 ms only fills 7/20 of
    # [2240, 2260) (RMS ~250 < 300), so it starts at 2260. The 60 ms burst at 3770 ms straddles
    # four frames, and its end at 3840 ms is confirmed by the very last frame.
    assert _SPLIT_EVENTS == [
        SpeechStart(ms(440)), SpeechEnd(ms(1660)),
        SpeechStart(ms(2260)), SpeechEnd(ms(3260)),
        SpeechStart(ms(3760)), SpeechEnd(ms(3840)),
    ]


@settings(deadline=None, max_examples=60)
@given(cuts=st.lists(st.integers(min_value=0, max_value=_SPLIT_SIGNAL.size), max_size=40))
def test_events_do_not_depend_on_how_samples_are_split(cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), _SPLIT_SIGNAL.size]
    vad = endpointer()
    events = []
    for lo, hi in zip(bounds, bounds[1:]):
        events.extend(vad.feed(_SPLIT_SIGNAL[lo:hi]))
    assert events == _SPLIT_EVENTS
    assert vad.position == _SPLIT_SIGNAL.size - _SPLIT_SIGNAL.size % FRAME


def test_position_counts_only_whole_frames() -> None:
    vad = endpointer()
    vad.feed(quiet(10))
    assert vad.position == 0
    vad.feed(np.zeros(330, np.int16))  # 160 + 330 = 490 samples: one whole frame
    assert vad.position == FRAME
    vad.feed(np.zeros(0, np.int16))
    assert vad.position == FRAME


# --- reset -------------------------------------------------------------------------------------


def test_reset_leaves_speech_without_an_end_event() -> None:
    vad = endpointer()
    assert vad.feed(signal(quiet(1000), sine(500))) == [SpeechStart(ms(1000))]
    vad.reset()
    assert vad.in_speech is False
    assert vad.position == ms(1500)
    assert vad.feed(quiet(2000)) == []


def test_speech_after_reset_starts_a_new_run_at_the_next_frame() -> None:
    vad = endpointer()
    vad.feed(signal(quiet(1000), sine(500)))
    vad.reset()
    assert vad.feed(sine(40)) == []  # a fresh run needs min_speech_ms again
    assert vad.feed(signal(sine(460), quiet(600))) == [SpeechStart(ms(1500)), SpeechEnd(ms(2000))]


def test_reset_forgets_a_run_below_min_speech() -> None:
    vad = endpointer(min_speech_ms=60)
    vad.feed(signal(quiet(100), sine(40)))
    vad.reset()
    # 40 ms + 40 ms would have made a run of 80 ms without the reset.
    assert vad.feed(signal(sine(40), quiet(1000))) == []


# --- quietest_sample ---------------------------------------------------------------------------


def _loud_with_dips() -> Endpointer:
    vad = endpointer()
    # 3 s of loud sine with a soft stretch (amplitude 200) at 1.0 s and a silent dip at 2.0 s.
    vad.feed(signal(sine(1000), sine(100, amplitude=200), sine(900), quiet(100), sine(900)))
    return vad


def test_quietest_sample_finds_the_dip() -> None:
    vad = _loud_with_dips()
    assert vad.in_speech is True  # 100 ms dips do not end the utterance
    assert vad.quietest_sample(0, ms(3000)) == ms(2000)
    assert vad.quietest_sample(ms(1500), ms(3000)) == ms(2000)


def test_quietest_sample_only_looks_inside_the_range() -> None:
    vad = _loud_with_dips()
    assert vad.quietest_sample(0, ms(2000)) == ms(1000)  # the silent dip is outside
    assert vad.quietest_sample(ms(1040), ms(1800)) == ms(1040)


def test_quietest_sample_uses_whole_frames_inside_the_range() -> None:
    vad = _loud_with_dips()
    # The dip spans frames 2000..2100 ms; 2000 ms + 1 sample is inside, so the next frame is chosen.
    assert vad.quietest_sample(ms(2000) + 1, ms(3000)) == ms(2020)
    # [1980, 2020) less one sample wholly holds only the loud frame [1980, 2000), not the dip's first.
    assert vad.quietest_sample(ms(1980), ms(2020) - 1) == ms(1980)


@pytest.mark.parametrize(("start", "end"), [(ms(100), ms(100) + FRAME - 1), (ms(3000), ms(4000)), (ms(500), ms(400))])
def test_quietest_sample_none_without_a_whole_classified_frame(start: int, end: int) -> None:
    assert _loud_with_dips().quietest_sample(start, end) is None


def test_quietest_sample_forgets_beyond_30_s_of_history() -> None:
    vad = endpointer()
    vad.feed(signal(quiet(1000), sine(39_000)))  # 40 s: the first 10 s are forgotten
    assert vad.quietest_sample(0, ms(10_000)) is None
    assert vad.quietest_sample(0, ms(10_020)) == ms(10_000)
