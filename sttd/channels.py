"""The bounded channels that link a session's tasks, and the policies they apply when full.

A session's tasks (`sttd.nursery`) are linked by:

* the **audio channel** (`open_audio_channel`), from ``_recv`` to ``_infer``. It carries audio
  frames and, in band so that ordering holds, the client's `Commit` and `End`, the server's
  `Stop`, and `Gap`s (audio the session does not have). It never blocks the sender: when it
  holds ``max_frames`` audio frames, the oldest *frame* is dropped, counted, and left in its
  place as a `Gap`, so stream times after it stay the client's. Control items are never
  dropped; a commit right behind another is the same request and is coalesced, so a client
  that floods commits cannot grow the queue; adjacent gaps merge. It counts the
  samples it holds: that is the session's backlog. It also says when its receiver is parked on
  it with nothing queued (`AudioSender.receiver_waiting`): then ``_recv`` may feed a frame to
  the core itself and queue only what the core released (`Released`), in band, so that the
  infer task sends it in order.
* the **output channel** (`open_output_channel`), from ``_infer`` (and ``_recv``, for errors
  about the client's messages) to ``_send``. It holds ``max_messages`` events. A partial offered
  while it is 80% full or more is dropped and counted; finals, errors and the close are never
  dropped: their senders wait for room instead, which slows that one session and nothing else.
* a **latest-only slot** (`LatestSlot`) from ``_infer`` to ``_partials``: a partial not yet
  taken is replaced by a newer one, since only the newest audio is worth decoding.

`LagPolicy` decides what ``_recv`` does with a frame when the session is behind (sans I/O).

All follow trio's channel semantics: closing every send end makes the receiver's ``receive``
raise `trio.EndOfChannel` after the buffered items; the channels expose `statistics()`.
"""

from __future__ import annotations

import collections
import enum
import math
from typing import Generic, TypeAlias, TypeVar

import attrs
import trio

from sttd.api import Commit, Partial, SessionEvent
from sttd.audio import SAMPLE_RATE_HZ
from sttd.session import AudioFrame, Decode, Gap, InputItem

__all__ = [
    "AudioChannelStatistics",
    "AudioReceiver",
    "AudioSender",
    "ChannelItem",
    "LagAction",
    "LagPolicy",
    "LatestSlot",
    "OutputReceiver",
    "OutputSender",
    "OutputStatistics",
    "Released",
    "open_audio_channel",
    "open_output_channel",
]

PARTIAL_DROP_FILL = 0.8
# A session tells its client about dropped frames at the first drop and every this many after.
DROP_REPORT_EVERY = 50


# -- the lag policy ------------------------------------------------------------------------------


class LagAction(enum.Enum):
    """What to do with a frame that arrives while the session is behind."""

    QUEUE = "queue"  # take it (a full queue drops its oldest frame, as a counted gap)
    HOLD = "hold"  # a client ahead of real time: stop reading until the backlog halves


@attrs.frozen
class LagPolicy:
    """How a session's input copes with a backlog (audio received but not yet processed).

    Past `max_lag_s` of backlog the session stops partials (``_infer`` asks `lagging`). A live
    stream's audio is never skipped for being late: it queues, and only a full queue (the
    session's memory bound) drops its oldest frame, counted and reported. A client that sent
    more audio than time has passed (a file sent fast) is held back instead once it is twice
    `max_lag_s` behind, so TCP slows it and nothing is lost.
    """

    max_lag_s: float = attrs.field(validator=attrs.validators.gt(0))

    @property
    def hold_above_samples(self) -> int:
        return int(2 * self.max_lag_s * SAMPLE_RATE_HZ)

    def lagging(self, backlog_samples: int) -> bool:
        """Whether a session this far behind should skip its partials."""
        return backlog_samples > self.max_lag_s * SAMPLE_RATE_HZ

    def decide(self, *, backlog_samples: int, full: bool, received_samples: int,
               elapsed_s: float) -> LagAction:
        """What to do with the next frame; `received_samples` counts it."""
        behind = backlog_samples > self.hold_above_samples
        if (behind or full) and received_samples / SAMPLE_RATE_HZ - elapsed_s > self.max_lag_s:
            return LagAction.HOLD
        return LagAction.QUEUE


# -- the audio channel ---------------------------------------------------------------------------


@attrs.frozen
class Released:
    """What the core released for a frame the receive task fed it itself, while the infer task
    waited on an empty channel: queued in band, so the infer task sends it and starts its
    decodes in the core's order, as if it had fed the frame."""

    outputs: tuple[Decode | SessionEvent, ...]


ChannelItem: TypeAlias = InputItem | Released


@attrs.frozen
class AudioChannelStatistics:
    """A snapshot of an audio channel."""

    frames_buffered: int
    samples_buffered: int
    items_buffered: int
    max_frames: int
    dropped_frames: int
    dropped_samples: int
    open_send_channels: int


