"""One session's transcript bookkeeping, sans I/O: what it hears in; what to decode and what to
say out.

Theory of operation. The session's trio tasks (`sttd.nursery`) feed `SessionCore` the items of
its audio channel in order (`feed`): `AudioFrame`s, `Gap`s (frames a full queue dropped, so
stream times stay the client's), the client's `Commit` and `End`, and the server's `Stop`. The core
runs them through an `UtteranceTracker` and answers with what to do, in order:

* `Decode` requests: transcribe this utterance (all of it for a final, so far for a partial),
  then hand the outcome back with `decoded` or `failed`. Finals come out of `feed` as their
  utterances end; a partial comes out of `take_partial` when one is due.
* events (`sttd.api`) to send: partials, finals, utterance ends, errors, warnings, and last
  the `Close`.

Order. An event waits until every final requested before it has its outcome: a final's event,
an `UtteranceEnd` due after it, the error and `Close` that end the session. So the client gets
finals in utterance order however their decodes interleave (several may decode at once: the
session does not wait for one before listening on). A partial is only the newest guess at the open utterance: one whose utterance was
finalized meanwhile, or that comes back while a final is outstanding, is dropped (and so is its
failure), and one whose text did not change is not sent. One that showed nothing has the
tracker bring the next forward (`UtteranceTracker.partial_showed_nothing`).

Speculation. Once an open utterance has been silent for a while (the tracker's
``speculate_ms``), `take_speculative` asks for its final early, as it will be if the silence lasts,
so the decode runs while the endpointer waits out the rest of its silence. If the utterance
then ends with exactly that audio, the speculative decode is its final (no second decode); if
speech resumes, or a commit, a cut or the end closes it otherwise, the speculation is dropped
(`stale`) and its outcome ignored. No partial is asked for while a speculation stands: the
speaker has paused, there is nothing new to show.

Stability. Each partial's decode is forced to start with the words already shown as stable
(`PartialStabilizer`), so no partial takes a stable word back; requesting a final resets it.
The final is a fresh decode of the whole utterance: the transcript of record.

A final with no text (a cough, noise) is not sent unless the client forced it (commit or end),
so a client waiting on it is answered. After `End` or `Stop` the open utterance is finalized;
its final, the error that ended the session (if any) and the `Close` come out in that order,
then `closed` is true. `outcome` says how the session ended, for metrics.
"""

from __future__ import annotations

import collections
import secrets
from collections.abc import Sequence

import attrs
import numpy as np
import numpy.typing as npt

from sttd.api import (
    Clear,
    Cleared,
    Close,
    Commit,
    Committed,
    Configure,
    Configured,
    End,
    Error,
    Final,
    FinalCause,
    Partial,
    SessionEvent,
    SessionOptions,
    SpeechStarted,
    SpeechStopped,
    UtteranceEnd,
    Word,
)
from sttd.audio import SAMPLES_PER_MS, pcm16_to_float32
from sttd.backends.base import RecognisedWord, Request, Result
from sttd.errors import BackendError
from sttd.metrics import SessionOutcome
from sttd.session._stability import PartialStabilizer
from sttd.session._utterances import Utterance, UtteranceTracker
from sttd.vad import VadSteps, run_steps, set_speech_threshold

__all__ = ["AudioFrame", "Decode", "Gap", "InputItem", "SessionCore", "Stop", "stream_words"]



# -- inputs: the audio channel's items, in band so that ordering holds ------------------------


@attrs.frozen
class AudioFrame:
    """16 kHz mono samples as received, with the trio clock time their last byte arrived."""

    samples: npt.NDArray[np.int16] = attrs.field(eq=False, repr=lambda s: f"<{s.size} samples>")
    received_at: float


@attrs.frozen
class Gap:
    """`samples` of the client's stream the session does not have: frames a full input queue
    dropped (counted and reported where they were dropped), kept as stream time."""

    samples: int
    received_at: float


