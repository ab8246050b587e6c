"""The cross-session inference scheduler: many sessions, one batched backend call at a time.

Theory of operation. Sessions `submit` requests and wait for their results. One task (`run`,
started in the app-level nursery) waits for work, gives late arrivals up to ``window_s`` to
join, then takes up to ``max_batch`` pending requests and runs them as ONE backend call. The
order it takes them in is the policy:

* priority classes, highest first: streaming finals, then partials, then file pieces
  (`Priority`), so under load partials slow down before finals do, and a big upload never
  delays a live caller's final. A batch holds one class only: finals never wait for partials
  riding along in their call. Partial batches, and file batches while any live stream is open
  (``live_streams``), are cut to ``max_batch_s`` of expected work (from a running average of
  seconds per request), so a final that arrives meanwhile waits at most about that long;
* with ``lanes`` > 1, that many batches run at once, at most one of them background work, so
  a final starts in a free lane even while a partial batch is running;
* background work (partials, and file pieces while live streams are open) may use at most
  ``background_share`` of the engine's time: after a background batch that took T seconds the
  next one waits T * (1 / share - 1), while finals start at once. Under load this lowers the
  partial rate of every session evenly, and leaves the engine (and the CPU the event loop shares
  with it) free for finals when an utterance ends, instead of always busy with partials;
* first come, first served inside a class; a session has at most one pending partial (a newer
  one supersedes the older, whose waiter gets `Superseded`: only the latest audio is worth
  decoding), so no session can crowd out the others;
* a batch that fails is retried one request at a time, so a request that breaks the backend
  fails only its own session;
* a request without a result ``request_timeout_s`` after it was submitted fails with
  `InferenceTimeout` (its session reports it and goes on), and while a backend call has run
  longer than that, `degraded()` says so (for /health). A stuck call cannot be killed: its
  worker thread is left to finish.

`overloaded()` says whether finals have recently waited longer than ``max_final_wait_s`` in the
queue (an exponentially weighted average): the server refuses new sessions then, instead of
slowing everyone down. Cancelling a waiter withdraws its request if it has not started; a batch
in flight always completes (worker threads are never abandoned).
"""

from __future__ import annotations

import enum
import itertools
import logging
import math
from collections.abc import Awaitable, Callable, Hashable, Sequence

import attrs
import trio

from sttd.backends.base import Request, Result
from sttd.errors import BackendError, InferenceTimeout
from sttd.metrics import Metrics

__all__ = ["Priority", "Scheduler", "SchedulerStatistics", "Superseded"]

log = logging.getLogger(__name__)

RunBatch = Callable[[Sequence[Request]], Awaitable[list[Result]]]
# Weight of the newest final's queue wait in the moving average behind `overloaded()`.
_WAIT_EWMA_WEIGHT = 0.2
# Weight of the newest batch in the moving average of seconds per request.
_COST_EWMA_WEIGHT = 0.2
# Time constant with which the overload signal fades while no final starts.
_OVERLOAD_MEMORY_S = 5.0


class Superseded(Exception):
    """A newer partial from the same session replaced this one before it was decoded."""


class Priority(enum.IntEnum):
    """Scheduling classes, most urgent first."""

    FINAL = 0
    PARTIAL = 1
    FILE = 2


@attrs.define(eq=False)
class _Job:
    request: Request
    session: Hashable
    priority: Priority
    order: int
    submitted_at: float
    done: trio.Event = attrs.field(factory=trio.Event)
    result: Result | None = None
    error: BaseException | None = None
    started: bool = False
    superseded: bool = False
    on_start: trio.Event | None = None


@attrs.frozen
class SchedulerStatistics:
    """A snapshot of the scheduler's queue."""

    pending_finals: int
    pending_partials: int
    pending_files: int
    batches_run: int
    final_wait_ewma_s: float


