"""Messages that flow through a session, and the bounded channels that carry them.

A session links its three tasks with two channels:

* the **audio channel** (`open_audio_channel`), from ``_recv`` to ``_infer``. It carries audio
  frames and, in band so that ordering holds, the client's `Commit` and `End`, the server's
  `Overload`, and `Gap`s (audio the session skipped because it lagged; consecutive gaps merge).
  It never blocks the sender: when it holds ``max_frames`` audio frames, the oldest *audio frame*
  is dropped and counted. Control messages are never dropped. It also counts the samples it
  holds: that is the session's backlog.
* the **output channel** (`open_output_channel`), from ``_infer`` (and ``_recv``, for errors) to
  ``_send``. It holds ``max_messages`` outbound messages. A partial offered while it is 80% full or
  more is dropped and counted; finals, errors and the close are never dropped: their senders wait
  for room instead, which slows that one session and nothing else.

Both follow trio's channel semantics: closing every send end makes the receiver's ``receive``
raise `trio.EndOfChannel` after the buffered items; both expose `statistics()`.
"""

from __future__ import annotations

import collections
import math
from typing import Any, Generic, TypeAlias, TypeVar

import attrs
import numpy as np
import numpy.typing as npt
import trio

__all__ = [
    "AudioChannelStatistics",
    "AudioFrame",
    "AudioItem",
    "AudioReceiver",
    "AudioSender",
    "Close",
    "Commit",
    "End",
    "Gap",
    "LatestSlot",
    "OutputItem",
    "OutputReceiver",
    "OutputSender",
    "OutputStatistics",
    "Overload",
    "Transcript",
    "open_audio_channel",
    "open_output_channel",
]

PARTIAL_DROP_FILL = 0.8


# -- inbound: what _recv hands to _infer -------------------------------------------------------


@attrs.frozen
class AudioFrame:
    """PCM samples as received, with the trio clock time their last byte arrived."""

    samples: npt.NDArray[np.int16] = attrs.field(eq=False)
    received_at: float


@attrs.frozen
class Commit:
    """The client asked to finalize the current utterance now."""

    received_at: float


@attrs.frozen
class End:
    """Finalize everything and close: the client's ``end``, or the server ending the session."""

    received_at: float
    code: int = 1000
    reason: str = "end of stream"
    outcome: str = "ended"  # the session's outcome label in metrics
    error_code: str = ""  # when set, an error with this code and `reason` precedes the close


@attrs.frozen
class Gap:
    """`samples` of audio the session skipped instead of queueing, because it lagged."""

    samples: int
    received_at: float


@attrs.frozen
class Overload:
    """The audio channel overflowed too often: finalize what we have, then close 1013."""

    dropped_frames: int


AudioItem: TypeAlias = AudioFrame | Commit | End | Overload | Gap


# -- outbound: what _send writes ---------------------------------------------------------------


@attrs.frozen
class Transcript:
    """A partial or final transcript message, plus when its triggering audio arrived."""

    payload: dict[str, Any]
    is_final: bool
    # trio clock time the audio (or commit) that closed this utterance arrived; finals only.
    trigger_at: float | None = None


@attrs.frozen
class Close:
    """Close the WebSocket with this code once everything before it was sent."""

    code: int
    reason: str = ""


OutputItem: TypeAlias = Transcript | Close | dict[str, Any]


# -- the audio channel ---------------------------------------------------------------------------


@attrs.frozen
class AudioChannelStatistics:
    """A snapshot of an audio channel."""

    frames_buffered: int
    samples_buffered: int
    items_buffered: int
    max_frames: int
    dropped_frames: int
    open_send_channels: int


@attrs.define
class _AudioState:
    max_frames: int
    items: collections.deque[AudioItem] = attrs.Factory(collections.deque)
    frames: int = 0
    samples: int = 0
    dropped_frames: int = 0
    senders_open: int = 1
    receiver_open: bool = True
    lot: trio.lowlevel.ParkingLot = attrs.Factory(trio.lowlevel.ParkingLot)
    room: trio.lowlevel.ParkingLot = attrs.Factory(trio.lowlevel.ParkingLot)

    def statistics(self) -> AudioChannelStatistics:
        return AudioChannelStatistics(
            frames_buffered=self.frames,
            samples_buffered=self.samples,
            items_buffered=len(self.items),
            max_frames=self.max_frames,
            dropped_frames=self.dropped_frames,
            open_send_channels=self.senders_open,
        )


