"""The cross-session scheduler against a fake batch runner, on trio's MockClock; and the engine
around it, against fake backends (real worker threads, so the real clock)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np
import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry

from sttd.backends.base import ASRBackend, BatchPartlyFailed, Request, Result
from sttd.engine import Engine, LiveStreams, Priority, Scheduler, SchedulerConfig
from sttd.errors import BackendError, InferenceTimeout
from sttd.metrics import Metrics
from sttd.settings import Settings


@attrs.define
class FakeRunner:
    """Runs a batch in `seconds` of (mock) time; requests are labelled by their first hotword."""

    seconds: float = 0.1
    per_request_s: float = 0.0
    batches: list[list[str]] = attrs.field(factory=list)
    starts: list[float] = attrs.field(factory=list)
    poison: str | None = None  # fails the call it is in, as a backend would
    lone: str | None = None  # fails alone, its batch-mates answered (BatchPartlyFailed)
    bug: str | None = None  # breaks the runner itself (not a BackendError)
    short: bool = False  # returns one result too few

    async def __call__(self, requests: Sequence[Request]) -> list[Result]:
        labels = [r.hotwords[0] for r in requests]
        self.batches.append(labels)
        self.starts.append(trio.current_time())
        await trio.sleep(self.seconds + self.per_request_s * len(requests))
        if self.poison in labels:
            raise BackendError(f"{self.poison} broke the model")
        if self.bug in labels:
            raise RuntimeError(f"{self.bug} found a bug")
        if self.lone in labels and len(labels) > 1:
            raise BatchPartlyFailed([BackendError(f"{label} alone failed") if label == self.lone
                                     else Result(text=label) for label in labels])
        return [Result(text=label) for label in labels][: -1 if self.short else None]


def _request(label: str, kind: str = "final") -> Request:
    return Request(np.zeros(1600, np.float32), kind=kind, hotwords=(label,))  # type: ignore[arg-type]


def _config(*, lanes: int = 1, **settings: Any) -> SchedulerConfig:
    """The scheduler's config from `Settings` defaults, with `settings` overriding them."""
    return SchedulerConfig.from_settings(Settings(**settings), lanes=lanes)


def _scheduler(runner: FakeRunner, metrics: Metrics | None = None, *,
               live_streams: LiveStreams | None = None, lanes: int = 1,
               **settings: Any) -> Scheduler:
    return Scheduler(runner, _config(lanes=lanes, **settings),
                     metrics or Metrics.create(CollectorRegistry()),
                     live_streams if live_streams is not None else LiveStreams())


@attrs.define
class Harness:
    scheduler: Scheduler
    runner: FakeRunner
    metrics: Metrics
    live: LiveStreams
    results: dict[str, str | BaseException] = attrs.field(factory=dict)

    async def submit(self, label: str, kind: str = "final",
                     priority: Priority | None = None) -> None:
        try:
            result = await self.scheduler.submit(_request(label, kind), priority=priority)
        except BackendError as exc:
            self.results[label] = exc
        else:
            self.results[label] = result.text


@pytest.fixture
async def harness(nursery: trio.Nursery) -> Harness:
    metrics = Metrics.create(CollectorRegistry())
    runner = FakeRunner()
    live = LiveStreams()
    # Batches of 4, and 250 ms of work in a background batch; the Settings defaults otherwise:
    # a 5 ms window, max_final_wait_s 1.0, background_share 0.5, inference_timeout_s 30.
    scheduler = _scheduler(runner, metrics, live_streams=live, max_inference_batch_size=4,
                           max_batch_ms=250.0)
    await nursery.start(scheduler.run)
    return Harness(scheduler, runner, metrics, live)


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
        nursery.start_soon(harness.submit, "file1", "final", Priority.FILE)
        nursery.start_soon(harness.submit, "p1", "partial")
        nursery.start_soon(harness.submit, "f1")
        nursery.start_soon(harness.submit, "p2", "partial")
        nursery.start_soon(harness.submit, "f2")
        nursery.start_soon(harness.submit, "file2", "final", Priority.FILE)
    # One class per batch, so finals never wait for partials riding in their call; tasks
    # started together queue in any order, hence the sorting.
    assert [sorted(batch) for batch in harness.runner.batches] == [
        ["busy"], ["f1", "f2"], ["p1", "p2"], ["file1", "file2"]]


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


