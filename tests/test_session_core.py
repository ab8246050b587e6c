"""The sans-I/O session core: inputs in, decode requests and events out, in order.

No trio, no engine: the test plays the engine, resolving decodes in any order it likes.
"""

from __future__ import annotations

import attrs
import numpy as np
import pytest

from sttd.api import Close, Commit, Committed, End, Error, Final, Partial, SessionOptions, UtteranceEnd
from sttd.api import Word as StreamWord
from sttd.backends.base import RecognisedWord, Result
from sttd.errors import BackendError
from sttd.session import AudioFrame, Decode, Gap, SessionCore, Stop, UtteranceTracker
from sttd.vad import make_endpointer

LOUD = np.full(16000, 3000, np.int16)  # 1 s above the energy threshold
QUIET = np.zeros(16000, np.int16)


def core(**options: object) -> SessionCore:
    tracker = UtteranceTracker(make_endpointer("energy", threshold_rms=300.0, silence_ms=500),
                               max_utterance_s=15.0, partial_ms=500)
    return SessionCore(tracker, SessionOptions(partial_ms=500, **options))  # type: ignore[arg-type]


def decodes(outputs: list[object]) -> list[Decode]:
    return [out for out in outputs if isinstance(out, Decode)]


def events(outputs: list[object]) -> list[object]:
    return [out for out in outputs if not isinstance(out, Decode)]


def utterance(c: SessionCore, at: float) -> Decode:
    """One second of speech and one of silence: the final it asks for."""
    out = c.feed(AudioFrame(LOUD, at)) + c.feed(AudioFrame(QUIET, at + 1))
    [final] = decodes(out)
    assert final.kind == "final" and final.cause == "speech_end" and final.ended_at == at + 1
    return final


def test_finals_come_out_in_utterance_order_whatever_order_their_decodes_finish() -> None:
    c = core()
    first, second = utterance(c, 0.0), utterance(c, 2.0)
    # The second decode finishes first: its final waits for the first's.
    assert c.decoded(second, Result("two")) == []
    out = c.decoded(first, Result("one"))
    assert [(e.utterance_id, e.text) for e in out if isinstance(e, Final)] == [(0, "one"), (1, "two")]


def test_a_failed_final_is_reported_in_its_turn_and_the_next_goes_on() -> None:
    c = core()
    first, second = utterance(c, 0.0), utterance(c, 2.0)
    assert c.decoded(second, Result("two")) == []
    [error, final] = c.failed(first, BackendError("model fell over"))
    assert isinstance(error, Error) and error.code == "inference_failed"
    assert "utterance 0" in error.message
    assert isinstance(final, Final) and final.text == "two"


def test_final_words_are_in_stream_time_and_empty_finals_are_not_sent() -> None:
    c = core()
    first = utterance(c, 0.0)
    [final] = c.decoded(first, Result("go", words=(RecognisedWord("go", 0.1, 0.4, 0.9),), confidence=0.9),
                        backlog_ms=40)
    assert isinstance(final, Final)
    start = first.utterance.start_ms
    assert final.words == (StreamWord("go", start + 100, start + 400, 0.9),)
    assert (final.backlog_ms, final.confidence) == (40, 0.9)
    assert c.decoded(utterance(c, 2.0), Result("  ")) == []  # noise: nothing to say


def test_a_commit_forces_an_answer_even_when_empty() -> None:
    c = core()
    c.feed(AudioFrame(LOUD, 0.0))
    [final] = decodes(c.feed(Commit(1.0)))
    assert (final.cause, final.forced) == ("commit", True)
    assert c.decoded(final, Result("")) == [Final(0, "", final.utterance.start_ms,
                                                  final.utterance.end_ms, backlog_ms=0,
                                                  cause="commit")]


