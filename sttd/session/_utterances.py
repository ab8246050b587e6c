"""Utterance bookkeeping for one stream: which audio to decode, and when, sans I/O.

Theory of operation. `UtteranceTracker` owns the stream's recent audio and an `Endpointer`.
Audio goes in with `feed`; `Utterance`s to decode come out:

* a **final** `Utterance` (all of its audio) when the endpointer reports the end of speech, when
  `commit` is called while speech is open, or when an utterance reaches ``max_utterance_s``
  (then it is cut at the quietest frame of its last few seconds and the rest opens the next
  utterance);
* a **partial** `Utterance` (its audio so far) from `take_partial` once ``partial_ms`` of new
  audio arrived in the open utterance since the last partial (the first after half of that, and
  the next half sooner too if the first showed nothing: `partial_showed_nothing`);
* a **speculative final** from `take_speculative` once ``speculate_ms`` of silence (at least
  ``tail_ms``) followed the open utterance's last speech frame: the audio its final will have
  if the silence lasts until the endpointer ends the utterance, offered early so it can be
  decoded while the endpointer waits. `speculation_holds` says whether it still is that final
  (speech resumed, a commit or a cut make it another one).

An utterance's audio runs from ``preroll_ms`` before the detected speech start (never before the
previous utterance's end) to ``tail_ms`` after the last speech frame (when that audio exists).
Times are absolute stream positions; `Utterance.start_ms`/`end_ms` are what the client is told.
Memory is bounded: outside speech only the pre-roll is kept.
"""

from __future__ import annotations

from typing import Literal

import attrs
import numpy as np
import numpy.typing as npt

from sttd.audio import SAMPLES_PER_MS, SAMPLE_RATE_HZ
from sttd.vad import Endpointer, SpeechEnd, SpeechStart, VadSteps, run_steps

__all__ = ["TAIL_MS", "SampleBuffer", "Utterance", "UtteranceTracker"]

# Audio kept after an utterance's last speech frame, ms (a final's audio ends here).
TAIL_MS = 200

# How far back from the length limit we look for a quiet place to cut.
_CUT_SEARCH_S = 3.0


@attrs.frozen
class Utterance:
    """Utterance `utterance_id`'s audio to decode: all of it (a final) or so far (a partial)."""

    kind: Literal["partial", "final"]
    utterance_id: int
    audio: npt.NDArray[np.int16] = attrs.field(eq=False, repr=False)
    start_ms: int
    end_ms: int
    # A final cut at the length limit while the speech went on (not ended by a pause).
    cut: bool = False

    @property
    def duration_s(self) -> float:
        return self.audio.size / SAMPLE_RATE_HZ


@attrs.define
class SampleBuffer:
    """A growable int16 buffer addressed by absolute sample index.

    Held samples are ``_data[_head:_head + _size]``. Trimming only moves `_head`; the held
    samples move to the front of `_data` when an append finds no room after them. Between
    utterances a stream trims its pre-roll at every frame, and moving the pre-roll each time
    was most of a silent frame's cost.
    """

    _data: npt.NDArray[np.int16] = attrs.field(init=False, factory=lambda: np.zeros(8192, np.int16))
    _head: int = attrs.field(init=False, default=0)  # where the held samples begin in _data
    _start: int = attrs.field(init=False, default=0)  # absolute index of the first held sample
    _size: int = attrs.field(init=False, default=0)

    @property
    def start(self) -> int:
        return self._start

    @property
    def end(self) -> int:
        return self._start + self._size

    def append(self, samples: npt.NDArray[np.int16]) -> None:
        """Append `samples` at the end."""
        size, head = self._size, self._head
        needed = size + samples.size
        if head + needed > self._data.size:
            if needed > self._data.size // 2:  # grow to half free, so compacting stays rare
                grown = np.zeros(2 * needed, np.int16)
                grown[:size] = self._data[head : head + size]
                self._data = grown
            else:
                self._data[:size] = self._data[head : head + size]
            head = self._head = 0
        self._data[head + size : head + needed] = samples
        self._size = needed

    def slice(self, start: int, end: int) -> npt.NDArray[np.int16]:
        """A copy of absolute samples [start, end), clamped to what is held."""
        lo = max(start, self._start) - self._start
        hi = min(end, self.end) - self._start
        return self._data[self._head + lo : self._head + max(lo, hi)].copy()

    def skip(self, samples: int) -> None:
        """Forget everything held and advance the end by `samples` never received."""
        self._start = self.end + samples
        self._head = self._size = 0

    def trim_before(self, index: int) -> None:
        """Forget samples before absolute `index`."""
        drop = min(max(index - self._start, 0), self._size)
        if drop == 0:
            return
        self._head += drop
        self._start += drop
        self._size -= drop