@attrs.define
class _AudioState:
    max_frames: int
    items: collections.deque[ChannelItem] = attrs.Factory(collections.deque)
    frames: int = 0
    samples: int = 0
    dropped_frames: int = 0
    dropped_samples: int = 0
    senders_open: int = 1
    receiver_open: bool = True
    receiver_parked: bool = False  # in `AudioReceiver.receive`, on an empty channel
    lot: trio.lowlevel.ParkingLot = attrs.Factory(trio.lowlevel.ParkingLot)
    room: trio.lowlevel.ParkingLot = attrs.Factory(trio.lowlevel.ParkingLot)

    def statistics(self) -> AudioChannelStatistics:
        return AudioChannelStatistics(
            frames_buffered=self.frames,
            samples_buffered=self.samples,
            items_buffered=len(self.items),
            max_frames=self.max_frames,
            dropped_frames=self.dropped_frames,
            dropped_samples=self.dropped_samples,
            open_send_channels=self.senders_open,
        )

    def drop_oldest_frame(self) -> bool:
        """Replace the oldest queued frame by a `Gap` of its length (merged with a neighbour)."""
        items = self.items
        for index, queued in enumerate(items):
            if isinstance(queued, AudioFrame):
                break
        else:
            return False
        gap = Gap(queued.samples.size, queued.received_at)
        before = items[index - 1] if index else None
        if isinstance(before, Gap):
            items[index - 1] = Gap(before.samples + gap.samples, before.received_at)
            del items[index]
        else:
            items[index] = gap
        self.frames -= 1
        self.samples -= gap.samples
        self.dropped_frames += 1
        self.dropped_samples += gap.samples
        return True


