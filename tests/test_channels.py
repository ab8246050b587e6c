"""Tests for sttd.channels: the drop-oldest audio channel and the partial-dropping output channel."""

from __future__ import annotations

import math

import numpy as np
import pytest
import trio
import trio.testing

from sttd.api import Close, Commit, End, Error, Final, Partial, SessionEvent
from sttd.channels import (
    AudioChannelStatistics,
    AudioReceiver,
    LagAction,
    LagPolicy,
    LatestSlot,
    OutputReceiver,
    OutputStatistics,
    Released,
    open_audio_channel,
    open_output_channel,
)
from sttd.session import AudioFrame, Gap, InputItem, Stop

AudioItem = InputItem
OutputItem = SessionEvent


# Async tests take `autojump_clock`, so this guard fails a deadlocked test at once, in virtual time.
HANG_S = 60


def frame(tag: int) -> AudioFrame:
    """An audio frame recognisable by its `received_at` (frames compare by time only)."""
    return AudioFrame(np.full(4, tag, np.int16), float(tag))


def partial(n: int) -> Partial:
    return Partial(n, "", str(n), 0, 0)


def final(n: int) -> Final:
    return Final(n, str(n), 0, 0, ended_at=float(n))


def dropped(tag: int, frames: int = 1) -> Gap:
    """The gap `frames` dropped frames leave, the first of them `frame(tag)`."""
    return Gap(frames * frame(tag).samples.size, float(tag))


STOP = Stop(2.5, 1013, "too much", "overloaded", "overloaded")


def drain_nowait(receiver: AudioReceiver) -> list[AudioItem]:
    items = []
    while True:
        try:
            items.append(receiver.receive_nowait())
        except trio.WouldBlock:
            return items


def drain_output(receiver: OutputReceiver) -> list[OutputItem]:
    items = []
    while True:
        try:
            items.append(receiver.receive_nowait())
        except trio.WouldBlock:
            return items


# --- audio channel: drop-oldest ----------------------------------------------------------------


@pytest.mark.parametrize("max_frames", [0, -1])
def test_audio_channel_needs_room(max_frames: int) -> None:
    with pytest.raises(ValueError, match=f"max_frames must be >= 1, got {max_frames}"):
        open_audio_channel(max_frames)


def test_audio_frames_pass_in_order_below_capacity() -> None:
    send, receive = open_audio_channel(3)
    assert [send.send_nowait(frame(i)) for i in range(3)] == [0, 0, 0]
    samples = 3 * frame(0).samples.size
    assert send.statistics() == AudioChannelStatistics(
        frames_buffered=3, samples_buffered=samples, items_buffered=3, max_frames=3,
        dropped_frames=0, dropped_samples=0, open_send_channels=1)
    assert drain_nowait(receive) == [frame(0), frame(1), frame(2)]
    assert receive.statistics().frames_buffered == 0
    assert receive.statistics().samples_buffered == 0


def test_full_audio_channel_drops_oldest_frame_and_leaves_a_gap_in_its_place() -> None:
    send, receive = open_audio_channel(3)
    returns = [send.send_nowait(frame(i)) for i in range(7)]
    assert returns == [0, 0, 0, 1, 1, 1, 1]
    stats = send.statistics()
    assert (stats.frames_buffered, stats.items_buffered, stats.dropped_frames) == (3, 4, 4)
    received = drain_nowait(receive)
    # The four oldest went; one gap of their length keeps later stream times true.
    assert received == [dropped(0, frames=4), frame(4), frame(5), frame(6)]
    assert isinstance(received[0], Gap) and received[0].samples == 16
    assert send.dropped_samples == receive.statistics().dropped_samples == 16
    assert [int(item.samples[0]) for item in received if isinstance(item, AudioFrame)] == [4, 5, 6]
    assert receive.statistics().dropped_frames == 4  # the count survives draining


def test_control_items_are_never_dropped_and_keep_their_place() -> None:
    send, receive = open_audio_channel(2)
    sent: list[AudioItem] = [
        frame(0), Commit(0.5), frame(1), End(1.5), frame(2), STOP, frame(3), Commit(3.5), frame(4),
    ]
    returns = [send.send_nowait(item) for item in sent]
    assert returns == [0, 0, 0, 0, 1, 0, 1, 0, 1]
    stats = send.statistics()
    assert (stats.frames_buffered, stats.items_buffered, stats.dropped_frames) == (2, 9, 3)
    # Frames 0, 1 and 2 went, each leaving its gap; every control item stayed, in order, between
    # the frames it came between.
    assert drain_nowait(receive) == [dropped(0), Commit(0.5), dropped(1), End(1.5), dropped(2),
                                     STOP, frame(3), Commit(3.5), frame(4)]