def test_partials_are_dropped_when_stale_and_when_unchanged() -> None:
    c = core()
    c.feed(AudioFrame(LOUD, 0.0))
    partial = c.take_partial()
    assert partial is not None and partial.kind == "partial"
    assert c.take_partial() is None  # no new speech since
    [shown] = c.decoded(partial, Result("go forward"))
    assert isinstance(shown, Partial) and shown.text == "go forward"
    c.feed(AudioFrame(LOUD[:8000], 1.0))
    again = c.take_partial()
    assert again is not None
    assert c.decoded(again, Result("go forward")) == []  # the same text: not sent twice
    c.feed(AudioFrame(LOUD[:8000], 1.5))
    late = c.take_partial()
    assert late is not None
    [final] = decodes(c.feed(AudioFrame(QUIET, 2.0)))
    # The utterance was finalized while the partial decoded: neither it nor its failure shows.
    assert c.decoded(late, Result("go forward ten")) == []
    assert c.failed(late, BackendError("x")) == []
    assert [type(e) for e in c.decoded(final, Result("go forward ten meters"))] == [Final]


def test_a_partial_that_showed_nothing_has_the_next_come_sooner() -> None:
    c = core()
    c.feed(AudioFrame(LOUD[:4800], 0.0))  # speech opens at once; the first partial is due at 250 ms
    first = c.take_partial()
    assert first is not None and first.utterance.end_ms == 300
    assert c.decoded(first, Result("")) == []  # too little to say anything
    c.feed(AudioFrame(LOUD[:4000], 0.3))
    second = c.take_partial()  # 250 ms after the empty one, not 500
    assert second is not None and second.utterance.end_ms == 550
    [shown] = c.decoded(second, Result("go"))
    assert isinstance(shown, Partial) and shown.text == "go"
    c.feed(AudioFrame(LOUD[:4000], 0.55))
    assert c.take_partial() is None  # then every 500 ms again


def test_the_stable_prefix_is_forced_on_later_partials_and_reset_by_the_final() -> None:
    c = core()
    texts = ["go", "go forward", "go forward ten", "go forward ten meters"]
    prefixes = []
    for index, text in enumerate(texts):
        c.feed(AudioFrame(LOUD[:8000], index / 2))
        partial = c.take_partial()
        assert partial is not None
        prefixes.append(partial.request.prefix)
        c.decoded(partial, Result(text))
    assert prefixes == ["", "", "", "go"]  # three decodes agreed on "go"
    [final] = decodes(c.feed(AudioFrame(QUIET, 3.0)))
    assert final.request.prefix == ""  # a fresh decode of the whole utterance
    c.decoded(final, Result("go forward ten meters"))
    c.feed(AudioFrame(LOUD, 4.0))
    next_partial = c.take_partial()
    assert next_partial is not None and next_partial.request.prefix == ""


def test_an_auto_language_partial_names_the_language_its_prefix_was_detected_in() -> None:
    c = core()  # language auto
    requests = []
    for index, text in enumerate(["hallo", "hallo zusammen", "hallo zusammen heute", "x"]):
        c.feed(AudioFrame(LOUD[:8000], index / 2))
        partial = c.take_partial()
        assert partial is not None
        requests.append(partial.request)
        c.decoded(partial, Result(text, language="de"))
    assert [(r.prefix, r.prefix_language) for r in requests] == [
        ("", None), ("", None), ("", None), ("hallo", "de")]
    assert all(r.language is None for r in requests)
    [final] = decodes(c.feed(AudioFrame(QUIET, 3.0)))
    assert (final.request.prefix, final.request.prefix_language) == ("", None)
    c.decoded(final, Result("hallo zusammen heute", language="de"))
    c.feed(AudioFrame(LOUD, 4.0))
    fresh = c.take_partial()  # a new utterance detects afresh
    assert fresh is not None and fresh.request.prefix_language is None


def test_utterance_end_follows_its_final_even_when_the_final_is_late() -> None:
    c = core(utterance_end_ms=1000)
    first = decodes(c.feed(AudioFrame(LOUD, 0.0)) + c.feed(AudioFrame(QUIET, 1.0)))[0]
    assert c.feed(AudioFrame(QUIET, 2.0)) == []  # due now, but behind the final still decoding
    [final, end] = c.decoded(first, Result("one", words=(RecognisedWord("one", 0.2, 0.5, 1.0),)))
    assert isinstance(final, Final) and end == UtteranceEnd(final.words[-1].end_ms)
    assert c.feed(AudioFrame(QUIET, 3.0)) == []  # once per final