async def test_a_backend_that_tells_which_request_failed_is_not_retried(
        harness: Harness, autojump_clock: trio.abc.Clock) -> None:
    harness.runner.lone = "bad"
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for label in ("a", "bad", "c"):
                nursery.start_soon(harness.submit, label)
    assert (harness.results["a"], harness.results["c"]) == ("a", "c")
    assert str(harness.results["bad"]) == "bad alone failed"
    assert len(harness.runner.batches) == 1  # each request had its outcome: no second call
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
            nursery.start_soon(harness.submit, f"x{n}", "final", Priority.FILE)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(harness.submit, "y", "final")
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

    async def files(prefix: str) -> None:
        async with trio.open_nursery() as nursery:
            for n in range(4):
                nursery.start_soon(harness.submit, f"{prefix}{n}", "final", Priority.FILE)

    with harness.live.counting():
        await files("w")  # learns the cost; with a live stream: 2 per call
        await files("a")
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


@pytest.mark.parametrize(("lanes", "share", "pause_s"), [(1, 0.5, 0.2), (2, 0.5, 0.0),
                                                       (2, 0.25, 0.2), (4, 0.5, 0.0)])
async def test_the_share_is_of_every_lane(lanes: int, share: float, pause_s: float,
                                          autojump_clock: trio.abc.Clock,
                                          nursery: trio.Nursery) -> None:
    """One lane of two busy with partials is half the engine: share 0.5 needs no pause."""
    runner = FakeRunner(seconds=0.2)
    scheduler = _scheduler(runner, lanes=lanes, batch_window_ms=0.0, background_share=share)
    await nursery.start(scheduler.run)
    await scheduler.submit(_request("p0", "partial"))
    await scheduler.submit(_request("p1", "partial"))
    assert runner.starts[1] - runner.starts[0] == pytest.approx(0.2 + pause_s)


async def test_a_full_share_never_pauses(autojump_clock: trio.abc.Clock,
                                         nursery: trio.Nursery) -> None:
    runner = FakeRunner(seconds=0.2)
    scheduler = _scheduler(runner, batch_window_ms=0.0, background_share=1.0)
    await nursery.start(scheduler.run)
    for n in range(3):
        await scheduler.submit(_request(f"p{n}", "partial"))
    assert runner.starts == pytest.approx([0.0, 0.2, 0.4])


async def test_files_are_paced_only_while_live_streams_exist(
        harness: Harness, autojump_clock: trio.abc.Clock) -> None:
    harness.runner.seconds = 0.2
    for n in range(2):
        await harness.submit(f"a{n}", "final", Priority.FILE)
    with harness.live.counting():
        for n in range(2):
            await harness.submit(f"b{n}", "final", Priority.FILE)
    gaps = [later - earlier for earlier, later in zip(harness.runner.starts, harness.runner.starts[1:])]
    # no live stream: back to back (plus the gather window); then paused by the share
    assert gaps[0] == pytest.approx(0.205)
    assert gaps[2] == pytest.approx(0.2 + 0.2 + 0.005)


async def test_a_stuck_call_times_out_its_requests_and_marks_the_engine_degraded(
        autojump_clock: trio.abc.Clock, nursery: trio.Nursery) -> None:
    runner = FakeRunner(seconds=100.0)
    metrics = Metrics.create(CollectorRegistry())
    scheduler = _scheduler(runner, metrics, batch_window_ms=0.0, inference_timeout_s=30.0)
    await nursery.start(scheduler.run)
    outcomes: dict[str, float] = {}

    async def submit(label: str) -> None:
        with pytest.raises(InferenceTimeout, match="STT_INFERENCE_TIMEOUT_S=30"):
            await scheduler.submit(_request(label))
        outcomes[label] = trio.current_time()

    nursery.start_soon(submit, "stuck")
    await trio.sleep(10)
    nursery.start_soon(submit, "queued")  # waits behind the stuck call
    await trio.sleep(15)
    assert scheduler.degraded() is None  # 25 s into the call
    await trio.sleep(10)
    reason = scheduler.degraded()
    assert reason is not None and "for 35 s" in reason
    await trio.sleep(10)
    assert outcomes == {"stuck": pytest.approx(30.0), "queued": pytest.approx(40.0)}
    assert scheduler.statistics().pending_finals == 0  # the queued one was withdrawn
    await trio.sleep(60)  # the stuck call ends at 100 s
    assert scheduler.degraded() is None
    assert runner.batches == [["stuck"]]
    assert _count(metrics, "final", "timeout") == 2
    assert _count(metrics, "final", "withdrawn") == 0  # a timeout is counted once, as one
    assert _count(metrics, "final", "ok") == 0  # not again when the stuck call came back