@attrs.define
class AudioSender:
    """Send end of the audio channel; never blocks."""

    _state: _AudioState
    _closed: bool = False

    def send_nowait(self, item: ChannelItem) -> int:
        """Queue `item`, dropping the oldest audio frames past capacity; returns frames dropped.

        Raises `trio.ClosedResourceError` if this end is closed, `trio.BrokenResourceError` if
        the receiver is gone.
        """
        if self._closed:
            raise trio.ClosedResourceError("audio channel send end is closed")
        state = self._state
        if not state.receiver_open:
            raise trio.BrokenResourceError("audio channel receiver is closed")
        dropped = 0
        last = state.items[-1] if state.items else None
        if isinstance(item, AudioFrame):
            if state.frames >= state.max_frames and state.drop_oldest_frame():
                dropped = 1
            state.frames += 1
            state.samples += item.samples.size
        elif isinstance(item, Gap) and isinstance(last, Gap):
            state.items[-1] = Gap(last.samples + item.samples, last.received_at)
            state.lot.unpark_all()
            return 0
        elif isinstance(item, Commit) and isinstance(last, Commit):
            return 0  # the same request again: one final answers both
        state.items.append(item)
        state.lot.unpark_all()
        return dropped

    @property
    def samples_buffered(self) -> int:
        """Audio samples queued now (the session's backlog); cheaper than `statistics()`."""
        return self._state.samples

    @property
    def receiver_waiting(self) -> bool:
        """Whether the receiver is parked on this channel with nothing queued: it has taken
        every item sent so far, and takes the next one sent first."""
        state = self._state
        return state.receiver_parked and not state.items and state.receiver_open

    @property
    def dropped_samples(self) -> int:
        """Samples of all the frames dropped so far; cheaper than `statistics()`."""
        return self._state.dropped_samples

    @property
    def full(self) -> bool:
        """Whether the next frame would push out the oldest one."""
        return self._state.frames >= self._state.max_frames

    async def wait_for_room(self, max_samples: int) -> None:
        """Wait until the channel holds at most `max_samples` samples and has a free frame slot.

        For backpressure on a client that sends faster than real time: not receiving lets TCP
        slow it down, where queueing would drop its frames.
        """
        state = self._state
        while state.receiver_open and (
                state.samples > max_samples or state.frames >= state.max_frames):
            await state.room.park()
        await trio.lowlevel.checkpoint()

    def close(self) -> None:
        """Close this end; the receiver sees `EndOfChannel` after buffered items. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._state.senders_open -= 1
        if self._state.senders_open == 0:
            self._state.lot.unpark_all()

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> AudioSender:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def statistics(self) -> AudioChannelStatistics:
        return self._state.statistics()


@attrs.define
class AudioReceiver:
    """Receive end of the audio channel."""

    _state: _AudioState
    _closed: bool = False

    @property
    def samples_buffered(self) -> int:
        """Audio samples queued now (the session's backlog)."""
        return self._state.samples

    async def receive(self) -> ChannelItem:
        """Wait for the next item; raises `trio.EndOfChannel` once all senders closed and drained."""
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            item = self.receive_nowait()
        except trio.WouldBlock:
            pass
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return item
        while True:
            # Parking was this call's schedule point: what woke it is taken at once (a second
            # checkpoint would cost every frame a pass of the scheduler).
            self._state.receiver_parked = True
            try:
                await self._state.lot.park()
            finally:
                self._state.receiver_parked = False
            try:
                return self.receive_nowait()
            except trio.WouldBlock:
                continue

    def receive_nowait(self) -> ChannelItem:
        """Take the next item now; raises `trio.WouldBlock` when empty, `EndOfChannel` when done."""
        if self._closed:
            raise trio.ClosedResourceError("audio channel receive end is closed")
        state = self._state
        if state.items:
            item = state.items.popleft()
            if isinstance(item, AudioFrame):
                state.frames -= 1
                state.samples -= item.samples.size
            if state.room:
                state.room.unpark_all()
            return item
        if state.senders_open == 0:
            raise trio.EndOfChannel
        raise trio.WouldBlock

    def close(self) -> None:
        """Close this end and discard what is buffered. Idempotent."""
        self._closed = True
        self._state.receiver_open = False
        self._state.items.clear()
        self._state.frames = 0
        self._state.samples = 0
        self._state.lot.unpark_all()  # a task parked in receive() wakes to ClosedResourceError
        self._state.room.unpark_all()  # and a sender in wait_for_room() returns

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> AudioReceiver:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def statistics(self) -> AudioChannelStatistics:
        return self._state.statistics()


def open_audio_channel(max_frames: int) -> tuple[AudioSender, AudioReceiver]:
    """Open a drop-oldest audio channel holding at most `max_frames` audio frames."""
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    state = _AudioState(max_frames=max_frames)
    return AudioSender(state), AudioReceiver(state)


# -- the output channel --------------------------------------------------------------------------


@attrs.frozen
class OutputStatistics:
    """A snapshot of an output channel."""

    messages_buffered: int
    max_messages: int
    dropped_partials: int


@attrs.define
class _OutputCounters:
    dropped_partials: int = 0


@attrs.define
class OutputSender:
    """Send end of the output channel: partials may be dropped, everything else waits for room."""

    _channel: trio.MemorySendChannel[SessionEvent]
    _max_messages: int
    _counters: _OutputCounters
    _closed: bool = False

    async def send(self, event: SessionEvent) -> bool:
        """Queue `event`; returns False if it was a partial dropped because the queue is full."""
        if self._closed:
            raise trio.ClosedResourceError("output channel send end is closed")
        if isinstance(event, Partial):
            used = self._channel.statistics().current_buffer_used
            if used >= math.ceil(PARTIAL_DROP_FILL * self._max_messages):
                self._counters.dropped_partials += 1
                await trio.lowlevel.checkpoint()
                return False
        await self._channel.send(event)
        return True

    def clone(self) -> OutputSender:
        """Another send end on the same channel; the receiver ends when all are closed."""
        return OutputSender(self._channel.clone(), self._max_messages, self._counters)

    async def aclose(self) -> None:
        self._closed = True
        await self._channel.aclose()

    async def __aenter__(self) -> OutputSender:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def statistics(self) -> OutputStatistics:
        return OutputStatistics(
            messages_buffered=self._channel.statistics().current_buffer_used,
            max_messages=self._max_messages,
            dropped_partials=self._counters.dropped_partials,
        )


OutputReceiver: TypeAlias = trio.MemoryReceiveChannel[SessionEvent]


def open_output_channel(max_messages: int) -> tuple[OutputSender, OutputReceiver]:
    """Open an output channel holding at most `max_messages` events."""
    if max_messages < 1:
        raise ValueError(f"max_messages must be >= 1, got {max_messages}")
    send, receive = trio.open_memory_channel[SessionEvent](max_messages)
    return OutputSender(send, max_messages, _OutputCounters()), receive


# -- the latest-only slot ------------------------------------------------------------------------

T = TypeVar("T")


@attrs.define
class LatestSlot(Generic[T]):
    """A one-item channel whose `put` replaces an item not yet taken (only the newest matters)."""

    _item: T | None = None
    _closed: bool = False
    _lot: trio.lowlevel.ParkingLot = attrs.Factory(trio.lowlevel.ParkingLot)

    def put(self, item: T) -> None:
        """Offer `item`, replacing one nobody has taken yet."""
        if self._closed:
            raise trio.ClosedResourceError("slot is closed")
        self._item = item
        self._lot.unpark_all()

    async def take(self) -> T:
        """Wait for an item; raises `trio.EndOfChannel` once closed and empty."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while self._item is None:
            if self._closed:
                raise trio.EndOfChannel
            await self._lot.park()
        item, self._item = self._item, None
        await trio.lowlevel.cancel_shielded_checkpoint()
        return item

    def close(self) -> None:
        """No more items: a waiting `take` ends with `EndOfChannel`. Idempotent."""
        self._closed = True
        self._lot.unpark_all()

    def __enter__(self) -> LatestSlot[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
