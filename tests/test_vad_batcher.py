"""`VadBatcher`: many sessions' Silero calls scored in shared runs off the event loop, with the
real model and real worker threads (so the real clock, under an outer deadline)."""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import pytest
import trio

from sttd.audio import float32_to_pcm16
from sttd.engine import VadBatcher
from sttd.errors import BackendError
from sttd.vad import (Endpointer, NetCall, SileroModel, SpeechStart, VadSteps, make_endpointer,
                      silero_model)
from tests.conftest import load_pcm, silence

FRAME = 512
_T = TypeVar("_T")


def _streams(count: int) -> list[np.ndarray]:
    """`count` different stretches of real speech (and noise), 2 s each."""
    speech = np.concatenate([load_pcm("ps_librivox_0880"), load_pcm("ps_goforward"),
                             load_pcm("ps_librivox_0930")])
    rng = np.random.default_rng(3)
    out = []
    for i in range(count):
        start = (i * 7919) % (speech.size - 32000)
        noise = float32_to_pcm16(rng.standard_normal(32000).astype(np.float32) * 0.01)
        out.append((speech[start : start + 32000].astype(np.int32) + noise).clip(
            -32768, 32767).astype(np.int16))
    return out


def _endpointer(model: SileroModel) -> Endpointer:
    return make_endpointer("silero", threshold_rms=300.0, silence_ms=500, net=model.stream())


