"""How many live streams the engine can hold, learnt from what its calls cost, sans I/O.

Theory of operation. A live stream asks the engine for two kinds of work: a final for each
utterance, which costs about the same per second of speech whatever the utterance's length,
and partials while it speaks, at least one a second (`PARTIALS_PER_SPEECH_S`) for a speaking
caller to see words come. So one stream costs, in lane-seconds per second of its life::

    demand = speech_share * (final_s_per_audio_s + PARTIALS_PER_SPEECH_S * partial_s)

where `speech_share` is the part of a stream's time that is speech. The engine has ``lanes``
lanes, and its admitted streams may fill `max_load` of their time: beyond that, queues grow and
finals come late. And streams that end their sentences together (a burst: every admitted stream
at once, at worst) must have their finals cleared within `max_final_wait_s`, shared by every
lane, after the partial batch a lane may be busy with (`max_batch_s` of work). A final decoded
speculatively starts `head_start_s` before the end of speech is confirmed (the VAD's silence
less the speculation's wait), and that time counts towards the burst's budget too::

    capacity = min(floor(lanes * max_load / demand),
                   floor(lanes * (max_final_wait_s + head_start_s - max_batch_s)
                         / (final_s_per_audio_s * utterance_s)))

where `utterance_s` is how long the live streams' utterances are (3 s until seen).

Every number is measured on the machine the server runs on: `CapacityModel.observe` takes each
backend call's duration (a lane's wall time, so the cost of sharing the cores with the other
lanes and the event loop is in it) with the seconds of audio it decoded; the engine runs one
round of calls on a built-in clip at start, on every lane at once, so the first sessions are
admitted from real costs too. Its final is `PRIOR_UTTERANCE_S` of the clip, the length the
burst bound assumes until live finals say otherwise: a final's cost is not proportional to its
audio for a backend that pads every clip to one window (whisper: 0.16 s for 1 s, 0.21 s for
3 s, 0.22 s for 5 s on an AMD EPYC thread), so priced per second on a longer clip, the short
sentences of callers who connect together would look cheaper than they are. `speech_share`
starts at `_PRIOR_SPEECH_SHARE` and follows the audio the live streams' finals carry, over the
time they were open. Each cost is an
exponentially weighted average, so the model keeps up with what the machine does now (a
neighbour taking its CPU, a model that is slower on long clips).
"""

from __future__ import annotations

import math
from typing import Final

import attrs

__all__ = ["PARTIALS_PER_SPEECH_S", "PRIOR_UTTERANCE_S", "CapacityModel", "CapacityStatistics"]

# The partial rate a speaking stream is promised (and that its cost is counted at).
PARTIALS_PER_SPEECH_S: Final = 1.0
# Before the live streams have said how much of their time is speech: a call with pauses; and
# how long their utterances are: a short sentence (the engine's calibration prices its final
# at this length).
_PRIOR_SPEECH_SHARE: Final = 0.7
PRIOR_UTTERANCE_S: Final = 3.0
_MIN_SPEECH_SHARE: Final = 0.2  # a stream that says almost nothing still gets its partials
# The least time a burst of finals is given, whatever the settings say, seconds.
_MIN_BURST_BUDGET_S: Final = 0.1
# Weight of the newest observation in each running average.
_COST_WEIGHT: Final = 0.1
# Stream time between two updates of the speech share, seconds; and how much of the share the
# newest stretch is. (A stretch of a few sessions' silence must not make room for many more.)
_SHARE_PERIOD_S: Final = 30.0
_SHARE_WEIGHT: Final = 0.3


@attrs.frozen
class CapacityStatistics:
    """A snapshot of the model, for /health and /metrics."""

    capacity: int | None  # live streams that fit; None until both costs were seen
    final_s_per_audio_s: float | None
    partial_s: float | None
    speech_share: float
    utterance_s: float
    stream_demand: float | None  # lane-seconds one live stream needs per second
    # The two bounds `capacity` is the smaller of: the lanes' time, and a burst of finals.
    load_capacity: int | None
    burst_capacity: int | None