def test_control_items_do_not_count_towards_capacity() -> None:
    send, receive = open_audio_channel(1)
    controls: list[AudioItem] = [Commit(float(i)) if i % 2 else Stop(float(i), 1000, "", "idle")
                                 for i in range(50)]
    assert [send.send_nowait(item) for item in controls] == [0] * 50
    assert send.send_nowait(frame(0)) == 0
    assert send.statistics().frames_buffered == 1
    assert send.statistics().items_buffered == 51
    assert send.send_nowait(frame(1)) == 1
    items = drain_nowait(receive)
    assert items == [*controls, dropped(0), frame(1)]


def test_a_flood_of_commits_coalesces_instead_of_growing_the_queue() -> None:
    """Control items are never dropped, so a client sending commit after commit would grow the
    queue without bound; back to back they are one request, answered by one final."""
    send, receive = open_audio_channel(4)
    for i in range(10_000):
        send.send_nowait(Commit(float(i)))
    send.send_nowait(frame(1))
    send.send_nowait(Commit(2.0))
    send.send_nowait(Commit(3.0))
    assert send.statistics().items_buffered == 3
    assert drain_nowait(receive) == [Commit(0.0), frame(1), Commit(2.0)]


def test_adjacent_gaps_merge() -> None:
    send, receive = open_audio_channel(1)
    send.send_nowait(frame(0))
    send.send_nowait(frame(1))  # drops frame 0
    send.send_nowait(frame(2))  # drops frame 1, right behind the first gap
    send.send_nowait(Gap(5, 3.0))
    send.send_nowait(Gap(5, 4.0))
    assert drain_nowait(receive) == [dropped(0, frames=2), frame(2), Gap(10, 3.0)]


def test_receiving_makes_room_again() -> None:
    send, receive = open_audio_channel(2)
    send.send_nowait(frame(0))
    send.send_nowait(frame(1))
    assert receive.receive_nowait() == frame(0)
    assert send.send_nowait(frame(2)) == 0
    assert send.statistics().dropped_frames == 0
    assert drain_nowait(receive) == [frame(1), frame(2)]


# --- audio channel: waiting and ending ---------------------------------------------------------


async def test_receive_waits_for_an_item(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(HANG_S):
        send, receive = open_audio_channel(4)
        got: list[AudioItem] = []

        async def receiver() -> None:
            got.append(await receive.receive())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receiver)
            await trio.testing.wait_all_tasks_blocked()
            assert got == []  # parked, not spinning
            send.send_nowait(Commit(1.0))
        assert got == [Commit(1.0)]


async def test_the_sender_sees_when_its_receiver_waits_on_an_empty_channel(
        autojump_clock: trio.testing.MockClock) -> None:
    # Only then has the receiver taken every item sent, and will it take the next one first:
    # the session's receive task may feed the core itself (sttd.nursery).
    with trio.fail_after(HANG_S):
        send, receive = open_audio_channel(4)
        assert not send.receiver_waiting  # not receiving
        got: list[object] = []

        async def receiver() -> None:
            got.append(await receive.receive())

        async with trio.open_nursery() as nursery:
            send.send_nowait(frame(1))
            nursery.start_soon(receiver)
            await trio.testing.wait_all_tasks_blocked()
            assert got == [frame(1)] and not send.receiver_waiting  # took it without waiting
            nursery.start_soon(receiver)
            await trio.testing.wait_all_tasks_blocked()
            assert send.receiver_waiting
            send.send_nowait(Released(()))
            assert not send.receiver_waiting  # woken, but the item is not taken yet
        assert got == [frame(1), Released(())]
        assert not send.receiver_waiting
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receiver)
            await trio.testing.wait_all_tasks_blocked()
            assert send.receiver_waiting
            nursery.cancel_scope.cancel()
        assert not send.receiver_waiting  # cancelled while parked
        receive.close()
        assert not send.receiver_waiting