@attrs.define
class Scheduler:
    """Batches requests from all sessions into single backend calls."""

    run_batch: RunBatch
    metrics: Metrics
    max_batch: int = attrs.field(default=32, validator=attrs.validators.gt(0))
    window_s: float = attrs.field(default=0.005, validator=attrs.validators.ge(0))
    max_final_wait_s: float = attrs.field(default=1.0, validator=attrs.validators.gt(0))
    max_batch_s: float = attrs.field(default=0.25, validator=attrs.validators.gt(0))
    background_share: float = attrs.field(
        default=0.5, validator=[attrs.validators.gt(0), attrs.validators.le(1)])
    request_timeout_s: float = attrs.field(default=30.0, validator=attrs.validators.gt(0))
    # Batches that may run at once (STT_INFERENCE_THREADS); at most one of them background.
    lanes: int = attrs.field(default=1, validator=attrs.validators.gt(0))
    # How many live streams are open; file batches only need cutting when some are.
    live_streams: Callable[[], int] = lambda: 1
    _queues: dict[Priority, list[_Job]] = attrs.field(
        init=False, factory=lambda: {p: [] for p in Priority})
    _partials: dict[Hashable, _Job] = attrs.field(init=False, factory=dict)
    _counter: itertools.count[int] = attrs.field(init=False, factory=itertools.count)
    _work: trio.lowlevel.ParkingLot = attrs.field(init=False, factory=trio.lowlevel.ParkingLot)
    _batches: int = attrs.field(init=False, default=0)
    _final_wait_ewma_s: float = attrs.field(init=False, default=0.0)
    _final_wait_at: float = attrs.field(init=False, default=0.0)  # when it was last updated
    # Seconds per request of each class, a moving average of observed batches.
    _cost_s: dict[Priority, float] = attrs.field(init=False, factory=dict)
    # Background batches may not start before this time (the duty-cycle cap).
    _background_at: float = attrs.field(init=False, default=-math.inf)
    _calls_started_at: dict[int, float] = attrs.field(init=False, factory=dict)  # in flight
    _lanes_busy: int = attrs.field(init=False, default=0)
    _background_busy: bool = attrs.field(init=False, default=False)

    def statistics(self) -> SchedulerStatistics:
        return SchedulerStatistics(
            pending_finals=len(self._queues[Priority.FINAL]),
            pending_partials=len(self._queues[Priority.PARTIAL]),
            pending_files=len(self._queues[Priority.FILE]),
            batches_run=self._batches,
            final_wait_ewma_s=self._final_wait_ewma_s,
        )

    def degraded(self) -> str | None:
        """Why the engine is degraded (a backend call running too long), or None."""
        if not self._calls_started_at:
            return None
        running = trio.current_time() - min(self._calls_started_at.values())
        if running <= self.request_timeout_s:
            return None
        return (f"a backend call has been running for {running:.0f} s "
                f"(STT_INFERENCE_TIMEOUT_S={self.request_timeout_s:g})")

    def overloaded(self) -> bool:
        """Whether finals wait too long: new sessions should be refused.

        The average fades with the time since a final last started, so a burst that is over
        does not keep refusing sessions when no traffic comes to lower it.
        """
        idle_s = max(trio.current_time() - self._final_wait_at, 0.0)
        recent = self._final_wait_ewma_s * math.exp(-idle_s / _OVERLOAD_MEMORY_S)
        return recent > self.max_final_wait_s

    async def submit(self, request: Request, *, session: Hashable,
                     priority: Priority | None = None, started: trio.Event | None = None
                     ) -> Result:
        """Queue `request` and wait for its result; `started` is set when its batch starts.

        Raises `Superseded` if a newer partial of `session` replaced it, and `BackendError` if
        the backend failed on it. Cancellation withdraws it if it has not started.
        """
        if priority is None:
            priority = Priority.FINAL if request.kind == "final" else Priority.PARTIAL
        job = _Job(request, session, priority, next(self._counter), trio.current_time(),
                   on_start=started)
        if priority is Priority.PARTIAL:
            older = self._partials.pop(session, None)
            if older is not None and not older.started:
                self._withdraw(older)
                older.superseded = True
                older.done.set()
                self.metrics.scheduler_requests_total.labels("partial", "superseded").inc()
            self._partials[session] = job
        self._queues[priority].append(job)
        self._work.unpark_all()
        try:
            with trio.move_on_after(self.request_timeout_s):
                await job.done.wait()
        finally:
            if not job.done.is_set() and not job.started:
                self._withdraw(job)
                self.metrics.scheduler_requests_total.labels(request.kind, "withdrawn").inc()
            if self._partials.get(session) is job:
                del self._partials[session]
        if not job.done.is_set():
            self.metrics.scheduler_requests_total.labels(request.kind, "timeout").inc()
            raise InferenceTimeout(
                f"no result within STT_INFERENCE_TIMEOUT_S={self.request_timeout_s:g} s")
        if job.superseded:
            raise Superseded
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return job.result

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve batches until cancelled; cancellation waits for the batches in flight."""
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                while not self._runnable():
                    # Woken by new work or a finished batch, or when the background pause ends.
                    paused = (self._pending() and self._lanes_busy < self.lanes
                              and not self._background_busy)
                    with trio.move_on_at(self._background_at if paused else math.inf):
                        await self._work.park()
                if self.window_s > 0 and self._runnable() < self.max_batch:
                    await trio.sleep(self.window_s)  # let requests arriving together share a call
                batch = self._take()
                if batch:
                    self._lanes_busy += 1
                    if self._is_background(batch[0].priority):
                        self._background_busy = True
                    nursery.start_soon(self._run_in_lane, batch)

    async def _run_in_lane(self, batch: list[_Job]) -> None:
        background = self._is_background(batch[0].priority)
        started = trio.current_time()
        try:
            await self._run(batch)
        finally:
            self._lanes_busy -= 1
            if background:
                self._background_busy = False
                busy = trio.current_time() - started
                self._background_at = trio.current_time() + busy * (
                    1 / self.background_share - 1)
            self._work.unpark_all()

    def _pending(self) -> int:
        return sum(len(queue) for queue in self._queues.values())

    def _background_allowed(self) -> bool:
        return not self._background_busy and trio.current_time() >= self._background_at

    def _runnable(self) -> int:
        """How many pending requests may start now (0 while every lane is busy)."""
        if self._lanes_busy >= self.lanes:
            return 0
        if self._background_allowed():
            return self._pending()
        return sum(len(queue) for priority, queue in self._queues.items()
                   if not self._is_background(priority))

    def _is_background(self, priority: Priority) -> bool:
        return priority is Priority.PARTIAL or (
            priority is Priority.FILE and self.live_streams() > 0)

    def _take(self) -> list[_Job]:
        batch: list[_Job] = []
        paused = not self._background_allowed()
        for priority in Priority:
            queue = self._queues[priority]
            if not queue or (paused and self._is_background(priority)):
                continue
            room = self.max_batch
            cost = self._cost_s.get(priority)
            if self._is_background(priority) and cost:
                room = max(1, min(room, int(self.max_batch_s / cost)))
            batch = queue[:room]
            del queue[:room]
            break
        now = trio.current_time()
        for job in batch:
            job.started = True
            if job.on_start is not None:
                job.on_start.set()
            wait = now - job.submitted_at
            self.metrics.scheduler_queue_wait_seconds.labels(job.request.kind).observe(wait)
            if job.priority is Priority.FINAL:
                self._final_wait_ewma_s += _WAIT_EWMA_WEIGHT * (wait - self._final_wait_ewma_s)
                self._final_wait_at = now
        if not self._queues[Priority.FINAL] and not _has_final(batch):
            # No finals waiting: let the average decay so admission reopens.
            self._final_wait_ewma_s *= 1 - _WAIT_EWMA_WEIGHT
        return batch

    async def _run(self, batch: list[_Job]) -> None:
        self._batches += 1
        self.metrics.scheduler_batch_size.observe(len(batch))
        started = self._calls_started_at[id(batch)] = trio.current_time()
        try:
            await self._call(batch, started)
        finally:
            del self._calls_started_at[id(batch)]

    async def _call(self, batch: list[_Job], started: float) -> None:
        try:
            results = await self.run_batch([job.request for job in batch])
            self._learn_cost(batch[0].priority, (trio.current_time() - started) / len(batch))
        except BackendError as exc:
            if len(batch) == 1:
                self._finish(batch[0], None, exc)
                return
            log.warning("scheduler.batch_failed size=%d retrying=one_by_one", len(batch))
            for job in batch:
                try:
                    [result] = await self.run_batch([job.request])
                except BackendError as single:
                    self._finish(job, None, single)
                else:
                    self._finish(job, result, None)
            return
        for job, result in zip(batch, results, strict=True):
            self._finish(job, result, None)

    def _learn_cost(self, priority: Priority, seconds: float) -> None:
        old = self._cost_s.get(priority)
        self._cost_s[priority] = seconds if old is None else old + _COST_EWMA_WEIGHT * (
            seconds - old)

    def _finish(self, job: _Job, result: Result | None, error: BaseException | None) -> None:
        job.result, job.error = result, error
        outcome = "ok" if error is None else "failed"
        self.metrics.scheduler_requests_total.labels(job.request.kind, outcome).inc()
        job.done.set()

    def _withdraw(self, job: _Job) -> None:
        queue = self._queues[job.priority]
        if job in queue:
            queue.remove(job)


def _has_final(batch: Sequence[_Job]) -> bool:
    return any(job.priority is Priority.FINAL for job in batch)