# Validated when built; its state then changes per frame, without attrs' setattr hooks.
@attrs.define(on_setattr=attrs.setters.NO_OP)
class UtteranceTracker:
    """Cuts one stream into utterances and says when to decode partials and finals."""

    endpointer: Endpointer
    max_utterance_s: float = attrs.field(
        validator=[attrs.validators.gt(0.0), attrs.validators.lt(float("inf"))])
    # New audio between partials; None: no partials (a file is cut into finals only).
    partial_ms: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.gt(0)))
    preroll_ms: int = attrs.field(default=300, validator=attrs.validators.ge(0))
    tail_ms: int = attrs.field(default=TAIL_MS, validator=attrs.validators.ge(0))
    # False: the VAD's speech ends do not close utterances (only a commit or the length limit
    # does); its speech starts still open them.
    endpointing: bool = True
    # Silence after the last speech frame from which a speculative final is offered (never
    # before ``tail_ms``); None: never.
    speculate_ms: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.ge(0)))
    _buffer: SampleBuffer = attrs.field(init=False, factory=SampleBuffer)
    _next_id: int = attrs.field(init=False, default=0)
    _open_start: int | None = attrs.field(init=False, default=None)
    _floor: int = attrs.field(init=False, default=0)  # end of the previous utterance
    _partial_at: int = attrs.field(init=False, default=0)  # stream position of last partial
    # The utterance whose next partial `partial_showed_nothing` brought forward (once each).
    _hastened: int = attrs.field(init=False, default=-1)
    # The (utterance id, end sample) of the last speculative final offered.
    _speculated: tuple[int, int] | None = attrs.field(init=False, default=None)

    @property
    def position(self) -> int:
        """Samples received so far."""
        return self._buffer.end

    @property
    def open_utterance_id(self) -> int | None:
        return self._next_id if self._open_start is not None else None

    @property
    def open_start_ms(self) -> int | None:
        """Where the open utterance starts, ms into the stream (pre-roll included)."""
        return None if self._open_start is None else self._open_start // SAMPLES_PER_MS

    def feed(self, samples: npt.NDArray[np.int16]) -> list[Utterance]:
        """Add audio; returns the finals it completes, oldest first."""
        return run_steps(self.feed_steps(samples))

    def feed_steps(self, samples: npt.NDArray[np.int16]) -> VadSteps[list[Utterance]]:
        """`feed`, suspending where the VAD needs its net (`sttd.vad.VadSteps`)."""
        self._buffer.append(samples)
        finals: list[Utterance] = []
        for event in (yield from self.endpointer.feed_steps(samples)):
            if isinstance(event, SpeechStart):
                self._open(event.sample)
            elif (isinstance(event, SpeechEnd) and self._open_start is not None
                  and self.endpointing):
                end = min(event.sample + self.tail_ms * SAMPLES_PER_MS, self.position)
                finals.append(self._close(end))
        finals.extend(self._cut_if_too_long())
        self._trim()
        return finals

    def commit(self) -> list[Utterance]:
        """Finalize the open utterance now; returns its final, or nothing if none is open."""
        if self._open_start is None:
            return []
        self.endpointer.reset()
        return [self._close(self.position)]

    def discard(self) -> int | None:
        """Drop the open utterance's audio unheard; returns its id (never used again), or None
        when nothing was open."""
        if self._open_start is None:
            return None
        discarded = self._next_id
        self._next_id += 1
        self.endpointer.reset()
        self._open_start = None
        self._floor = self._partial_at = self.position
        self._trim()
        return discarded

    def skip(self, samples: int) -> list[Utterance]:
        """Advance the stream clock over `samples` that were not kept (the session lagged).

        Finalizes the open utterance first and returns its final, so nothing heard is lost;
        stream times after the gap stay those of the client's stream.
        """
        finals = self.commit()
        self.endpointer.skip(samples)
        self._buffer.skip(samples)
        self._floor = self._partial_at = self.position
        return finals

    def take_partial(self) -> Utterance | None:
        """A partial if ``partial_ms`` of new audio arrived in the open utterance, and the
        speaker has not paused for longer than the tail: a partial of a pause shows nothing
        new, and it would take in audio the utterance's final may end before (a streaming
        model fed past that end would have to start the utterance over)."""
        if not self.partial_due() or self._open_start is None:
            return None
        self._partial_at = self.position
        return self._utterance("partial", self._open_start, self.position)

    def partial_due(self) -> bool:
        """Whether `take_partial` would give a partial now (nothing is taken)."""
        if self._open_start is None or self.partial_ms is None:
            return False
        if (self.endpointing and self.endpointer.in_speech and self.position
                > self.endpointer.last_speech_end + self.tail_ms * SAMPLES_PER_MS):
            return False
        return self.position - self._partial_at >= self.partial_ms * SAMPLES_PER_MS

    def partial_showed_nothing(self, partial: Utterance) -> None:
        """`partial` decoded to no text: if it is the first of the open utterance's partials to,
        the next is due half a ``partial_ms`` after it rather than a whole one.

        The first partial has only half a ``partial_ms`` of speech, and on a noisy line Whisper
        often marks so little as not speech (`benchmarks/partial_decodes.py`: 13 of 22 first
        partials of a sentence stream under -50 dBFS white noise came back empty, 3 clean), so
        the client's first words waited a whole ``partial_ms`` more. Only once per utterance:
        an utterance of noise the VAD took for speech does not get partials at twice the rate.
        """
        if (self.partial_ms is None or partial.utterance_id != self._next_id
                or self._open_start is None or self._hastened == partial.utterance_id):
            return
        self._hastened = partial.utterance_id
        due = partial.end_ms * SAMPLES_PER_MS - self.partial_ms // 2 * SAMPLES_PER_MS
        self._partial_at = min(self._partial_at, due)

    def take_speculative(self) -> Utterance | None:
        """The open utterance's final as it will be if the silence after its last speech frame
        lasts, once ``speculate_ms`` of that silence came; each such end is offered once."""
        if not self.speculation_due():
            return None
        end = self._speculative_end()
        assert end is not None and self._open_start is not None  # as speculation_due found
        self._speculated = (self._next_id, end)
        return self._utterance("final", self._open_start, end)

    def speculation_due(self) -> bool:
        """Whether `take_speculative` would give a speculative final now (nothing is taken)."""
        end = self._speculative_end()
        return (end is not None and self._open_start is not None
                and self._speculated != (self._next_id, end))

    def speculation_holds(self, speculative: Utterance) -> bool:
        """Whether `speculative` (from `take_speculative`) is still the final the open
        utterance will get when its silence lasts."""
        end = self._speculative_end()
        return (end is not None and self._open_start is not None
                and speculative.utterance_id == self._next_id
                and speculative.start_ms == self._open_start // SAMPLES_PER_MS
                and speculative.end_ms == end // SAMPLES_PER_MS)

    def _speculative_end(self) -> int | None:
        """Where the open utterance's final will end if its silence lasts, once the silence
        is long enough to speculate; else None."""
        if (self.speculate_ms is None or self._open_start is None or not self.endpointing
                or not self.endpointer.in_speech):
            return None
        end = self.endpointer.last_speech_end + self.tail_ms * SAMPLES_PER_MS
        wait = max(self.speculate_ms, self.tail_ms) * SAMPLES_PER_MS
        if self.position < self.endpointer.last_speech_end + wait or end > self.position:
            return None
        return end

    def _open(self, speech_start: int) -> None:
        if self._open_start is not None:
            return
        self._open_start = max(speech_start - self.preroll_ms * SAMPLES_PER_MS, self._floor,
                               self._buffer.start)
        # As if the last partial were half a ``partial_ms`` earlier: the first is due after
        # half a ``partial_ms`` of speech (the first words are what a caption's reader and a
        # voice agent's barge-in wait for), the later ones every ``partial_ms``.
        self._partial_at = speech_start - (self.partial_ms or 0) // 2 * SAMPLES_PER_MS

    def _close(self, end: int) -> Utterance:
        assert self._open_start is not None
        utterance = self._utterance("final", self._open_start, end)
        self._next_id += 1
        self._open_start = None
        self._floor = end
        return utterance

    def _cut_if_too_long(self) -> list[Utterance]:
        finals: list[Utterance] = []
        limit = int(self.max_utterance_s * SAMPLE_RATE_HZ)
        while self._open_start is not None and self.position - self._open_start >= limit:
            finals.append(self._cut(limit))
        return finals

    def _cut(self, limit: int) -> Utterance:
        assert self._open_start is not None
        hard_end = self._open_start + limit
        window_start = max(self._open_start + limit // 2,
                           hard_end - int(_CUT_SEARCH_S * SAMPLE_RATE_HZ))
        cut = self.endpointer.quietest_sample(window_start, hard_end)
        if cut is None or cut <= self._open_start:
            cut = hard_end
        utterance = attrs.evolve(self._close(cut), cut=True)
        # Speech goes on: the rest opens the next utterance straight away.
        self._open_start = cut
        self._partial_at = cut
        return utterance

    def _utterance(self, kind: Literal["partial", "final"], start: int, end: int) -> Utterance:
        return Utterance(
            kind=kind,
            utterance_id=self._next_id,
            audio=self._buffer.slice(start, end),
            start_ms=start // SAMPLES_PER_MS,
            end_ms=end // SAMPLES_PER_MS,
        )

    def _trim(self) -> None:
        if self._open_start is not None:
            keep_from = self._open_start
        else:
            # A speech run not yet confirmed may start before `position`: keep its pre-roll.
            start = min(self.position, self.endpointer.pending_start)
            keep_from = start - self.preroll_ms * SAMPLES_PER_MS
        self._buffer.trim_before(max(keep_from, 0))