def test_a_gap_finalizes_the_open_utterance_and_counts_as_stream_time() -> None:
    c = core()
    c.feed(AudioFrame(LOUD, 0.0))
    [final] = c.feed(Gap(8000, 1.0))  # frames a full queue dropped: reported where dropped
    assert isinstance(final, Decode) and final.cause == "skip"
    assert c.feed(Gap(160, 1.1)) == []
    assert c.tracker.position == 16000 + 8000 + 160  # stream time counts the gaps


@pytest.mark.parametrize("stop", [End(5.0), Stop(5.0, 1013, "too much", "overloaded", "overloaded")])
def test_the_end_finalizes_then_errors_then_closes(stop: End | Stop) -> None:
    c = core()
    c.feed(AudioFrame(LOUD, 0.0))
    [final] = decodes(c.feed(stop))
    assert final.cause == "end" and final.forced == isinstance(stop, End)
    assert not c.closed
    assert c.feed(AudioFrame(LOUD, 6.0)) == []  # nothing after the end
    out = c.decoded(final, Result("bye"))
    if isinstance(stop, End):
        assert [type(e) for e in out] == [Final, Close] and c.outcome == "ended"
        assert out[-1] == Close(1000, "end of stream")
    else:
        assert [type(e) for e in out] == [Final, Error, Close] and c.outcome == "overloaded"
        assert out[1] == Error("overloaded", "too much") and out[2] == Close(1013, "too much")
    assert c.closed


def test_a_partial_is_stale_once_its_utterance_is_finalized_or_the_session_ends() -> None:
    c = core()
    c.feed(AudioFrame(LOUD, 0.0))
    partial = c.take_partial()
    assert partial is not None and not c.stale(partial)
    final = decodes(c.feed(AudioFrame(QUIET, 1.0)))[0]
    assert c.stale(partial) and not c.stale(final)
    c.feed(AudioFrame(LOUD, 2.0))
    fresh = c.take_partial()
    assert fresh is not None and not c.stale(fresh)
    c.feed(End(3.0))
    assert c.stale(fresh)


# --- turns, for protocols that report them (OpenAI Realtime) ---------------------------------


def test_turn_events_come_at_once_ahead_of_the_finals_order() -> None:
    from sttd.api import Committed, SpeechStarted, SpeechStopped

    c = core(turn_events=True)
    opened = c.feed(AudioFrame(LOUD, 0.0))
    assert events(opened) == [SpeechStarted(0, 0)]
    closed = c.feed(AudioFrame(QUIET, 1.0))
    stopped, committed = events(closed)
    assert isinstance(stopped, SpeechStopped) and isinstance(committed, Committed)
    assert stopped.utterance_id == committed.utterance_id == 0
    [final] = decodes(closed)
    # An empty result still answers the committed turn: a protocol waits for one per item.
    [answer] = c.decoded(final, Result(""))
    assert isinstance(answer, Final) and answer.text == ""
    assert events(c.feed(Commit(2.0))) == [Committed(None, 2000)]  # nothing was open


def test_clear_drops_the_open_utterance_and_its_partials() -> None:
    from sttd.api import Clear, Cleared

    c = core(turn_events=True)
    c.feed(AudioFrame(LOUD, 0.0))
    partial = c.take_partial()
    assert partial is not None
    assert c.feed(Clear(1.0)) == [Cleared(0)]
    assert c.decoded(partial, Result("dropped words")) == []  # stale: no partial, no final
    assert c.feed(Commit(1.5)) == [Committed(None, 1000)]
    # The next utterance has a new id: nothing of the cleared one can attach to it.
    [final] = decodes(c.feed(AudioFrame(LOUD, 2.0)) + c.feed(AudioFrame(QUIET, 3.0)))
    assert final.utterance.utterance_id == 1