# Validated when built; its state then changes per frame, without attrs' setattr hooks.
@attrs.define(on_setattr=attrs.setters.NO_OP)
class CapacityModel:
    """Live streams the engine holds, from the measured cost of its calls."""

    lanes: int = attrs.field(validator=attrs.validators.gt(0))
    # The share of the lanes' time the admitted streams' expected work may fill (STT_MAX_LOAD).
    # 0: no limit from the model (it still measures).
    max_load: float = attrs.field(validator=[attrs.validators.ge(0), attrs.validators.le(1)])
    # How long a burst of finals, one from every admitted stream, may take to clear
    # (STT_MAX_FINAL_WAIT_S), and how long a partial batch may hold a lane first
    # (STT_MAX_BATCH_MS), seconds.
    max_final_wait_s: float = attrs.field(validator=attrs.validators.gt(0))
    max_batch_s: float = attrs.field(validator=attrs.validators.ge(0))
    # How much earlier than the end of speech is confirmed a final starts decoding
    # (STT_VAD_SILENCE_MS less STT_SPECULATE_MS where finals are speculated), seconds.
    head_start_s: float = attrs.field(default=0.0, validator=attrs.validators.ge(0))
    _final_s_per_audio_s: float | None = attrs.field(init=False, default=None)
    _partial_s: float | None = attrs.field(init=False, default=None)
    _speech_share: float = attrs.field(init=False, default=_PRIOR_SPEECH_SHARE)
    _utterance_s: float = attrs.field(init=False, default=PRIOR_UTTERANCE_S)
    # Audio of live finals and stream time since the speech share was last updated, seconds.
    _final_audio_s: float = attrs.field(init=False, default=0.0)
    _stream_s: float = attrs.field(init=False, default=0.0)

    def observe(self, kind: str, seconds: float, audio_s: float, requests: int) -> None:
        """A backend call of `requests` requests of `kind` (``final`` or ``partial``) took
        `seconds` of a lane's time and decoded `audio_s` seconds of audio."""
        if requests <= 0 or seconds < 0:
            return
        if kind == "final" and audio_s > 0:
            self._final_s_per_audio_s = _average(self._final_s_per_audio_s, seconds / audio_s)
            self._utterance_s += _COST_WEIGHT * (audio_s / requests - self._utterance_s)
        elif kind == "partial":
            self._partial_s = _average(self._partial_s, seconds / requests)

    def observe_streams(self, final_audio_s: float, stream_s: float) -> None:
        """The live streams spent `stream_s` stream-seconds (their count times the time that
        passed) and their finals carried `final_audio_s` seconds of speech."""
        self._final_audio_s += max(final_audio_s, 0.0)
        self._stream_s += max(stream_s, 0.0)
        if self._stream_s < _SHARE_PERIOD_S:
            return
        share = min(max(self._final_audio_s / self._stream_s, _MIN_SPEECH_SHARE), 1.0)
        self._speech_share += _SHARE_WEIGHT * (share - self._speech_share)
        self._final_audio_s = self._stream_s = 0.0

    @property
    def stream_demand(self) -> float | None:
        """Lane-seconds one live stream needs per second of its life, or None if unknown."""
        if self._final_s_per_audio_s is None or self._partial_s is None:
            return None
        return self._speech_share * (self._final_s_per_audio_s
                                     + PARTIALS_PER_SPEECH_S * self._partial_s)

    @property
    def load_capacity(self) -> int | None:
        """Live streams whose work fits in `max_load` of the lanes (None: unknown, or free)."""
        demand = self.stream_demand
        if demand is None or demand <= 0:  # a backend that costs nothing has no limit
            return None
        return math.floor(self.lanes * self.max_load / demand)

    @property
    def burst_capacity(self) -> int | None:
        """Live streams whose finals, all at once, clear within `max_final_wait_s`."""
        if not self._final_s_per_audio_s:
            return None
        per_final_s = self._final_s_per_audio_s * self._utterance_s
        budget_s = max(self.max_final_wait_s + self.head_start_s - self.max_batch_s,
                       _MIN_BURST_BUDGET_S)
        return math.floor(self.lanes * budget_s / per_final_s)

    @property
    def capacity(self) -> int | None:
        """Live streams the engine holds: the smaller bound, or None while costs are unknown
        (or when `max_load` is 0)."""
        if self.max_load == 0:
            return None
        load, burst = self.load_capacity, self.burst_capacity
        if load is None:
            return None
        return load if burst is None else min(load, burst)

    def statistics(self) -> CapacityStatistics:
        return CapacityStatistics(self.capacity, self._final_s_per_audio_s, self._partial_s,
                                  self._speech_share, self._utterance_s, self.stream_demand,
                                  self.load_capacity, self.burst_capacity)


def _average(old: float | None, new: float) -> float:
    return new if old is None else old + _COST_WEIGHT * (new - old)
