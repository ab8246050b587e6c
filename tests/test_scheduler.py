"""The cross-session scheduler against a fake batch runner, on trio's MockClock."""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import numpy as np
import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry

from sttd.backends.base import Request, Result
from sttd.errors import BackendError, InferenceTimeout
from sttd.metrics import Metrics
from sttd.scheduler import Priority, Scheduler, Superseded


@attrs.define
class FakeRunner:
    """Runs a batch in `seconds` of (mock) time; requests are labelled by their first hotword."""

    seconds: float = 0.1
    per_request_s: float = 0.0
    batches: list[list[str]] = attrs.field(factory=list)
    starts: list[float] = attrs.field(factory=list)
    poison: str | None = None

    async def __call__(self, requests: Sequence[Request]) -> list[Result]:
        labels = [r.hotwords[0] for r in requests]
        self.batches.append(labels)
        self.starts.append(trio.current_time())
        await trio.sleep(self.seconds + self.per_request_s * len(requests))
        if self.poison in labels:
            raise BackendError(f"{self.poison} broke the model")
        return [Result(text=label) for label in labels]


def _request(label: str, kind: str = "final") -> Request:
    return Request(np.zeros(1600, np.float32), kind=kind, hotwords=(label,))  # type: ignore[arg-type]


@attrs.define
class Harness:
    scheduler: Scheduler
    runner: FakeRunner
    metrics: Metrics
    results: dict[str, str | BaseException] = attrs.field(factory=dict)

    async def submit(self, label: str, kind: str = "final", session: object = None,
                     priority: Priority | None = None) -> None:
        try:
            result = await self.scheduler.submit(
                _request(label, kind), session=session if session is not None else label,
                priority=priority)
        except (Superseded, BackendError) as exc:
            self.results[label] = exc
        else:
            self.results[label] = result.text


@pytest.fixture
async def harness(nursery: trio.Nursery) -> Harness:
    metrics = Metrics.create(CollectorRegistry())
    runner = FakeRunner()
    scheduler = Scheduler(runner, metrics, max_batch=4, window_s=0.005, max_final_wait_s=1.0)
    await nursery.start(scheduler.run)
    return Harness(scheduler, runner, metrics)


def _count(metrics: Metrics, kind: str, outcome: str) -> float:
    return metrics.scheduler_requests_total.labels(kind, outcome)._value.get()  # type: ignore[no-any-return]


async def test_requests_arriving_together_share_one_call(
        harness: Harness, autojump_clock: trio.abc.Clock) -> None:
    async with trio.open_nursery() as nursery:
        for label in "abc":
            nursery.start_soon(harness.submit, label)
    assert [sorted(batch) for batch in harness.runner.batches] == [["a", "b", "c"]]
    assert harness.results == {"a": "a", "b": "b", "c": "c"}
    assert harness.metrics.scheduler_batch_size._sum.get() == 3


async def test_window_lets_a_late_request_join(harness: Harness,
                                              autojump_clock: trio.abc.Clock) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(harness.submit, "a")
        await trio.sleep(0.003)  # inside the 5 ms window
        nursery.start_soon(harness.submit, "b")
        await trio.sleep(0.05)  # after the window closed: the next batch
        nursery.start_soon(harness.submit, "c")
    assert harness.runner.batches == [["a", "b"], ["c"]]


async def test_batches_are_capped(harness: Harness, autojump_clock: trio.abc.Clock) -> None:
    async with trio.open_nursery() as nursery:
        for label in "abcdefghij":
            nursery.start_soon(harness.submit, label)
    assert [len(batch) for batch in harness.runner.batches] == [4, 4, 2]
    assert len(harness.results) == 10


async def test_finals_go_before_partials_before_files(
        harness: Harness, autojump_clock: trio.abc.Clock) -> None:
    harness.runner.seconds = 1.0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(harness.submit, "busy")
        await trio.sleep(0.01)  # past the batching window: "busy" runs, the rest queues
        nursery.start_soon(harness.submit, "file1", "final", None, Priority.FILE)
        nursery.start_soon(harness.submit, "p1", "partial")
        nursery.start_soon(harness.submit, "f1")
        nursery.start_soon(harness.submit, "p2", "partial")
        nursery.start_soon(harness.submit, "f2")
        nursery.start_soon(harness.submit, "file2", "final", None, Priority.FILE)
    # One class per batch, so finals never wait for partials riding in their call; tasks
    # started together queue in any order, hence the sorting.
    assert [sorted(batch) for batch in harness.runner.batches] == [
        ["busy"], ["f1", "f2"], ["p1", "p2"], ["file1", "file2"]]


async def test_a_newer_partial_supersedes_the_queued_one(
        harness: Harness, autojump_clock: trio.abc.Clock) -> None:
    harness.runner.seconds = 1.0
    session = object()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(harness.submit, "busy")
        await trio.sleep(0.01)  # past the batching window: "busy" runs, the rest queues
        nursery.start_soon(harness.submit, "old", "partial", session)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(harness.submit, "new", "partial", session)
        nursery.start_soon(harness.submit, "other", "partial", object())
    assert isinstance(harness.results["old"], Superseded)
    assert harness.results["new"] == "new"
    assert [sorted(batch) for batch in harness.runner.batches] == [["busy"], ["new", "other"]]
    assert _count(harness.metrics, "partial", "superseded") == 1