@attrs.frozen
class Stop:
    """The server ends the session: finalize what was heard, then close with `code`.

    With `error_code`, an error with that code and `reason` goes before the close.
    """

    received_at: float
    code: int
    reason: str
    outcome: SessionOutcome
    error_code: str = ""


InputItem = AudioFrame | Gap | Commit | End | Stop | Clear | Configure


# The probability of the language detected in a final above which a session detecting its
# language once takes it for the rest of the session.
_SURE_OF_LANGUAGE = 0.5


def _same_audio(a: Utterance, b: Utterance) -> bool:
    return (a.utterance_id, a.start_ms, a.end_ms, a.audio.size) == (
        b.utterance_id, b.start_ms, b.end_ms, b.audio.size)


def stream_words(words: Sequence[RecognisedWord], start_ms: int) -> tuple[Word, ...]:
    """A backend's words (seconds into its request) as words of the client's stream (ms), for
    an utterance or a file piece that starts at `start_ms`."""
    return tuple(Word(word.word.strip(), start_ms + round(word.start_s * 1000),
                      start_ms + round(word.end_s * 1000), word.probability) for word in words)


# -- outputs ------------------------------------------------------------------------------------


@attrs.frozen(eq=False)
class Decode:
    """Transcribe `utterance`; give the outcome to `SessionCore.decoded` or `failed`."""

    utterance: Utterance
    request: Request
    # Finals: when the audio (or commit) that ended the utterance arrived; what ended it; and
    # whether the client asked for it (then it is answered even when empty).
    ended_at: float | None = None
    cause: FinalCause = "speech_end"
    forced: bool = False
    # A final asked for before its utterance ended (`SessionCore.take_speculative`).
    speculative: bool = False

    @property
    def kind(self) -> str:
        return self.utterance.kind


@attrs.frozen
class _Ending:
    """How a final's utterance ended: what the event reports (`Decode`'s fields of the same
    names), for a speculative decode that became the final."""

    ended_at: float
    cause: FinalCause
    forced: bool


@attrs.frozen
class _Outcome:
    """A speculative final's outcome, come before its utterance ended."""

    result: Result | None
    error: BackendError | None
    backlog_ms: int


@attrs.define(eq=False)
class _Slot:
    """A place in the order of events: a final waiting for its outcome, or events to send."""

    decode: Decode | None = None
    events: list[SessionEvent] = attrs.Factory(list)
    # A speculative decode in this slot: how its utterance did end.
    ending: _Ending | None = None
    # An utterance end is due here: whether to send one is decided when the slot's turn comes.
    utterance_end: bool = False

    @property
    def waiting(self) -> bool:
        return self.decode is not None


