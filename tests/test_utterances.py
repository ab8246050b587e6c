"""Tests for sttd.session's utterance tracker: the absolute-index sample buffer and utterance bookkeeping."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sttd.session import SampleBuffer, Utterance, UtteranceTracker
from sttd.vad import EnergyClassifier, Endpointer

SAMPLES_PER_MS = 16


def sine(ms: int, amplitude: int = 1000) -> npt.NDArray[np.int16]:
    """A 300 Hz tone: RMS ~707 per 20 ms frame, speech for a 300 RMS threshold."""
    t_s = np.arange(ms * SAMPLES_PER_MS) / 16000
    return np.round(amplitude * np.sin(2 * np.pi * 300 * t_s)).astype(np.int16)


def quiet(ms: int) -> npt.NDArray[np.int16]:
    return np.zeros(ms * SAMPLES_PER_MS, np.int16)


def signal(*parts: npt.NDArray[np.int16]) -> npt.NDArray[np.int16]:
    return np.concatenate(parts)


def tracker(silence_ms: int = 500, **kwargs: Any) -> UtteranceTracker:
    """A tracker with the server's default partial interval and length limit, unless given."""
    options = {"partial_ms": 500, "max_utterance_s": 15.0, **kwargs}
    return UtteranceTracker(Endpointer(EnergyClassifier(300.0), silence_ms=silence_ms), **options)


def feed_chunks(track: UtteranceTracker, samples: npt.NDArray[np.int16], chunk_ms: int) -> list[Utterance]:
    step = chunk_ms * SAMPLES_PER_MS
    return [job for offset in range(0, samples.size, step) for job in track.feed(samples[offset : offset + step])]


def summary(job: Utterance) -> tuple[str, int, int, int]:
    return job.kind, job.utterance_id, job.start_ms, job.end_ms


def assert_audio(job: Utterance, source: npt.NDArray[np.int16]) -> None:
    """The job's audio is exactly `source` between its start and end times."""
    assert job.audio.dtype == np.int16
    assert job.audio.size == (job.end_ms - job.start_ms) * SAMPLES_PER_MS
    np.testing.assert_array_equal(job.audio, source[job.start_ms * SAMPLES_PER_MS : job.end_ms * SAMPLES_PER_MS])


# --- SampleBuffer --------------------------------------------------------------------------------


def test_sample_buffer_basics() -> None:
    buffer = SampleBuffer()
    assert (buffer.start, buffer.end) == (0, 0)
    buffer.append(np.arange(10, dtype=np.int16))
    buffer.append(np.arange(10, 15, dtype=np.int16))
    assert (buffer.start, buffer.end) == (0, 15)
    np.testing.assert_array_equal(buffer.slice(8, 12), np.array([8, 9, 10, 11], np.int16))
    buffer.trim_before(6)
    assert (buffer.start, buffer.end) == (6, 15)
    np.testing.assert_array_equal(buffer.slice(0, 8), np.array([6, 7], np.int16))  # clamped to what is held
    np.testing.assert_array_equal(buffer.slice(13, 100), np.array([13, 14], np.int16))
    assert buffer.slice(20, 30).size == 0
    assert buffer.slice(9, 7).size == 0
    buffer.trim_before(3)  # before the start: nothing happens
    assert (buffer.start, buffer.end) == (6, 15)
    buffer.trim_before(100)  # past the end: everything goes, indices stay absolute
    assert (buffer.start, buffer.end) == (15, 15)
    buffer.append(np.array([7], np.int16))
    np.testing.assert_array_equal(buffer.slice(0, 100), np.array([7], np.int16))
    assert (buffer.start, buffer.end) == (15, 16)


def test_sample_buffer_slice_is_a_copy() -> None:
    buffer = SampleBuffer()
    buffer.append(np.zeros(5, np.int16))
    part = buffer.slice(0, 5)
    part[:] = 9
    np.testing.assert_array_equal(buffer.slice(0, 5), np.zeros(5, np.int16))


def test_sample_buffer_grows_past_its_initial_capacity() -> None:
    buffer = SampleBuffer()
    data = np.arange(-20000, 20000, dtype=np.int16)
    for piece in np.array_split(data, 7):
        buffer.append(piece)
    np.testing.assert_array_equal(buffer.slice(0, data.size), data)