async def test_a_started_partial_is_not_superseded(
        harness: Harness, autojump_clock: trio.abc.Clock) -> None:
    session = object()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(harness.submit, "first", "partial", session)
        await trio.sleep(0.01)  # its batch has started
        nursery.start_soon(harness.submit, "second", "partial", session)
    assert harness.results == {"first": "first", "second": "second"}


async def test_cancelled_waiter_withdraws_its_request(
        harness: Harness, autojump_clock: trio.abc.Clock) -> None:
    harness.runner.seconds = 1.0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(harness.submit, "busy")
        await trio.sleep(0.01)  # past the batching window: "busy" runs, the rest queues
        with trio.CancelScope() as scope:
            scope.cancel()
            await harness.submit("gone")
        nursery.start_soon(harness.submit, "kept")
    assert "gone" not in harness.results
    assert harness.runner.batches == [["busy"], ["kept"]]
    assert _count(harness.metrics, "final", "withdrawn") == 1


async def test_a_failing_request_fails_only_itself(
        harness: Harness, autojump_clock: trio.abc.Clock) -> None:
    harness.runner.poison = "bad"
    with trio.fail_after(60):  # virtual seconds: a waiter left hanging fails fast
        async with trio.open_nursery() as nursery:
            for label in ("a", "bad", "c"):
                nursery.start_soon(harness.submit, label)
    assert isinstance(harness.results["bad"], BackendError)
    assert harness.results["a"] == "a"
    assert harness.results["c"] == "c"
    first, *singles = harness.runner.batches
    assert sorted(first) == ["a", "bad", "c"]
    assert sorted(singles) == [["a"], ["bad"], ["c"]]
    assert _count(harness.metrics, "final", "failed") == 1
    assert _count(harness.metrics, "final", "ok") == 2


async def test_one_busy_session_cannot_crowd_out_another(
        harness: Harness, autojump_clock: trio.abc.Clock) -> None:
    harness.runner.seconds = 1.0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(harness.submit, "busy")
        await trio.sleep(0.01)  # past the batching window: "busy" runs, the rest queues
        # Session x floods file work; session y then asks for one final.
        for n in range(12):
            nursery.start_soon(harness.submit, f"x{n}", "final", ("x", n), Priority.FILE)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(harness.submit, "y", "final", "y")
    assert harness.runner.batches[1][0] == "y"


async def test_overload_is_reported_while_finals_wait_and_clears_after(
        harness: Harness, autojump_clock: trio.abc.Clock) -> None:
    harness.runner.seconds = 2.0  # each batch of 4 takes 2 s: 20 finals wait up to 8 s
    async with trio.open_nursery() as nursery:
        for n in range(20):
            nursery.start_soon(harness.submit, f"f{n}")
    assert harness.scheduler.overloaded() is True
    harness.runner.seconds = 0.01
    for n in range(20):  # light traffic: the average wait decays
        await harness.submit(f"p{n}", "partial")
    assert harness.scheduler.overloaded() is False
    assert harness.scheduler.statistics().pending_finals == 0


async def test_partial_batches_are_cut_to_the_time_budget(
        harness: Harness, autojump_clock: trio.abc.Clock) -> None:
    harness.runner.seconds = 0.0
    harness.runner.per_request_s = 0.1  # the budget is 0.25 s: two partials per call
    await harness.submit("warm-up", "partial")  # teaches the scheduler what a partial costs
    async with trio.open_nursery() as nursery:
        for n in range(6):
            nursery.start_soon(harness.submit, f"p{n}", "partial")
        for n in range(6):
            nursery.start_soon(harness.submit, f"f{n}")
    sizes = [(batch[0][0], len(batch)) for batch in harness.runner.batches[1:]]
    assert sizes == [("f", 4), ("f", 2), ("p", 2), ("p", 2), ("p", 2)]


async def test_file_batches_are_cut_only_while_live_streams_exist(
        harness: Harness, autojump_clock: trio.abc.Clock) -> None:
    harness.runner.seconds = 0.0
    harness.runner.per_request_s = 0.1
    live = [1]
    harness.scheduler.live_streams = lambda: live[0]

    async def files(prefix: str) -> None:
        async with trio.open_nursery() as nursery:
            for n in range(4):
                nursery.start_soon(harness.submit, f"{prefix}{n}", "final", (prefix, n),
                                   Priority.FILE)

    await files("w")  # learns the cost; with a live stream: 2 per call
    await files("a")
    live[0] = 0
    await files("b")  # nobody to protect: one call
    sizes = [len(batch) for batch in harness.runner.batches]
    assert sizes[-3:] == [2, 2, 4]


async def test_overload_fades_when_traffic_stops(harness: Harness,
                                                autojump_clock: trio.abc.Clock) -> None:
    harness.runner.seconds = 2.0
    async with trio.open_nursery() as nursery:
        for n in range(20):
            nursery.start_soon(harness.submit, f"f{n}")
    assert harness.scheduler.overloaded() is True
    await trio.sleep(30)  # nothing at all arrives: no batch runs to lower the average
    assert harness.scheduler.overloaded() is False