@attrs.define
class AudioSender:
    """Send end of the audio channel; never blocks."""

    _state: _AudioState
    _closed: bool = False

    def send_nowait(self, item: AudioItem) -> int:
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
        if isinstance(item, AudioFrame):
            if state.frames >= state.max_frames:
                oldest = _drop_oldest_frame(state.items)
                if oldest is not None:
                    dropped = 1
                    state.frames -= 1
                    state.samples -= oldest.samples.size
                    state.dropped_frames += 1
            state.frames += 1
            state.samples += item.samples.size
        elif isinstance(item, Gap) and state.items and isinstance(state.items[-1], Gap):
            last = state.items[-1]
            state.items[-1] = Gap(last.samples + item.samples, last.received_at)
            state.lot.unpark_all()
            return 0
        state.items.append(item)
        state.lot.unpark_all()
        return dropped

    @property
    def samples_buffered(self) -> int:
        """Audio samples queued now (the session's backlog); cheaper than `statistics()`."""
        return self._state.samples

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


def _drop_oldest_frame(items: collections.deque[AudioItem]) -> AudioFrame | None:
    for index, queued in enumerate(items):
        if isinstance(queued, AudioFrame):
            del items[index]
            return queued
    return None


@attrs.define
class AudioReceiver:
    """Receive end of the audio channel."""

    _state: _AudioState
    _closed: bool = False

    async def receive(self) -> AudioItem:
        """Wait for the next item; raises `trio.EndOfChannel` once all senders closed and drained."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            try:
                item = self.receive_nowait()
            except trio.WouldBlock:
                await self._state.lot.park()
            else:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return item

    def receive_nowait(self) -> AudioItem:
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
        self._state.lot.unpark_all()
        self._state.room.unpark_all()  # a task parked in receive() wakes to ClosedResourceError

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

    _channel: trio.MemorySendChannel[OutputItem]
    _max_messages: int
    _counters: _OutputCounters
    _closed: bool = False

    async def send(self, item: OutputItem) -> bool:
        """Queue `item`; returns False if it was a partial dropped because the queue is full."""
        if self._closed:
            raise trio.ClosedResourceError("output channel send end is closed")
        if isinstance(item, Transcript) and not item.is_final:
            used = self._channel.statistics().current_buffer_used
            if used >= math.ceil(PARTIAL_DROP_FILL * self._max_messages):
                self._counters.dropped_partials += 1
                await trio.lowlevel.checkpoint()
                return False
        await self._channel.send(item)
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


OutputReceiver: TypeAlias = trio.MemoryReceiveChannel[OutputItem]


def open_output_channel(max_messages: int) -> tuple[OutputSender, OutputReceiver]:
    """Open an output channel holding at most `max_messages` messages."""
    if max_messages < 1:
        raise ValueError(f"max_messages must be >= 1, got {max_messages}")
    send, receive = trio.open_memory_channel[OutputItem](max_messages)
    return OutputSender(send, max_messages, _OutputCounters()), receive


# -- the latest-only slot ------------------------------------------------------------------------

T = TypeVar("T")


@attrs.define
class LatestSlot(Generic[T]):
    """A one-item channel whose `put` replaces an item not yet taken (only the newest matters)."""

    _item: T | None = None
    _closed: bool = False
    replaced: int = 0
    _lot: trio.lowlevel.ParkingLot = attrs.Factory(trio.lowlevel.ParkingLot)

    def put(self, item: T) -> bool:
        """Offer `item`; returns True if it replaced one nobody had taken."""
        if self._closed:
            raise trio.ClosedResourceError("slot is closed")
        replaced = self._item is not None
        self.replaced += replaced
        self._item = item
        self._lot.unpark_all()
        return replaced

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