_ops = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(0, 5000)),
        st.tuples(st.just("trim"), st.integers(-100, 30000)),
        st.tuples(st.just("slice"), st.tuples(st.integers(-100, 30000), st.integers(-100, 30000))),
    ),
    max_size=30,
)


@settings(deadline=None)
@given(ops=_ops)
def test_sample_buffer_matches_reference_model(ops: list[tuple[str, object]]) -> None:
    buffer = SampleBuffer()
    everything = np.zeros(0, np.int16)  # every sample ever appended
    start = 0  # the model's first held absolute index
    counter = 0
    for op, arg in ops:
        if op == "append":
            assert isinstance(arg, int)
            samples = (np.arange(counter, counter + arg) % 65536 - 32768).astype(np.int16)
            counter += arg
            buffer.append(samples)
            everything = np.concatenate((everything, samples))
        elif op == "trim":
            assert isinstance(arg, int)
            buffer.trim_before(arg)
            start = max(start, min(arg, everything.size))
        else:
            assert isinstance(arg, tuple)
            lo, hi = arg
            expected = everything[max(lo, start) : max(min(hi, everything.size), max(lo, start))]
            np.testing.assert_array_equal(buffer.slice(lo, hi), expected)
        assert (buffer.start, buffer.end) == (start, everything.size)
    np.testing.assert_array_equal(buffer.slice(start, everything.size), everything[start:])