async def test_partials_keep_to_their_share_and_finals_do_not_wait_for_it(
        harness: Harness, autojump_clock: trio.abc.Clock) -> None:
    harness.runner.seconds = 0.2  # share 0.5: after a 0.2 s partial batch, 0.2 s pause
    await harness.submit("p0", "partial")
    ended = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(harness.submit, "p1", "partial")
        await trio.sleep(0.05)
        nursery.start_soon(harness.submit, "f0")  # in the pause: starts at once
    assert harness.runner.batches[1:] == [["f0"], ["p1"]]
    assert harness.runner.starts[1] - ended == pytest.approx(0.05 + 0.005)
    # p1 waited for the pause after p0; the final's batch is not background and sets none.
    assert harness.runner.starts[2] >= ended + 0.2
    assert harness.results == {"p0": "p0", "p1": "p1", "f0": "f0"}


async def test_a_full_share_never_pauses(autojump_clock: trio.abc.Clock,
                                         nursery: trio.Nursery) -> None:
    runner = FakeRunner(seconds=0.2)
    scheduler = Scheduler(runner, Metrics.create(CollectorRegistry()), window_s=0.0,
                          background_share=1.0)
    await nursery.start(scheduler.run)
    for n in range(3):
        await scheduler.submit(_request(f"p{n}", "partial"), session="s")
    assert runner.starts == pytest.approx([0.0, 0.2, 0.4])


async def test_files_are_paced_only_while_live_streams_exist(
        harness: Harness, autojump_clock: trio.abc.Clock) -> None:
    harness.runner.seconds = 0.2
    live = [0]
    harness.scheduler.live_streams = lambda: live[0]
    for n in range(2):
        await harness.submit(f"a{n}", "final", ("a", n), Priority.FILE)
    live[0] = 1
    for n in range(2):
        await harness.submit(f"b{n}", "final", ("b", n), Priority.FILE)
    gaps = [later - earlier for earlier, later in zip(harness.runner.starts, harness.runner.starts[1:])]
    # no live stream: back to back (plus the gather window); then paused by the share
    assert gaps[0] == pytest.approx(0.205)
    assert gaps[2] == pytest.approx(0.2 + 0.2 + 0.005)


async def test_a_stuck_call_times_out_its_requests_and_marks_the_engine_degraded(
        autojump_clock: trio.abc.Clock, nursery: trio.Nursery) -> None:
    runner = FakeRunner(seconds=100.0)
    metrics = Metrics.create(CollectorRegistry())
    scheduler = Scheduler(runner, metrics, window_s=0.0, request_timeout_s=30.0)
    await nursery.start(scheduler.run)
    outcomes: dict[str, float] = {}

    async def submit(label: str) -> None:
        with pytest.raises(InferenceTimeout, match="STT_INFERENCE_TIMEOUT_S=30"):
            await scheduler.submit(_request(label), session=label)
        outcomes[label] = trio.current_time()

    nursery.start_soon(submit, "stuck")
    await trio.sleep(10)
    nursery.start_soon(submit, "queued")  # waits behind the stuck call
    await trio.sleep(15)
    assert scheduler.degraded() is None  # 25 s into the call
    await trio.sleep(10)
    reason = scheduler.degraded()
    assert reason is not None and "running for 35 s" in reason
    await trio.sleep(10)
    assert outcomes == {"stuck": pytest.approx(30.0), "queued": pytest.approx(40.0)}
    assert scheduler.statistics().pending_finals == 0  # the queued one was withdrawn
    await trio.sleep(60)  # the stuck call ends at 100 s
    assert scheduler.degraded() is None
    assert runner.batches == [["stuck"]]
    assert _count(metrics, "final", "timeout") == 2


async def test_with_two_lanes_a_final_runs_beside_a_partial_batch(
        autojump_clock: trio.abc.Clock, nursery: trio.Nursery) -> None:
    runner = FakeRunner(seconds=1.0)
    scheduler = Scheduler(runner, Metrics.create(CollectorRegistry()), window_s=0.0, lanes=2,
                          background_share=1.0)
    await nursery.start(scheduler.run)

    async def submit(label: str, kind: str, at: float) -> None:
        await trio.sleep(at)
        await scheduler.submit(_request(label, kind), session=label)

    async with trio.open_nursery() as jobs:
        jobs.start_soon(submit, "p0", "partial", 0.0)
        jobs.start_soon(submit, "p1", "partial", 0.1)  # background lane busy: waits for p0
        jobs.start_soon(submit, "f0", "final", 0.2)  # the free lane: starts at once
        jobs.start_soon(submit, "f1", "final", 0.3)  # both lanes busy: the first free one
    starts = dict(zip([batch[0] for batch in runner.batches], runner.starts, strict=True))
    # p0's lane frees at 1.0 and goes to the final; p1 gets f0's lane when it frees at 1.2.
    assert starts == pytest.approx({"p0": 0.0, "f0": 0.2, "f1": 1.0, "p1": 1.2})