async def test_with_two_lanes_a_final_runs_beside_a_partial_batch(
        autojump_clock: trio.abc.Clock, nursery: trio.Nursery) -> None:
    runner = FakeRunner(seconds=1.0)
    scheduler = _scheduler(runner, lanes=2, batch_window_ms=0.0, background_share=1.0)
    await nursery.start(scheduler.run)

    async def submit(label: str, kind: str, at: float) -> None:
        await trio.sleep(at)
        await scheduler.submit(_request(label, kind))

    async with trio.open_nursery() as jobs:
        jobs.start_soon(submit, "p0", "partial", 0.0)
        jobs.start_soon(submit, "p1", "partial", 0.1)  # background lane busy: waits for p0
        jobs.start_soon(submit, "f0", "final", 0.2)  # the free lane: starts at once
        jobs.start_soon(submit, "f1", "final", 0.3)  # both lanes busy: the first free one
    starts = dict(zip([batch[0] for batch in runner.batches], runner.starts, strict=True))
    # p0's lane frees at 1.0 and goes to the final; p1 gets f0's lane when it frees at 1.2.
    assert starts == pytest.approx({"p0": 0.0, "f0": 0.2, "f1": 1.0, "p1": 1.2})


@pytest.mark.parametrize(("bug", "message"), [
    ("raises", "RuntimeError('x found a bug')"),
    ("short", "ValueError('zip() argument 2 is shorter than argument 1')"),
])
async def test_a_bug_in_a_lane_fails_its_batch_and_not_the_scheduler(
        harness: Harness, autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture,
        bug: str, message: str) -> None:
    if bug == "raises":
        harness.runner.bug = "x"
    else:
        harness.runner.short = True
    with trio.fail_after(60):  # virtual seconds: a waiter left hanging fails fast
        async with trio.open_nursery() as nursery:
            for label in ("a", "x", "c"):
                nursery.start_soon(harness.submit, label)
        harness.runner.bug, harness.runner.short = None, False
        await harness.submit("after")  # the scheduler still runs
    errors = [harness.results[label] for label in ("a", "x", "c")]
    expected = f"the scheduler failed running this request's batch: {message}"
    assert [(type(error), str(error)) for error in errors] == [(BackendError, expected)] * 3
    assert len({id(error) for error in errors}) == 3  # each waiter raises its own
    assert harness.results["after"] == "after"
    first, later = harness.runner.batches
    assert (sorted(first), later) == (["a", "c", "x"], ["after"])  # a bug is not retried
    assert _count(harness.metrics, "final", "failed") == 3
    [record] = [r for r in caplog.records if r.name == "sttd.engine._scheduler"]
    assert (record.levelno, record.getMessage()) == (logging.ERROR,
                                                     "scheduler.failed kind=final size=3")
    assert record.exc_info is not None
    assert type(record.exc_info[1]) is (RuntimeError if bug == "raises" else ValueError)


async def test_cancelling_the_scheduler_is_not_a_failure_of_its_batch(
        autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture) -> None:
    scheduler = _scheduler(FakeRunner(seconds=10.0), batch_window_ms=0.0,
                           inference_timeout_s=30.0)
    outcome: list[BaseException] = []

    async def wait() -> None:
        try:
            await scheduler.submit(_request("a"))
        except BackendError as exc:
            outcome.append(exc)

    with trio.fail_after(60):  # virtual seconds
        async with trio.open_nursery() as waiters:
            async with trio.open_nursery() as engine:
                await engine.start(scheduler.run)
                waiters.start_soon(wait)
                await trio.sleep(1)  # the batch is in flight
                engine.cancel_scope.cancel()
    # Cancelled went through the lane: the waiter was not told the scheduler failed; it waited
    # out its timeout like any request whose engine stopped.
    assert [type(error) for error in outcome] == [InferenceTimeout]
    assert not [r for r in caplog.records if r.name == "sttd.engine._scheduler"]


# --- the engine around the scheduler ---------------------------------------------------------