@attrs.define
class SessionCore:
    """Cuts one session's audio into utterances and turns decodes into its events, in order."""

    tracker: UtteranceTracker
    options: SessionOptions
    # With language auto: detect each utterance's language (False), or the session's, once,
    # from its first final the model was sure of, then decode the rest in it (True).
    detect_language_once: bool = False
    outcome: SessionOutcome = attrs.field(init=False, default="client_gone")
    # The language the session was detected in (`detect_language_once`).
    _session_language: str | None = attrs.field(init=False, default=None)
    _stabilizer: PartialStabilizer = attrs.field(init=False, factory=PartialStabilizer)
    # Names this session's utterances to the backend (`Request.stream_id`).
    _tag: str = attrs.field(init=False, factory=lambda: secrets.token_hex(6))
    # The language the current utterance's partials were detected in (auto-language sessions):
    # the stable prefix a partial forces is in it.
    _partial_language: str | None = attrs.field(init=False, default=None)
    _slots: collections.deque[_Slot] = attrs.field(init=False, factory=collections.deque)
    # The highest utterance id whose final was requested (or that was cleared): its partials
    # are stale.
    _finalized: int = attrs.field(init=False, default=-1)
    # The highest utterance id whose `SpeechStarted` went out (options.turn_events).
    _announced: int = attrs.field(init=False, default=-1)
    _last_partial: tuple[int, str] | None = attrs.field(init=False, default=None)
    # The speculative final standing for the open utterance, and its outcome once it came.
    _speculation: Decode | None = attrs.field(init=False, default=None)
    _speculated: _Outcome | None = attrs.field(init=False, default=None)
    # Speculative finals asked for, those that became their utterance's final, and those
    # dropped (speech resumed, a clear, new options, or the final came out another way).
    speculations_offered: int = attrs.field(init=False, default=0)
    speculations_used: int = attrs.field(init=False, default=0)
    speculations_dropped: int = attrs.field(init=False, default=0)
    # For `options.utterance_end_ms`: the stream time (ms) at which an utterance end is due if
    # no speech comes first, and the end of the last word sent in a final since the last one.
    _utterance_end_at_ms: int | None = attrs.field(init=False, default=None)
    _last_word_end_ms: int | None = attrs.field(init=False, default=None)
    _ending: bool = attrs.field(init=False, default=False)
    _closed: bool = attrs.field(init=False, default=False)

    @property
    def ending(self) -> bool:
        """Whether `End` or `Stop` came: the core takes nothing more."""
        return self._ending

    @property
    def closed(self) -> bool:
        """Whether the `Close` event has come out."""
        return self._closed

    def feed(self, item: InputItem) -> list[Decode | SessionEvent]:
        """`feed_steps`, with the VAD's net asked at once."""
        return run_steps(self.feed_steps(item))

    def feed_steps(self, item: InputItem) -> VadSteps[list[Decode | SessionEvent]]:
        """Take the next item of the session's input; what to decode and send now, in order.

        Suspends where the VAD needs its net (`sttd.vad.VadSteps`): the caller scores the call
        and sends the probability back. Only audio ever suspends.

        With ``options.turn_events``, the turns come out at once, ahead of the order finals
        keep: `SpeechStarted` when an utterance opens, `SpeechStopped` when the VAD closes one,
        `Committed` for every utterance closed (None for a commit with nothing open),
        `Cleared` and `Configured`.
        """
        if self._ending:
            return []
        out: list[Decode | SessionEvent] = []
        finals: list[Utterance] = []
        turns = self.options.turn_events
        if isinstance(item, AudioFrame):
            finals = yield from self.tracker.feed_steps(item.samples)
            if (self._speculation is not None and not finals
                    and not self.tracker.speculation_holds(self._speculation.utterance)):
                self._drop_speculation()  # speech resumed
            if not finals and self.options.utterance_end_ms is None and not (
                    turns and (opened := self.tracker.open_utterance_id) is not None
                    and opened > self._announced):
                return []  # most frames: nothing ended, and the head of the order is unchanged
            for u in finals:
                cause: FinalCause = "max_length" if u.cut else "speech_end"
                out += self._turns(u, stopped=not u.cut)
                out += self._final(u, item.received_at, cause)
            out += self._opened()
        elif isinstance(item, Commit):
            finals = self.tracker.commit()
            for u in finals:
                out += self._turns(u)
                out += self._final(u, item.received_at, "commit", forced=True)
            if turns and not finals:
                out.append(Committed(None, self.tracker.position // SAMPLES_PER_MS))
        elif isinstance(item, Gap):
            finals = self.tracker.skip(item.samples)
            for u in finals:
                out += self._turns(u)
                out += self._final(u, item.received_at, "skip")
        elif isinstance(item, Clear):
            self._drop_speculation()
            discarded = self.tracker.discard()
            if discarded is not None:
                self._finalized = discarded  # its partials are stale, and it has no final
                self._stabilizer.reset()
                self._partial_language = None
            if turns:
                out.append(Cleared(discarded))
            return out
        elif isinstance(item, Configure):
            self._configure(item.options)
            if self.options.turn_events:
                out.append(Configured(self.options))
            return out
        else:
            # Only the client's own end answers with a final even when it is empty.
            forced = isinstance(item, End)
            for u in self.tracker.commit():
                out += self._turns(u)
                out += self._final(u, item.received_at, "end", forced=forced)
            self._ending = True
            self._slots.append(_Slot(events=self._ending_events(item)))
            return [*out, *self._release()]
        if self._utterance_end_due(finals):
            self._slots.append(_Slot(utterance_end=True))
        return [*out, *self._release()]

    def _turns(self, utterance: Utterance, *, stopped: bool = False) -> list[SessionEvent]:
        """The turn events for `utterance`, closed now (options.turn_events)."""
        if not self.options.turn_events:
            return []
        out: list[SessionEvent] = []
        if utterance.utterance_id > self._announced:  # opened and closed in one item
            self._announced = utterance.utterance_id
            out.append(SpeechStarted(utterance.utterance_id, utterance.start_ms))
        if stopped:
            out.append(SpeechStopped(utterance.utterance_id, utterance.end_ms))
        out.append(Committed(utterance.utterance_id, utterance.end_ms))
        return out

    def _opened(self) -> list[SessionEvent]:
        """`SpeechStarted` for the utterance open now, if it is new (options.turn_events)."""
        open_id, start_ms = self.tracker.open_utterance_id, self.tracker.open_start_ms
        if not self.options.turn_events or open_id is None or open_id <= self._announced:
            return []
        self._announced = open_id
        return [SpeechStarted(open_id, start_ms or 0)]

    def _configure(self, options: SessionOptions) -> None:
        """Go on with `options`: what is None among the VAD's options stays as it was."""
        if options.language != self.options.language:
            self._session_language = None  # detected again, if auto
        if (options.language, options.hotwords, options.task) != (
                self.options.language, self.options.hotwords, self.options.task):
            self._drop_speculation()  # asked for with the old options: decoded again at the end
        tracker = self.tracker
        tracker.partial_ms = options.partial_ms if options.partials else None
        tracker.endpointing = options.endpointing
        if options.preroll_ms is not None:
            tracker.preroll_ms = options.preroll_ms
        if options.vad_silence_ms is not None:
            tracker.endpointer.silence_ms = options.vad_silence_ms
        if options.vad_threshold is not None:
            set_speech_threshold(tracker.endpointer, options.vad_threshold)
        self.options = options

    def stale(self, decode: Decode) -> bool:
        """Whether `decode` is not worth decoding any more: a partial whose utterance was
        finalized, or of a session that is ending; a speculative final that will not be its
        utterance's final."""
        if decode.speculative:
            return decode is not self._speculation and not any(
                slot.decode is decode for slot in self._slots)
        return decode.kind == "partial" and (
            self._ending or decode.utterance.utterance_id <= self._finalized)

    @property
    def utterance_open(self) -> bool:
        """Whether an utterance is open (only then can a partial or a speculation be due)."""
        return self.tracker.open_utterance_id is not None

    def take_speculative(self) -> Decode | None:
        """The open utterance's final to decode early, once its speaker has paused long
        enough (the tracker's ``speculate_ms``); see the module docstring."""
        if self._ending:
            return None
        utterance = self.tracker.take_speculative()
        if utterance is None:
            return None
        self._speculation = Decode(utterance, self._request(utterance), speculative=True)
        self._speculated = None
        self.speculations_offered += 1
        return self._speculation

    def decode_due(self) -> bool:
        """Whether `take_partial` or `take_speculative` would give a decode now (neither is
        taken): a frame fed outside the infer task's round must then have that round run."""
        if self._ending:
            return False
        return self.tracker.speculation_due() or (self._partials_open()
                                                  and self.tracker.partial_due())

    def _partials_open(self) -> bool:
        """Whether the session may have a partial now, if one is due."""
        return not self._ending and self.options.partials and self._speculation is None

    def take_partial(self) -> Decode | None:
        """A partial to decode, if ``partial_ms`` of new speech came since the last one (and
        no speculative final stands for the utterance: its speaker paused)."""
        if not self._partials_open():
            return None
        utterance = self.tracker.take_partial()
        if utterance is None:
            return None
        prefix = self._stabilizer.stable_text
        return Decode(utterance, self._request(
            utterance, prefix=prefix, prefix_language=self._partial_language if prefix else None))

    def decoded(self, decode: Decode, result: Result, *, backlog_ms: int = 0
                ) -> list[SessionEvent]:
        """`decode`'s result came: the events that are now ready, in order.

        `backlog_ms` is the session's backlog now, which a final reports.
        """
        utterance = decode.utterance
        text = result.text.strip()
        if utterance.kind == "partial":
            if utterance.utterance_id > self._finalized and result.language:
                self._partial_language = result.language
            return self._partial(utterance, text)
        if decode is self._speculation:  # its utterance has not ended yet: kept for then
            self._speculated = _Outcome(result, None, backlog_ms)
            return []
        slot = self._slot_of(decode)
        if slot is None:
            return []  # a speculation that was dropped
        return self._resolve(slot, self._final_events(decode, slot.ending, result, backlog_ms))

    def _final_events(self, decode: Decode, ending: _Ending | None, result: Result,
                      backlog_ms: int) -> list[SessionEvent]:
        """The final event for `decode`'s result (none for an empty one nobody asked for)."""
        utterance = decode.utterance
        text = result.text.strip()
        if (self.detect_language_once and self.options.language is None and text
                and self._session_language is None and result.language
                and (result.language_probability or 0.0) >= _SURE_OF_LANGUAGE):
            self._session_language = result.language
        ended_at, cause, forced = ((ending.ended_at, ending.cause, ending.forced)
                                   if ending is not None
                                   else (decode.ended_at, decode.cause, decode.forced))
        # A protocol that reports turns gets an answer for every utterance it saw committed.
        if not (text or forced or self.options.turn_events):
            return []
        return [Final(
            utterance_id=utterance.utterance_id, text=text,
            start_ms=utterance.start_ms, end_ms=utterance.end_ms,
            words=stream_words(result.words, utterance.start_ms) if text else (),
            confidence=result.confidence, language=result.language,
            language_probability=result.language_probability,
            backlog_ms=backlog_ms, cause=cause, ended_at=ended_at)]

    def failed(self, decode: Decode, error: BackendError) -> list[SessionEvent]:
        """`decode` failed: the error, reported in its turn; the session goes on.

        A failed partial is not reported (the caller counts it): its utterance's final answers
        for it, with its text or its own failure. Reporting each one told a client of a hundred
        tentative transcripts it could not tell from a lost final while the engine was down.
        """
        utterance_id = decode.utterance.utterance_id
        event = Error(error.code, f"transcribing utterance {utterance_id} failed ({error}); "
                                  "the session goes on", utterance_id=utterance_id)
        if decode.kind == "partial":
            return []
        if decode is self._speculation:  # its final will be decoded again when it ends
            self._speculated = _Outcome(None, error, 0)
            return []
        slot = self._slot_of(decode)
        if slot is None:
            return []  # a speculation that was dropped
        return self._resolve(slot, [event])

    # -- helpers ------------------------------------------------------------------------------

    def _request(self, utterance: Utterance, *, prefix: str = "",
                 prefix_language: str | None = None) -> Request:
        return Request(audio=pcm16_to_float32(utterance.audio), kind=utterance.kind,
                       stream_id=f"{self._tag}:{utterance.utterance_id}",
                       language=self.options.language or self._session_language,
                       hotwords=self.options.hotwords,
                       prefix=prefix, prefix_language=prefix_language, task=self.options.task,
                       word_timings=self.options.word_timings)

    def _final(self, utterance: Utterance, ended_at: float, cause: FinalCause, *,
               forced: bool = False) -> list[Decode]:
        """Order `utterance`'s final; the decode to run for it (none where the speculation
        standing for it is that final)."""
        # Any partial of this utterance is stale now, and its stable words promise nothing
        # about the next one.
        self._finalized = utterance.utterance_id
        self._stabilizer.reset()
        self._partial_language = None
        speculation, outcome = self._speculation, self._speculated
        if (speculation is not None and _same_audio(speculation.utterance, utterance)
                and (outcome is None or outcome.error is None)):
            self._speculation = self._speculated = None  # used, not dropped
            slot = _Slot(decode=speculation, ending=_Ending(ended_at, cause, forced))
            self._slots.append(slot)
            self.speculations_used += 1
            if outcome is not None and outcome.result is not None:  # released by the caller
                slot.decode = None
                slot.events = self._final_events(speculation, slot.ending, outcome.result,
                                                 outcome.backlog_ms)
            return []
        self._drop_speculation()
        decode = Decode(utterance, self._request(utterance), ended_at=ended_at, cause=cause,
                        forced=forced)
        self._slots.append(_Slot(decode=decode))
        return [decode]

    def _drop_speculation(self) -> None:
        if self._speculation is not None:
            self.speculations_dropped += 1
        self._speculation = None
        self._speculated = None

    def _slot_of(self, decode: Decode) -> _Slot | None:
        for slot in self._slots:
            if slot.decode is decode:
                return slot
        return None

    def _partial(self, utterance: Utterance, text: str) -> list[SessionEvent]:
        stale = utterance.utterance_id <= self._finalized or any(s.waiting for s in self._slots)
        if stale:
            return []
        stable, unstable = self._stabilizer.update(text)
        joined = f"{stable} {unstable}".strip()
        if not joined:
            self.tracker.partial_showed_nothing(utterance)
            return []
        key = (utterance.utterance_id, joined)
        if self._last_partial == key:
            return []
        self._last_partial = key
        return [Partial(utterance.utterance_id, stable, unstable, utterance.start_ms,
                        utterance.end_ms)]

    def _resolve(self, slot: _Slot, events: list[SessionEvent]) -> list[SessionEvent]:
        slot.decode, slot.events = None, events
        return self._release()

    def _release(self) -> list[SessionEvent]:
        """The events at the head of the order whose turn has come."""
        out: list[SessionEvent] = []
        while self._slots and not self._slots[0].waiting:
            slot = self._slots.popleft()
            if slot.utterance_end and self._last_word_end_ms is not None:
                out.append(UtteranceEnd(self._last_word_end_ms))
                self._last_word_end_ms = None
            for event in slot.events:
                if isinstance(event, Final) and event.text:
                    self._last_word_end_ms = (event.words[-1].end_ms if event.words
                                              else event.end_ms)
                self._closed = self._closed or isinstance(event, Close)
            out.extend(slot.events)
        return out

    def _ending_events(self, item: End | Stop) -> list[SessionEvent]:
        if isinstance(item, End):
            self.outcome = "ended"
            return [Close(1000, "end of stream")]
        self.outcome = item.outcome
        events: list[SessionEvent] = []
        if item.error_code:
            events.append(Error(item.error_code, item.reason))
        events.append(Close(item.code, item.reason))
        return events

    def _utterance_end_due(self, finals: list[Utterance]) -> bool:
        """Whether `options.utterance_end_ms` of audio without speech just followed a final.

        `finals` are those the last item produced; each re-arms the wait, and speech disarms
        it until the next final.
        """
        wait_ms = self.options.utterance_end_ms
        if wait_ms is None:
            return False
        if finals:
            self._utterance_end_at_ms = finals[-1].end_ms + wait_ms
        if self._utterance_end_at_ms is None:
            return False
        if self.tracker.open_utterance_id is not None:
            self._utterance_end_at_ms = None
            return False
        if self.tracker.position < self._utterance_end_at_ms * SAMPLES_PER_MS:
            return False
        self._utterance_end_at_ms = None
        return True