async def test_batched_probabilities_and_events_are_those_of_one_call_at_a_time(
        nursery: trio.Nursery) -> None:
    model = silero_model()
    batcher = VadBatcher(model)
    await nursery.start(batcher.run)
    audio = _streams(6)
    alone = [_endpointer(model) for _ in audio]
    together = [_endpointer(model) for _ in audio]
    expected = [[e.feed(a[i : i + 320]) for i in range(0, a.size, 320)]
                for e, a in zip(alone, audio)]
    got: list[list[object]] = [[] for _ in audio]

    async def stream(index: int) -> None:
        for i in range(0, audio[index].size, 320):  # 20 ms frames, as clients send them
            got[index].append(await batcher.drive(together[index].feed_steps(
                audio[index][i : i + 320])))

    with trio.fail_after(60):
        async with trio.open_nursery() as sessions:
            for index in range(len(audio)):
                sessions.start_soon(stream, index)
    assert got == expected
    assert any(events for per_stream in got for events in per_stream)  # speech was found
    stats = batcher.statistics()
    # Each window scored once, and sessions feeding together shared runs.
    windows = sum(a.size // FRAME for a in audio)
    assert stats.windows <= windows
    assert stats.runs < stats.windows


async def test_probabilities_match_the_net_called_alone() -> None:
    """Calls of one to five consecutive windows scored together: each window's probability is
    the one the net gives it alone, window after window."""
    model = silero_model()
    audio = [float32_to_pcm16(np.sin(np.arange(FRAME * 5) * (0.05 + 0.01 * i)).astype(
        np.float32) * 0.3) for i in range(5)]
    alone = [model.stream() for _ in audio]
    batched = [model.stream() for _ in audio]
    for _ in range(3):  # the state carries on identically
        calls = [NetCall(stream, (a[: FRAME * (i + 1)].astype(np.float32) / 32768).data)
                 for i, (stream, a) in enumerate(zip(batched, audio))]
        one = [[stream.process(call.window(w)) for w in range(call.windows)]
               for stream, call in zip(alone, calls)]
        many = model.score(calls)
        assert [len(answer) for answer in many] == [1, 2, 3, 4, 5]
        for got, expected in zip(many, one):
            assert got == pytest.approx(expected, abs=1e-5)


async def test_a_session_going_away_withdraws_its_waiting_call(nursery: trio.Nursery) -> None:
    model = silero_model()
    batcher = VadBatcher(model)  # not running: calls wait
    endpointer = _endpointer(model)
    loud = load_pcm("ps_goforward")[:FRAME * 4]
    with trio.move_on_after(0.05):
        await batcher.drive(endpointer.feed_steps(loud))
    assert batcher._queue == []
    await nursery.start(batcher.run)
    with trio.fail_after(30):
        await batcher.drive(_endpointer(model).feed_steps(loud))
    assert batcher.statistics().runs >= 1


async def test_a_failed_run_fails_its_calls_and_the_batcher_goes_on(
        nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch) -> None:
    model = SileroModel()
    batcher = VadBatcher(model)
    await nursery.start(batcher.run)
    loud = load_pcm("ps_goforward")[:FRAME * 4]
    real = model.score

    def broken(calls: object) -> list[list[float]]:
        raise RuntimeError("onnxruntime fell over")

    def short(calls: list[NetCall]) -> list[list[float]]:
        return [answer[1:] for answer in real(calls)]  # a wrong answer: one score missing

    monkeypatch.setattr(model, "score", broken)
    with trio.fail_after(30), pytest.raises(BackendError, match="the VAD net failed"):
        await batcher.drive(_endpointer(model).feed_steps(loud))
    monkeypatch.setattr(model, "score", short)
    with trio.fail_after(30), pytest.raises(BackendError, match="3 scores for 4 windows"):
        await batcher.drive(_endpointer(model).feed_steps(loud))
    assert batcher.statistics().windows == 0  # no failed run counted
    monkeypatch.setattr(model, "score", real)
    with trio.fail_after(30):
        await batcher.drive(_endpointer(model).feed_steps(np.concatenate([loud, silence(1.0)])))
    assert batcher.statistics().windows > 0  # the batcher went on scoring


def _recording(steps: VadSteps[_T], windows: list[int]) -> VadSteps[_T]:
    """`steps`, noting how many windows each of its net calls holds."""
    try:
        call = next(steps)
        while True:
            windows.append(call.windows)
            call = steps.send((yield call))
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


async def test_a_long_frame_asks_the_net_once_per_run_of_windows(nursery: trio.Nursery) -> None:
    """A 200 ms frame's windows go to the net in one call (a window that skips the net, and so
    resets it, splits the call), with the events of one window at a time."""
    model = silero_model()
    batcher = VadBatcher(model)
    await nursery.start(batcher.run)
    audio = _streams(1)[0]
    audio[10200:10800] = 0  # window 20 (samples 10240-10752), mid-frame: no net, a reset
    alone = _endpointer(model)
    expected = [event for i in range(0, audio.size, FRAME) for event in alone.feed(
        audio[i : i + FRAME])]
    together = _endpointer(model)
    got: list[object] = []
    windows: list[int] = []
    with trio.fail_after(30):
        for i in range(0, audio.size, 3200):
            got += await batcher.drive(_recording(together.feed_steps(audio[i : i + 3200]),
                                                  windows))
    assert got == expected
    assert any(isinstance(event, SpeechStart) for event in got)
    assert sum(windows) == audio.size // FRAME - 1  # every window but the silent one
    assert max(windows) >= 6  # a whole 200 ms frame in one call
    assert len(windows) == audio.size // 3200 + 1  # one call a frame, two for the split one


async def test_a_big_frame_goes_to_the_net_a_part_at_a_time(nursery: trio.Nursery) -> None:
    """A call of many windows (a client's 10 s frame) is scored at most 16 windows a run, in
    order, with the answers the net gives it window after window; another session's call
    that comes meanwhile is answered after a part's run, not after the whole frame."""
    model = silero_model()
    batcher = VadBatcher(model)
    await nursery.start(batcher.run)
    big = np.concatenate(_streams(5)).astype(np.float32) / 32768  # 10 s: 312 windows
    windows = big.size // FRAME
    alone = model.stream()
    expected = [alone.process(big[i * FRAME : (i + 1) * FRAME].data) for i in range(windows)]
    small = _streams(1)[0][:FRAME].astype(np.float32) / 32768
    order: list[str] = []
    answers: dict[str, list[float]] = {}

    async def ask(name: str, call: NetCall) -> None:
        answers[name] = await batcher.drive(_one_call(call))
        order.append(name)

    with trio.fail_after(30):
        async with trio.open_nursery() as callers:
            callers.start_soon(ask, "big", NetCall(model.stream(), big.data))
            await trio.sleep(0)  # the big call's first part is queued first
            callers.start_soon(ask, "small", NetCall(model.stream(), small.data))
    assert order == ["small", "big"]
    assert answers["big"] == pytest.approx(expected, abs=1e-5)
    assert len(answers["small"]) == 1
    # 312 windows: 20 parts (19 of 16, one of 8), each a run of its own; the small call in
    # one of them or alone.
    assert batcher.statistics().runs in (20, 21)
    assert batcher.statistics().windows == windows + 1


def _one_call(call: NetCall) -> VadSteps[list[float]]:
    return (yield call)


async def test_a_batcher_that_stops_fails_the_calls_it_holds() -> None:
    # A session feeding its core waits on its call shielded (sttd.nursery): a batcher cancelled
    # with calls queued must answer them, or those sessions would never end.
    model = silero_model()
    batcher = VadBatcher(model)
    line = (np.random.default_rng(0).normal(0, 0.01, FRAME * 3).astype(np.float32)).data
    failed: list[BaseException] = []

    def one_call() -> VadSteps[list[float]]:
        return (yield NetCall(model.stream(), line))

    async def shielded_call() -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(5):  # 5 s: never answered
            try:
                await batcher.drive(one_call())
            except BackendError as exc:
                failed.append(exc)

    with trio.fail_after(10):
        async with trio.open_nursery() as outer:
            outer.start_soon(shielded_call)
            await trio.testing.wait_all_tasks_blocked()  # queued, with no batcher running
            async with trio.open_nursery() as server:
                server.start_soon(batcher.run)
                server.cancel_scope.cancel()  # stopped before it ran the call
    assert len(failed) == 1 and "the VAD batcher stopped" in str(failed[0].__cause__)


async def test_a_shielded_drive_goes_on_through_a_cancel(nursery: trio.Nursery) -> None:
    # How a session's receive task feeds its core (sttd.nursery): a drain must not stop the
    # core halfway through a frame. The cancel reaches the caller at its next checkpoint.
    model = silero_model()
    batcher = VadBatcher(model)
    await nursery.start(batcher.run)
    line = (np.random.default_rng(0).normal(0, 0.01, FRAME * 3).astype(np.float32)).data
    alone = NetCall(model.stream(), line).score()
    stream = model.stream()

    def one_call() -> VadSteps[list[float]]:
        return (yield NetCall(stream, line))

    got: list[list[float]] = []
    with trio.fail_after(10), trio.CancelScope() as scope:
        scope.cancel()
        got.append(await batcher.drive(one_call(), shielded=True))
        await trio.lowlevel.checkpoint()
        got.append([])  # not reached: the cancel took effect here
    assert scope.cancelled_caught
    assert got == [alone]