@attrs.define
class FakeBackend(ASRBackend):
    """Answers each request with its first hotword; one starting with "bad" fails its call."""

    trouble: str | None = None
    # Two calls must be in flight at once to pass, where set.
    together: threading.Barrier | None = None
    closed_in: list[str] = attrs.field(factory=list)  # the threads close ran in

    @property
    def name(self) -> str:
        return "fake"

    def check_language(self, language: str | None) -> None:
        return None

    def transcribe(self, requests: Sequence[Request]) -> list[Result]:
        labels = [r.hotwords[0] for r in requests]
        if self.together is not None:
            self.together.wait(timeout=2)
        if any(label.startswith("bad") for label in labels):
            raise BackendError(f"{labels} broke the model")
        return [Result(text=label) for label in labels]

    def degraded(self) -> str | None:
        return self.trouble

    def close(self) -> None:
        self.closed_in.append(threading.current_thread().name)


class WideBackend(FakeBackend):
    preferred_lanes = 8


def _engine(backend: ASRBackend, **settings: Any) -> Engine:
    return Engine.from_settings(backend, Settings(**settings), Metrics.create(CollectorRegistry()))


@pytest.mark.parametrize(("backend", "inference_lanes", "lanes", "source"), [
    (FakeBackend(), 0, 1, "backend"),
    (WideBackend(), 0, 8, "backend"),
    (WideBackend(), 2, 2, "settings"),
    (FakeBackend(), 3, 3, "settings"),
])
async def test_lanes_are_the_backends_choice_unless_the_settings_give_them(
        caplog: pytest.LogCaptureFixture, backend: ASRBackend, inference_lanes: int, lanes: int,
        source: str) -> None:
    caplog.set_level(logging.INFO, logger="sttd.engine")
    engine = _engine(backend, inference_lanes=inference_lanes)
    assert engine.scheduler.config.lanes == lanes
    assert [r.getMessage() for r in caplog.records if r.name == "sttd.engine._engine"] == [
        f"engine.lanes lanes={lanes} source={source}"]


@pytest.mark.parametrize(("inference_lanes", "together"), [(0, True), (1, False)])
async def test_the_engine_runs_as_many_backend_calls_at_once_as_it_has_lanes(
        nursery: trio.Nursery, inference_lanes: int, together: bool) -> None:
    backend = WideBackend(together=threading.Barrier(2))
    engine = _engine(backend, inference_lanes=inference_lanes, batch_window_ms=0.0)
    await nursery.start(engine.run)
    outcomes: list[str] = []

    async def final(label: str, started: trio.Event | None = None) -> None:
        try:
            outcomes.append((await engine.transcribe(_request(label), started=started)).text)
        except BackendError:
            outcomes.append("failed")

    with trio.fail_after(20):
        async with trio.open_nursery() as calls:
            started = trio.Event()
            calls.start_soon(final, "a", started)
            await started.wait()  # a's call is in flight: b needs a call of its own
            calls.start_soon(final, "b")
    # Each call waits at the barrier for another; one lane at a time breaks it.
    assert sorted(outcomes) == (["a", "b"] if together else ["failed", "failed"])


async def test_the_engine_counts_its_live_streams_for_its_scheduler() -> None:
    engine = _engine(FakeBackend())
    read = engine.scheduler.live_streams
    assert read.count == 0
    with engine.live_stream():
        with engine.live_stream():
            assert read.count == 2
        assert read.count == 1
    with pytest.raises(RuntimeError), engine.live_stream():
        raise RuntimeError("the session failed")
    assert read.count == 0


async def test_a_failing_file_piece_fails_transcribe_batch_with_one_backend_error(
        nursery: trio.Nursery) -> None:
    engine = _engine(FakeBackend())
    await nursery.start(engine.run)
    with trio.fail_after(10):
        assert [r.text for r in await engine.transcribe_batch(
            [_request("a"), _request("b")])] == ["a", "b"]
        # One call, then one by one: both bad pieces fail, each with its own error.
        with pytest.raises(BackendError, match=r"^\['bad\d'\] broke the model$") as info:
            await engine.transcribe_batch([_request("a"), _request("bad1"), _request("bad2")])
    assert type(info.value) is BackendError  # not an ExceptionGroup
    with trio.CancelScope() as scope:
        scope.cancel()
        await engine.transcribe_batch([_request("a")])
    assert scope.cancelled_caught  # Cancelled went through, and nothing else came out


async def test_the_engine_is_degraded_when_its_backend_says_so() -> None:
    assert _engine(FakeBackend()).degraded() is None
    assert _engine(FakeBackend(trouble="every upstream is failing")).degraded() == (
        "every upstream is failing")