async def test_receive_wakes_for_each_item_in_order(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(HANG_S):
        send, receive = open_audio_channel(4)
        got: list[AudioItem] = []

        async def receiver() -> None:
            with pytest.raises(trio.EndOfChannel):
                while True:
                    got.append(await receive.receive())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receiver)
            for item in (frame(0), End(1.0), frame(2)):
                await trio.testing.wait_all_tasks_blocked()
                send.send_nowait(item)
            await trio.testing.wait_all_tasks_blocked()
            assert got == [frame(0), End(1.0), frame(2)]
            send.close()
        assert got == [frame(0), End(1.0), frame(2)]


async def test_end_of_channel_after_buffered_items_drain(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(HANG_S):
        send, receive = open_audio_channel(4)
        send.send_nowait(frame(0))
        send.send_nowait(End(1.0))
        send.close()
        assert send.statistics().open_send_channels == 0
        assert await receive.receive() == frame(0)
        assert await receive.receive() == End(1.0)
        with pytest.raises(trio.EndOfChannel):
            await receive.receive()
        with pytest.raises(trio.EndOfChannel):
            receive.receive_nowait()


async def test_closing_sender_wakes_a_waiting_receiver_with_end_of_channel(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(HANG_S):
        send, receive = open_audio_channel(4)
        outcome: list[str] = []

        async def receiver() -> None:
            try:
                await receive.receive()
            except trio.EndOfChannel:
                outcome.append("end")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receiver)
            await trio.testing.wait_all_tasks_blocked()
            await send.aclose()
        assert outcome == ["end"]


async def test_async_with_closes_both_ends(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(HANG_S):
        send, receive = open_audio_channel(4)
        async with send:
            send.send_nowait(frame(0))
        with pytest.raises(trio.ClosedResourceError, match="send end is closed"):
            send.send_nowait(frame(1))
        async with receive:
            assert await receive.receive() == frame(0)
        with pytest.raises(trio.ClosedResourceError, match="receive end is closed"):
            await receive.receive()


def test_send_after_close_is_closed_resource_error() -> None:
    send, _receive = open_audio_channel(4)
    send.close()
    send.close()  # idempotent
    assert send.statistics().open_send_channels == 0
    for item in (frame(0), Commit(0.0)):
        with pytest.raises(trio.ClosedResourceError):
            send.send_nowait(item)


def test_send_after_receiver_closed_is_broken_resource_error() -> None:
    send, receive = open_audio_channel(4)
    send.send_nowait(frame(0))
    receive.close()
    assert receive.statistics().frames_buffered == 0
    assert receive.statistics().items_buffered == 0  # buffered items are discarded
    for item in (frame(1), End(1.0)):
        with pytest.raises(trio.BrokenResourceError):
            send.send_nowait(item)
    with pytest.raises(trio.ClosedResourceError):
        receive.receive_nowait()


async def test_receive_on_closed_receiver_is_closed_resource_error(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(HANG_S):
        _send, receive = open_audio_channel(4)
        await receive.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await receive.receive()


async def test_receive_is_cancellable_while_waiting(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(HANG_S):
        send, receive = open_audio_channel(4)
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(receive.receive)
                await trio.testing.wait_all_tasks_blocked()
                scope.cancel()
        assert scope.cancelled_caught
        # Nothing was consumed: the next item is still delivered.
        send.send_nowait(frame(9))
        assert await receive.receive() == frame(9)


async def test_receive_in_a_cancelled_scope_takes_nothing(autojump_clock: trio.testing.MockClock) -> None:
    send, receive = open_audio_channel(4)
    send.send_nowait(frame(1))
    with trio.CancelScope() as scope:
        scope.cancel()
        await receive.receive()
    assert scope.cancelled_caught
    assert receive.receive_nowait() == frame(1)


async def test_closing_receiver_wakes_a_waiting_receive(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(HANG_S):
        _send, receive = open_audio_channel(4)
        outcome: list[str] = []

        async def receiver() -> None:
            try:
                await receive.receive()
            except trio.ClosedResourceError:
                outcome.append("closed")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receiver)
            await trio.testing.wait_all_tasks_blocked()
            receive.close()
            await trio.testing.wait_all_tasks_blocked()
            assert outcome == ["closed"]  # on failure, the assert's exception cancels the stuck task


# --- output channel ----------------------------------------------------------------------------


@pytest.mark.parametrize("max_messages", [0, -3])
def test_output_channel_needs_room(max_messages: int) -> None:
    with pytest.raises(ValueError, match=f"max_messages must be >= 1, got {max_messages}"):
        open_output_channel(max_messages)


@pytest.mark.parametrize("max_messages", [1, 2, 5, 10, 50])
async def test_partials_dropped_from_80_percent_full(max_messages: int, autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(HANG_S):
        send, receive = open_output_channel(max_messages)
        threshold = math.ceil(0.8 * max_messages)
        for i in range(threshold):
            assert await send.send(final(i)) is True
        assert await send.send(partial(0)) is False
        assert await send.send(partial(1)) is False
        assert send.statistics() == OutputStatistics(
            messages_buffered=threshold, max_messages=max_messages, dropped_partials=2)
        assert drain_output(receive) == [final(i) for i in range(threshold)]


@pytest.mark.parametrize("max_messages", [2, 5, 10, 50])
async def test_partials_pass_below_80_percent(max_messages: int, autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(HANG_S):
        send, receive = open_output_channel(max_messages)
        threshold = math.ceil(0.8 * max_messages)
        results = [await send.send(partial(i)) for i in range(threshold + 3)]
        assert results == [True] * threshold + [False] * 3
        assert send.statistics().dropped_partials == 3
        assert drain_output(receive) == [partial(i) for i in range(threshold)]
        # Once drained, partials flow again.
        assert await send.send(partial(99)) is True
        assert drain_output(receive) == [partial(99)]


async def test_finals_errors_and_close_fill_the_channel_without_drops(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(HANG_S):
        send, receive = open_output_channel(5)
        items: list[OutputItem] = [final(0), Error("x", "m"), final(1), Close(1000, "bye"), final(2)]
        assert [await send.send(item) for item in items] == [True] * 5
        assert send.statistics() == OutputStatistics(messages_buffered=5, max_messages=5, dropped_partials=0)
        assert drain_output(receive) == items


async def test_non_partials_wait_for_room_and_keep_order(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(HANG_S):
        send, receive = open_output_channel(2)
        sent_order: list[int] = []
        items: list[OutputItem] = [final(0), final(1), Error("x", "2"), final(3), Close(1000)]

        async def sender() -> None:
            for index, item in enumerate(items):
                assert await send.send(item) is True
                sent_order.append(index)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            await trio.testing.wait_all_tasks_blocked()
            assert sent_order == [0, 1]  # full: the error waits, it is not dropped
            assert send.statistics().messages_buffered == 2
            received = [await receive.receive()]
            await trio.testing.wait_all_tasks_blocked()
            assert sent_order == [0, 1, 2]
            while len(received) < len(items):
                received.append(await receive.receive())
        assert received == items
        assert send.statistics().dropped_partials == 0


async def test_partial_is_dropped_while_a_final_waits_for_room(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(HANG_S):
        send, receive = open_output_channel(2)
        log: list[str] = []

        async def send_final() -> None:
            await send.send(final(2))
            log.append("final sent")

        await send.send(final(0))
        await send.send(final(1))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_final)
            await trio.sleep(10)  # virtual: the final is still waiting
            assert log == []
            assert await send.send(partial(0)) is False
            assert receive.receive_nowait() == final(0)
            await trio.testing.wait_all_tasks_blocked()
            assert log == ["final sent"]
        assert drain_output(receive) == [final(1), final(2)]
        assert send.statistics().dropped_partials == 1


async def test_clone_keeps_receiver_open_until_all_clones_close(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(HANG_S):
        send, receive = open_output_channel(4)
        other = send.clone()
        async with send:
            await send.send(final(0))
        await other.send(final(1))
        assert receive.receive_nowait() == final(0)
        assert receive.receive_nowait() == final(1)
        with pytest.raises(trio.WouldBlock):  # still open: a clone remains
            receive.receive_nowait()
        await other.aclose()
        with pytest.raises(trio.EndOfChannel):
            await receive.receive()


async def test_clones_share_the_dropped_partials_count(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(HANG_S):
        send, _receive = open_output_channel(1)
        other = send.clone()
        await send.send(final(0))
        assert await send.send(partial(0)) is False
        assert await other.send(partial(1)) is False
        assert send.statistics().dropped_partials == 2
        assert other.statistics().dropped_partials == 2


async def test_send_on_closed_output_sender_raises(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(HANG_S):
        send, _receive = open_output_channel(4)
        await send.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await send.send(final(0))


async def test_send_after_output_receiver_closed_is_broken(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(HANG_S):
        send, receive = open_output_channel(4)
        await receive.aclose()
        with pytest.raises(trio.BrokenResourceError):
            await send.send(Close(1000))


# --- audio channel: backlog accounting, gaps, backpressure ---------------------------------------


def test_samples_are_counted_through_drops_and_gaps_merge() -> None:
    send, receive = open_audio_channel(2)
    for i in range(3):  # the third drops the first
        send.send_nowait(frame(i))
    assert send.statistics().samples_buffered == 2 * frame(0).samples.size
    assert send.samples_buffered == 2 * frame(0).samples.size and send.full
    send.send_nowait(Gap(100, 3.0))
    send.send_nowait(Gap(50, 4.0))
    send.send_nowait(Commit(5.0))
    send.send_nowait(Gap(7, 6.0))
    assert drain_nowait(receive) == [dropped(0), frame(1), frame(2), Gap(150, 3.0), Commit(5.0),
                                     Gap(7, 6.0)]
    assert receive.statistics().samples_buffered == 0


async def test_wait_for_room_waits_until_the_receiver_catches_up(
        autojump_clock: trio.abc.Clock) -> None:
    send, receive = open_audio_channel(100)
    for i in range(10):  # 40 samples
        send.send_nowait(frame(i))
    woke_at: list[float] = []

    async def sender() -> None:
        await send.wait_for_room(max_samples=12)
        woke_at.append(trio.current_time())

    with trio.fail_after(HANG_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            for _ in range(7):
                await trio.sleep(1)
                receive.receive_nowait()
    assert woke_at == [7.0]  # 3 frames (12 samples) left after the seventh receive
    assert send.statistics().samples_buffered == 12


async def test_wait_for_room_returns_when_the_receiver_closes(
        autojump_clock: trio.abc.Clock) -> None:
    send, receive = open_audio_channel(1)
    send.send_nowait(frame(0))
    with trio.fail_after(HANG_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send.wait_for_room, 0)
            await trio.sleep(1)
            receive.close()


# --- the lag policy ------------------------------------------------------------------------------


@pytest.mark.parametrize(("backlog_s", "full", "received_s", "elapsed_s", "action"), [
    (0.5, False, 10.0, 10.0, LagAction.QUEUE),   # keeping up
    (2.9, False, 10.0, 10.0, LagAction.QUEUE),   # behind, but within 2 x max_lag_s
    (3.1, False, 10.0, 10.0, LagAction.QUEUE),   # a live stream far behind: queued, never skipped
    (3.1, False, 20.0, 10.0, LagAction.HOLD),    # ahead of real time (a file sent fast): hold
    (0.5, True, 10.0, 10.0, LagAction.QUEUE),    # queue full but live: the oldest frame drops
    (0.5, True, 12.0, 10.0, LagAction.HOLD),     # queue full and ahead of real time: hold
])
def test_lag_policy(backlog_s: float, full: bool, received_s: float, elapsed_s: float,
                    action: LagAction) -> None:
    policy = LagPolicy(max_lag_s=1.5)
    assert policy.decide(backlog_samples=int(backlog_s * 16000), full=full,
                         received_samples=int(received_s * 16000), elapsed_s=elapsed_s) is action
    assert policy.lagging(int(1.6 * 16000)) and not policy.lagging(int(1.4 * 16000))


# --- the latest-only slot ------------------------------------------------------------------------


async def test_latest_slot_keeps_only_the_newest_item(autojump_clock: trio.testing.MockClock) -> None:
    slot: LatestSlot[int] = LatestSlot()
    slot.put(1)
    slot.put(2)  # replaces 1, which nobody took
    with trio.fail_after(HANG_S):
        assert await slot.take() == 2
        taken: list[int] = []

        async def taker() -> None:
            taken.append(await slot.take())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(taker)
            await trio.testing.wait_all_tasks_blocked()
            assert taken == []  # empty: it waits
            slot.put(3)
        assert taken == [3]
        with slot:
            slot.put(4)
        assert await slot.take() == 4  # closing keeps what was offered
        with pytest.raises(trio.EndOfChannel):
            await slot.take()
        with pytest.raises(trio.ClosedResourceError):
            slot.put(5)