# --- finals --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [{"partial_ms": 0}, {"max_utterance_s": 0}, {"preroll_ms": -1}, {"tail_ms": -1}])
def test_tracker_validates(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        tracker(**kwargs)


def test_two_bursts_give_two_finals_with_preroll_and_tail() -> None:
    source = signal(quiet(1000), sine(1000), quiet(1000), sine(500), quiet(1000))
    track = tracker()
    finals = feed_chunks(track, source, chunk_ms=100)
    # Speech [1000, 2000) and [3000, 3500) ms; 300 ms pre-roll, 200 ms tail.
    assert [summary(job) for job in finals] == [("final", 0, 700, 2200), ("final", 1, 2700, 3700)]
    for job in finals:
        assert_audio(job, source)
    assert finals[0].duration_s == 1.5
    assert track.open_utterance_id is None
    assert track.position == source.size


def test_finals_come_from_the_feed_that_confirms_the_end() -> None:
    track = tracker()
    assert track.feed(signal(quiet(1000), sine(1000), quiet(480))) == []
    assert track.open_utterance_id == 0
    finals = track.feed(quiet(20))  # 500 ms of silence now
    assert [summary(job) for job in finals] == [("final", 0, 700, 2200)]
    assert track.open_utterance_id is None


def test_whole_signal_in_one_feed_gives_every_final_in_order() -> None:
    source = signal(quiet(400), *[signal(sine(300), quiet(700))] * 4)
    finals = tracker().feed(source)
    assert [summary(job) for job in finals] == [
        ("final", k, 100 + 1000 * k, 900 + 1000 * k) for k in range(4)
    ]
    for job in finals:
        assert_audio(job, source)


def test_preroll_never_reaches_before_the_previous_utterance_end() -> None:
    # Pre-roll 400 ms, tail 200 ms, pause 560 ms: the second utterance's pre-roll would start at
    # 1660 ms, but the first utterance owns audio up to 1700 ms.
    source = signal(quiet(1000), sine(500), quiet(560), sine(500), quiet(1000))
    finals = tracker(preroll_ms=400).feed(source)
    assert [summary(job) for job in finals] == [("final", 0, 600, 1700), ("final", 1, 1700, 2760)]
    for job in finals:
        assert_audio(job, source)


def test_preroll_never_reaches_before_the_stream_start() -> None:
    source = signal(quiet(100), sine(500), quiet(1000))
    finals = tracker().feed(source)
    assert [summary(job) for job in finals] == [("final", 0, 0, 800)]


def test_tail_is_cut_to_the_audio_received() -> None:
    # With silence_ms (100) < tail_ms (200), the final is emitted before its whole tail arrived.
    track = tracker(silence_ms=100, tail_ms=200)
    assert track.feed(signal(quiet(1000), sine(500))) == []
    finals = feed_chunks(track, quiet(300), chunk_ms=20)
    assert [summary(job) for job in finals] == [("final", 0, 700, 1600)]


# --- commit --------------------------------------------------------------------------------------


def test_commit_without_open_utterance_returns_nothing() -> None:
    track = tracker()
    assert track.commit() == []
    track.feed(quiet(1000))
    assert track.commit() == []
    assert track.open_utterance_id is None


def test_commit_finalizes_at_the_current_position() -> None:
    source = signal(quiet(1000), sine(1000), sine(500), quiet(1000))
    track = tracker()
    assert track.feed(source[: 2000 * SAMPLES_PER_MS]) == []
    assert track.open_utterance_id == 0
    committed = track.commit()
    assert [summary(job) for job in committed] == [("final", 0, 700, 2000)]
    assert_audio(committed[0], source)
    assert track.open_utterance_id is None
    assert track.commit() == []
    # Speech goes on after the commit: a new utterance that starts where the last one ended.
    finals = track.feed(source[2000 * SAMPLES_PER_MS :])
    assert [summary(job) for job in finals] == [("final", 1, 2000, 2700)]
    assert_audio(finals[0], source)


def test_commit_between_frames_and_following_speech() -> None:
    source = signal(quiet(1000), sine(1500), quiet(1000))
    track = tracker()
    track.feed(source[: 2010 * SAMPLES_PER_MS])  # 10 ms into a VAD frame
    assert [summary(job) for job in track.commit()] == [("final", 0, 700, 2010)]
    finals = track.feed(source[2010 * SAMPLES_PER_MS :])
    # The VAD's next run starts at its frame [2000, 2020), but the utterance starts at 2010 ms.
    assert [summary(job) for job in finals] == [("final", 1, 2010, 2700)]
    assert_audio(finals[0], source)


def test_commit_in_trailing_silence_suppresses_the_end_event() -> None:
    track = tracker()
    track.feed(signal(quiet(1000), sine(500), quiet(300)))
    assert [summary(job) for job in track.commit()] == [("final", 0, 700, 1800)]
    assert track.feed(quiet(2000)) == []


# --- partials ------------------------------------------------------------------------------------


@pytest.mark.parametrize("partial_ms", [200, 300, 500])
def test_partials_every_partial_ms_cover_the_utterance_so_far(partial_ms: int) -> None:
    source = signal(quiet(1000), sine(1800), quiet(1000))
    track = tracker(partial_ms=partial_ms)
    assert track.take_partial() is None
    partials: list[Utterance] = []
    finals: list[Utterance] = []
    step = 100 * SAMPLES_PER_MS
    for offset in range(0, source.size, step):
        finals.extend(track.feed(source[offset : offset + step]))
        partial = track.take_partial()
        if partial is not None:
            partials.append(partial)
    # Speech opens at 1000 ms; the first partial comes after half a partial_ms of it (fed in
    # 100 ms steps), the next ones each partial_ms of new audio
    # until the speaker has paused for longer than the 200 ms tail (the speech ended at
    # 2800 ms; the final comes at 3300 ms, 500 ms after it).
    first = 1000 + math.ceil(partial_ms / 2 / 100) * 100
    ends = [end for end in range(first, 3300, partial_ms) if end <= 3000]
    assert [summary(job) for job in partials] == [("partial", 0, 700, end) for end in ends]
    for job in partials:
        assert_audio(job, source)
    assert [summary(job) for job in finals] == [("final", 0, 700, 3000)]
    assert track.take_partial() is None


def test_first_partial_comes_after_half_a_partial_ms_of_speech() -> None:
    track = tracker(partial_ms=1000)
    track.feed(signal(quiet(1000), sine(490)))
    assert track.take_partial() is None
    track.feed(sine(10))
    first = track.take_partial()
    assert first is not None and summary(first) == ("partial", 0, 700, 1500)
    track.feed(sine(999))
    assert track.take_partial() is None  # then every partial_ms
    track.feed(sine(1))
    second = track.take_partial()
    assert second is not None and summary(second) == ("partial", 0, 700, 2500)


def test_a_first_partial_that_showed_nothing_brings_the_next_forward_once() -> None:
    track = tracker(partial_ms=1000)
    track.feed(signal(quiet(1000), sine(500)))
    first = track.take_partial()
    assert first is not None and summary(first) == ("partial", 0, 700, 1500)
    track.feed(sine(200))  # the decode took 200 ms and showed nothing
    track.partial_showed_nothing(first)
    track.feed(sine(290))
    assert track.take_partial() is None
    track.feed(sine(10))  # half a partial_ms after the empty one, not a whole one
    second = track.take_partial()
    assert second is not None and summary(second) == ("partial", 0, 700, 2000)
    track.partial_showed_nothing(second)  # once per utterance: then every partial_ms again
    track.feed(sine(999))
    assert track.take_partial() is None
    track.feed(sine(1))
    third = track.take_partial()
    assert third is not None and summary(third) == ("partial", 0, 700, 3000)


def test_an_empty_partial_of_an_utterance_already_ended_changes_nothing() -> None:
    track = tracker(partial_ms=1000)
    track.feed(signal(quiet(1000), sine(500)))
    stale = track.take_partial()
    assert stale is not None
    assert [summary(job) for job in track.feed(quiet(1000))] == [("final", 0, 700, 1700)]
    track.feed(sine(500))  # the next utterance opens at 2500 ms
    first = track.take_partial()
    assert first is not None and summary(first) == ("partial", 1, 2200, 3000)
    track.partial_showed_nothing(stale)
    track.feed(sine(500))
    assert track.take_partial() is None  # its own schedule: a whole partial_ms after its first


def test_take_partial_is_not_repeated_without_new_audio() -> None:
    track = tracker(partial_ms=500)
    track.feed(signal(quiet(1000), sine(600)))
    first = track.take_partial()
    assert first is not None and summary(first) == ("partial", 0, 700, 1600)
    assert track.take_partial() is None
    track.feed(sine(499))
    assert track.take_partial() is None
    track.feed(sine(1))
    second = track.take_partial()
    assert second is not None and summary(second) == ("partial", 0, 700, 2100)


def test_no_partial_after_commit() -> None:
    track = tracker(partial_ms=100)
    track.feed(signal(quiet(1000), sine(600)))
    track.commit()
    assert track.take_partial() is None


# --- long utterances -----------------------------------------------------------------------------


def test_long_utterance_is_cut_at_the_quiet_dip() -> None:
    # Loud from 1.0 s to 21.0 s with one 100 ms dip at 13.5 s. The utterance opens at 0.7 s (pre-roll)
    # and reaches 15 s at 15.7 s; the cut is searched in the last 3 s, [12.7 s, 15.7 s).
    source = signal(quiet(1000), sine(12_500), quiet(100), sine(7400), quiet(1000))
    track = tracker(max_utterance_s=15)
    jobs = []
    cuts = []
    step = 100 * SAMPLES_PER_MS
    for offset in range(0, source.size, step):
        finals = track.feed(source[offset : offset + step])
        if finals:
            jobs.append((track.position // SAMPLES_PER_MS, [summary(job) for job in finals]))
        for job in finals:
            assert_audio(job, source)
            cuts.append(job.cut)
    assert jobs == [
        (15_700, [("final", 0, 700, 13_500)]),
        (21_500, [("final", 1, 13_500, 21_200)]),
    ]
    assert cuts == [True, False]  # cut at the limit, then ended by the pause


def test_speech_continues_in_the_next_utterance_after_a_cut() -> None:
    source = signal(quiet(1000), sine(12_500), quiet(100), sine(7400))
    track = tracker(max_utterance_s=15, partial_ms=500)
    finals = feed_chunks(track, source, chunk_ms=100)
    assert [summary(job) for job in finals] == [("final", 0, 700, 13_500)]
    assert track.open_utterance_id == 1
    partial = track.take_partial()
    # Partials of the new utterance start at the cut; 21.0 s - 13.5 s of new audio is available.
    assert partial is not None and summary(partial) == ("partial", 1, 13_500, 21_000)
    final = track.commit()
    assert [summary(job) for job in final] == [("final", 1, 13_500, 21_000)]
    assert_audio(final[0], source)


# --- memory --------------------------------------------------------------------------------------


def test_ten_minutes_of_silence_keeps_only_the_preroll() -> None:
    track = tracker(preroll_ms=300)
    second = quiet(1000)
    capacities = []
    for index in range(600):
        assert track.feed(second) == []
        held = track._buffer.end - track._buffer.start
        assert held <= 300 * SAMPLES_PER_MS
        capacities.append(track._buffer._data.size)
    assert track.position == 600 * 16000
    assert track._buffer.end - track._buffer.start == 300 * SAMPLES_PER_MS
    assert capacities[-1] == capacities[10]  # the array stopped growing early on


def test_buffer_shrinks_back_after_speech() -> None:
    track = tracker()
    feed_chunks(track, signal(quiet(1000), sine(10_000), quiet(2000)), chunk_ms=1000)
    assert track._buffer.end - track._buffer.start == 300 * SAMPLES_PER_MS


# --- known bugs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("preroll_ms", "start_ms"), [(300, 700), (0, 1000)])
def test_preroll_is_kept_when_fed_in_20_ms_frames(preroll_ms: int, start_ms: int) -> None:
    source = signal(quiet(1000), sine(1000), quiet(1000))
    finals = feed_chunks(tracker(preroll_ms=preroll_ms), source, chunk_ms=20)
    assert [summary(job) for job in finals] == [("final", 0, start_ms, 2200)]


def test_skip_finalizes_open_speech_and_keeps_stream_times() -> None:
    t = tracker()
    assert t.feed(signal(quiet(1000), sine(600))) == []
    [final] = t.skip(3000 * SAMPLES_PER_MS)  # 3 s that were never kept
    assert final.kind == "final" and final.start_ms == 700 and final.end_ms == 1600
    assert t.position == 4600 * SAMPLES_PER_MS
    assert t.endpointer.position == t.position
    jobs = t.feed(signal(sine(800), quiet(800)))
    [after] = [job for job in jobs if job.kind == "final"]
    assert after.utterance_id == final.utterance_id + 1
    assert after.start_ms == 4600  # pre-roll cannot reach back into the gap
    assert after.end_ms == pytest.approx(4600 + 800 + 200, abs=30)
    assert after.audio.size == (after.end_ms - after.start_ms) * SAMPLES_PER_MS


def test_skip_without_open_speech_gives_nothing() -> None:
    t = tracker()
    t.feed(quiet(333))
    assert t.skip(16000) == []
    assert t.position == 333 * SAMPLES_PER_MS + 16000


def test_no_partial_takes_in_a_pause_past_the_tail() -> None:
    """A partial of a pause shows nothing new, and its audio would run past where the final
    will end (the last speech plus the 200 ms tail): a streaming model fed that far would have
    to decode the final's utterance again from its start."""
    track = tracker(partial_ms=300)
    track.feed(signal(quiet(1000), sine(1000)))
    first = track.take_partial()
    assert first is not None and first.end_ms == 2000
    track.feed(quiet(300))  # 300 ms of new audio, but all of it a pause past the tail
    assert track.take_partial() is None
    track.feed(sine(300))  # speech again: a partial again, over all of it
    assert summary(track.take_partial()) == ("partial", 0, 700, 2600)
    [final] = track.feed(quiet(600))
    assert final.end_ms == 2600 + 200


@pytest.mark.parametrize("chunk_ms", [20, 100])
def test_partial_due_and_speculation_due_say_what_the_takes_would_give(chunk_ms: int) -> None:
    # The session's receive task feeds the core between the infer task's rounds, and hands it
    # a round only when one of these is due (sttd.nursery): they must agree with the takes.
    track = tracker(speculate_ms=200)
    audio = signal(quiet(300), sine(900), quiet(250), sine(700), quiet(900), sine(400),
                   quiet(700))
    step = chunk_ms * SAMPLES_PER_MS
    partials = speculations = 0
    for offset in range(0, audio.size, step):
        track.feed(audio[offset : offset + step])
        partial_due, speculation_due = track.partial_due(), track.speculation_due()
        assert track.partial_due() == partial_due  # asking takes nothing
        assert (track.take_speculative() is not None) == speculation_due
        assert (track.take_partial() is not None) == partial_due
        assert not track.speculation_due() and not track.partial_due()  # taken now
        partials += partial_due
        speculations += speculation_due
    assert partials >= 3 and speculations >= 2