async def test_aclose_closes_the_backend_once_in_a_thread_even_when_cancelled() -> None:
    backend = FakeBackend()
    engine = _engine(backend)
    with trio.CancelScope() as scope:
        scope.cancel()
        await engine.aclose()
    assert len(backend.closed_in) == 1
    assert backend.closed_in[0] != threading.current_thread().name


async def test_a_burst_of_finals_is_shared_by_the_free_lanes(autojump_clock: trio.abc.Clock,
                                                             nursery: trio.Nursery) -> None:
    runner = FakeRunner(seconds=1.0)
    scheduler = _scheduler(runner, lanes=2, batch_window_ms=5.0)
    await nursery.start(scheduler.run)
    async with trio.open_nursery() as jobs:
        for n in range(6):  # arriving together, as when many sessions' speech ends at once
            jobs.start_soon(scheduler.submit, _request(f"f{n}"))
    assert [len(batch) for batch in runner.batches] == [3, 3]
    assert sorted(label for batch in runner.batches for label in batch) == [
        f"f{n}" for n in range(6)]
    # Side by side, one lane each (the second after one more gathering window at most).
    assert runner.starts[1] - runner.starts[0] <= 0.005 + 1e-9


async def test_a_burst_waits_in_part_for_the_lane_busy_with_partials(
        autojump_clock: trio.abc.Clock, nursery: trio.Nursery) -> None:
    """Half a burst of finals goes to the free lane at once; the other half waits for the lane
    a partial batch holds, rather than queueing behind the first half."""
    runner = FakeRunner(seconds=1.0)
    scheduler = _scheduler(runner, lanes=2, batch_window_ms=5.0, background_share=1.0)
    await nursery.start(scheduler.run)

    async def submit(label: str, kind: str, at: float) -> None:
        await trio.sleep(at)
        await scheduler.submit(_request(label, kind))

    async with trio.open_nursery() as jobs:
        jobs.start_soon(submit, "p0", "partial", 0.0)
        for n in range(6):
            jobs.start_soon(submit, f"f{n}", "final", 0.5)
    assert [(batch[0][0], len(batch)) for batch in runner.batches] == [
        ("p", 1), ("f", 3), ("f", 3)]
    assert runner.starts == pytest.approx([0.005, 0.505, 1.01])  # each after a 5 ms window


async def test_partial_batches_grow_when_calls_have_a_fixed_cost(
        autojump_clock: trio.abc.Clock, nursery: trio.Nursery) -> None:
    """A call that pays most of its cost once (a decoder step for the whole batch) takes more
    partials in the same budget than a per-request average would let in."""
    runner = FakeRunner(seconds=0.2, per_request_s=0.02)
    scheduler = _scheduler(runner, batch_window_ms=0.0, max_batch_ms=500.0,
                           background_share=1.0, max_inference_batch_size=32)
    await nursery.start(scheduler.run)
    for size in (1, 2, 3):  # calls of a few sizes teach it the line
        async with trio.open_nursery() as jobs:
            for n in range(size):
                jobs.start_soon(scheduler.submit, _request(f"w{size}{n}", "partial"))
    runner.batches.clear()
    async with trio.open_nursery() as jobs:
        for n in range(20):
            jobs.start_soon(scheduler.submit, _request(f"p{n}", "partial"))
    # (0.5 - 0.2) / 0.02 = 15 fit; one each (0.22 s) would have let 2 in.
    assert [len(batch) for batch in runner.batches] == [15, 5]


async def test_a_burst_waits_in_part_for_the_lane_busy_with_a_final(
        autojump_clock: trio.abc.Clock, nursery: trio.Nursery) -> None:
    """A lane busy with finals takes its share of a burst when it is done, rather than leaving
    the whole burst to the lane that was free when it came (whose call answers them all only
    at its end)."""
    runner = FakeRunner(seconds=0.1, per_request_s=0.3)  # a final costs nearly as much in a batch
    scheduler = _scheduler(runner, lanes=2, batch_window_ms=5.0)
    await nursery.start(scheduler.run)

    async def submit(label: str, at: float) -> None:
        await trio.sleep(at)
        await scheduler.submit(_request(label))

    async with trio.open_nursery() as jobs:
        jobs.start_soon(submit, "a0", 0.0)  # the first lane: 0.005 to 0.405
        for n in range(6):
            jobs.start_soon(submit, f"f{n}", 0.3)
    assert [len(batch) for batch in runner.batches] == [1, 3, 3]
    # The free lane takes half at once, the other lane the rest as soon as its final is done.
    assert runner.starts == pytest.approx([0.005, 0.305, 0.41])