def test_configure_changes_language_hotwords_and_turn_detection_from_now_on() -> None:
    from sttd.api import Configure, Configured

    c = core(turn_events=True)
    options = SessionOptions(partial_ms=500, language="de", hotwords=("Acme",),
                             turn_events=True, endpointing=False, vad_silence_ms=900)
    assert c.feed(Configure(options, 0.0)) == [Configured(options)]
    assert c.tracker.endpointer.silence_ms == 900 and not c.tracker.endpointing
    # Endpointing off: a pause ends nothing, the commit does.
    out = c.feed(AudioFrame(LOUD, 0.0)) + c.feed(AudioFrame(QUIET, 1.0))
    assert decodes(out) == []
    [final] = decodes(c.feed(Commit(2.0)))
    assert (final.request.language, final.request.hotwords) == ("de", ("Acme",))


# -- speculative finals -----------------------------------------------------------------------


def speculating_core() -> SessionCore:
    tracker = UtteranceTracker(make_endpointer("energy", threshold_rms=300.0, silence_ms=500),
                               max_utterance_s=15.0, partial_ms=500, speculate_ms=200)
    return SessionCore(tracker, SessionOptions(partial_ms=500))


def ms(samples_ms: int, loud: bool = False) -> AudioFrame:
    return AudioFrame((LOUD if loud else QUIET)[: samples_ms * 16], 0.0)


def paused(c: SessionCore) -> Decode:
    """One second of speech, then 200 ms of silence: the speculative final it offers."""
    assert decodes(c.feed(ms(1000, loud=True))) == []
    assert c.take_speculative() is None
    c.take_partial()  # the speech's own partial
    c.feed(ms(180))
    assert c.take_speculative() is None  # not yet 200 ms of silence
    c.feed(ms(40))
    speculation = c.take_speculative()
    assert speculation is not None and speculation.speculative and speculation.kind == "final"
    assert c.take_speculative() is None  # offered once
    return speculation


def test_a_speculation_whose_silence_lasts_is_the_final_without_a_second_decode() -> None:
    c = speculating_core()
    speculation = paused(c)
    assert c.take_partial() is None  # the speaker paused: nothing new to show
    assert c.decoded(speculation, Result("go forward")) == []  # its utterance has not ended
    out = c.feed(AudioFrame(QUIET[: 300 * 16], 7.5))  # 520 ms of silence: the end
    assert decodes(out) == []
    [final] = events(out)
    assert isinstance(final, Final)
    assert (final.text, final.cause, final.ended_at) == ("go forward", "speech_end", 7.5)
    assert (final.start_ms, final.end_ms) == (speculation.utterance.start_ms,
                                              speculation.utterance.end_ms)
    assert (c.speculations_offered, c.speculations_used, c.speculations_dropped) == (1, 1, 0)


def test_a_speculation_that_ends_before_its_result_answers_when_the_result_comes() -> None:
    c = speculating_core()
    speculation = paused(c)
    assert c.feed(AudioFrame(QUIET[: 300 * 16], 7.5)) == []
    assert c.stale(speculation) is False  # it is the final now: not to be withdrawn
    [final] = c.decoded(speculation, Result("go forward"))
    assert isinstance(final, Final) and final.text == "go forward" and final.ended_at == 7.5


def test_speech_resuming_drops_the_speculation_and_the_final_is_decoded_afresh() -> None:
    c = speculating_core()
    speculation = paused(c)
    c.feed(ms(300, loud=True))
    assert c.stale(speculation) is True  # withdrawn if it has not started
    assert c.decoded(speculation, Result("go")) == []  # and ignored if it has
    assert c.failed(speculation, BackendError("late")) == []
    c.take_partial()
    c.feed(ms(220))
    again = c.take_speculative()
    assert again is not None and again is not speculation
    assert again.utterance.end_ms > speculation.utterance.end_ms
    assert c.feed(ms(300)) == []  # the end: the later speculation serves, no new decode
    [final] = c.decoded(again, Result("go forward now"))
    assert isinstance(final, Final) and final.text == "go forward now"
    assert (c.speculations_offered, c.speculations_used, c.speculations_dropped) == (2, 1, 1)


def test_a_failed_speculation_is_decoded_again_when_its_utterance_ends() -> None:
    c = speculating_core()
    speculation = paused(c)
    assert c.failed(speculation, BackendError("model fell over")) == []
    [final] = decodes(c.feed(AudioFrame(QUIET[: 300 * 16], 7.5)))
    assert final is not speculation and not final.speculative and final.ended_at == 7.5
    assert (c.speculations_used, c.speculations_dropped) == (0, 1)


def test_a_commit_after_a_speculation_decodes_the_committed_audio() -> None:
    c = speculating_core()
    speculation = paused(c)
    c.feed(ms(100))
    [final] = decodes(c.feed(Commit(9.0)))
    assert final is not speculation and final.cause == "commit"
    assert final.utterance.end_ms > speculation.utterance.end_ms
    assert c.stale(speculation) is True


def test_a_configure_during_a_speculation_has_the_final_decoded_with_the_new_options() -> None:
    from sttd.api import Configure

    c = speculating_core()
    speculation = paused(c)
    options = attrs.evolve(c.options, hotwords=("Acme",))
    c.feed(Configure(options, 5.0))
    assert c.stale(speculation) is True  # asked for with the old options
    assert c.decoded(speculation, Result("go forward")) == []
    [final] = decodes(c.feed(AudioFrame(QUIET[: 300 * 16], 7.5)))
    assert final is not speculation and final.request.hotwords == ("Acme",)
    assert c.speculations_used == 0


def test_a_configure_changing_nothing_the_decode_uses_keeps_the_speculation() -> None:
    from sttd.api import Configure

    c = speculating_core()
    speculation = paused(c)
    c.feed(Configure(attrs.evolve(c.options, vad_silence_ms=500), 5.0))
    assert c.stale(speculation) is False
    assert c.decoded(speculation, Result("go forward")) == []
    [final] = events(c.feed(AudioFrame(QUIET[: 300 * 16], 7.5)))
    assert isinstance(final, Final) and final.text == "go forward"


def test_a_session_detecting_its_language_once_keeps_the_first_sure_one() -> None:
    tracker = UtteranceTracker(make_endpointer("energy", threshold_rms=300.0, silence_ms=500),
                               max_utterance_s=15.0, partial_ms=500)
    c = SessionCore(tracker, SessionOptions(partial_ms=500), detect_language_once=True)
    first = utterance(c, 0.0)
    assert first.request.language is None  # auto: detected
    c.decoded(first, Result("hallo", language="de", language_probability=0.3))  # unsure
    second = utterance(c, 2.0)
    assert second.request.language is None  # still detecting
    [final] = c.decoded(second, Result("guten morgen", language="de", language_probability=0.8))
    assert isinstance(final, Final) and (final.language, final.language_probability) == ("de", 0.8)
    assert utterance(c, 4.0).request.language == "de"  # the rest is decoded in it, no detection
    every = core()  # detecting each utterance
    done = utterance(every, 0.0)
    every.decoded(done, Result("guten morgen", language="de", language_probability=0.9))
    assert utterance(every, 2.0).request.language is None


def test_decode_due_says_whether_a_round_would_take_a_partial_or_a_speculation() -> None:
    # The session's receive task feeds frames itself and hands the infer task a round only when
    # this is true (sttd.nursery): no partial or speculation may come due unseen.
    c = speculating_core()
    frames = [ms(20, loud=True)] * 60 + [ms(20)] * 15 + [ms(20, loud=True)] * 30 + [ms(20)] * 40
    taken: list[str] = []
    for frame in frames:
        c.feed(frame)
        due = c.decode_due()
        speculation = c.take_speculative()
        partial = c.take_partial()
        assert due == (speculation is not None or partial is not None)
        taken += ["speculation"] * (speculation is not None) + ["partial"] * (partial is not None)
    assert taken.count("speculation") >= 1 and taken.count("partial") >= 3
