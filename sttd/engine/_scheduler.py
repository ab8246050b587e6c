"""The cross-session inference scheduler: many sessions, a few batched backend calls at a time.

Theory of operation. Sessions `submit` requests and wait for their results. One task (`run`,
started in the app-level nursery) waits for work, gives late arrivals up to ``window_s`` to
join, then takes up to ``max_batch`` pending requests and runs them as ONE call of the
`run_batch` it was given (the engine's: one batched backend call in a worker thread). The order
it takes them in is the policy:

* priority classes, highest first: streaming finals, then partials, then file pieces
  (`Priority`), so under load partials slow down before finals do, and a big upload never
  delays a live caller's final. A batch holds one class only: finals never wait for partials
  riding along in their call. Partial batches, and file batches while any live stream is open
  (`LiveStreams`, which the engine counts for its sessions), are cut to ``max_batch_s`` of
  expected work (from a line fitted to the calls seen: a fixed part per call, a part per
  request, `BatchCost`), so a final that arrives
  meanwhile waits at most about that long;
* up to ``lanes`` batches run at once (STT_INFERENCE_LANES, or the backend's preferred number),
  at most one of them background work, so a final starts in a free lane even while a partial
  batch is running, and finals waiting together are split among all the lanes (a busy one
  takes its share when its batch ends): a call answers its requests only at its end, so one
  lane holding a whole burst would keep every final of it waiting. With one lane, calls run
  one after another;
* background work (partials, and file pieces while live streams are open) may use at most
  ``background_share`` of the engine's time, all lanes counted: after a background batch that
  took T seconds the next one waits T * (1 / (share * lanes) - 1) (no wait once one lane is
  that share), while finals start at once. Under load this lowers the
  partial rate of every session evenly, and leaves the engine (and the CPU the event loop shares
  with it) free for finals when an utterance ends, instead of always busy with partials;
* first come, first served inside a class; a session keeps at most one partial queued (it
  withdraws a stale one by cancelling its wait), so no session can crowd out the others;
* a batch that fails with `BackendError` is retried one request at a time, so a request that
  breaks the backend fails only its own session; a backend that knows which requests failed
  says so (`BatchPartlyFailed`), and then each request gets its own outcome without a retry;
* any other exception in a lane (a bug in the batch runner, the metrics, the cost bookkeeping)
  is logged and fails the requests of that batch still waiting, each with a `BackendError`
  saying the scheduler failed; the other lanes and `run` go on. Cancellation is never caught;
* a request without a result ``request_timeout_s`` after it was submitted fails with
  `InferenceTimeout` (its session reports it and goes on), and while a backend call still
  holds such a request, `degraded()` says so (for /health). A stuck call cannot be killed: its
  worker thread is left to finish.

`overloaded()` says whether finals have recently waited longer than ``max_final_wait_s`` in the
queue (an exponentially weighted average): the server refuses new sessions then, instead of
slowing everyone down. Cancelling a waiter withdraws its request if it has not started; a batch
in flight always completes (worker threads are never abandoned).
"""

from __future__ import annotations

import contextlib
import enum
import logging
import math
from collections.abc import Awaitable, Callable, Iterator, Sequence

import attrs
import trio

from sttd.backends.base import BatchPartlyFailed, Request, Result
from sttd.engine._batch_cost import BatchCost
from sttd.errors import BackendError, InferenceTimeout
from sttd.metrics import Metrics
from sttd.settings import Settings

__all__ = ["LiveStreams", "Priority", "Scheduler", "SchedulerConfig", "SchedulerStatistics"]

log = logging.getLogger(__name__)

RunBatch = Callable[[Sequence[Request]], Awaitable[list[Result]]]
# Weight of the newest final's queue wait in the moving average behind `overloaded()`.
_WAIT_EWMA_WEIGHT = 0.2
# Time constant with which the overload signal fades while no final starts.
_OVERLOAD_MEMORY_S = 5.0
# With more than one lane, a background batch may hold this many requests whatever the budget
# says: a call of one pays a decoder's fixed cost for one partial (tiny.en on a CPU: 99 ms for
# one clip, 229 ms for eight), and on a slow machine the budget would keep every call at one,
# so each session's partials came seconds apart.
_MIN_BACKGROUND_BATCH = 4


class Priority(enum.IntEnum):
    """Scheduling classes, most urgent first."""

    FINAL = 0
    PARTIAL = 1
    FILE = 2


@attrs.frozen(kw_only=True)
class SchedulerConfig:
    """How the scheduler batches and orders requests. `from_settings` is the one place its
    values come from; tests that build one directly give every field."""

    # Most requests in one backend call (STT_MAX_INFERENCE_BATCH_SIZE).
    max_batch: int = attrs.field(validator=attrs.validators.gt(0))
    # How long requests may gather before a batch starts (STT_BATCH_WINDOW_MS).
    window_s: float = attrs.field(validator=attrs.validators.ge(0))
    # Average queue wait of finals past which `overloaded()` is true (STT_MAX_FINAL_WAIT_S).
    max_final_wait_s: float = attrs.field(validator=attrs.validators.gt(0))
    # Expected work in one background batch (STT_MAX_BATCH_MS).
    max_batch_s: float = attrs.field(validator=attrs.validators.gt(0))
    # Most of the engine's time background work may take (STT_BACKGROUND_SHARE).
    background_share: float = attrs.field(
        validator=[attrs.validators.gt(0), attrs.validators.le(1)])
    # A request without a result this long after it was submitted fails
    # (STT_INFERENCE_TIMEOUT_S).
    request_timeout_s: float = attrs.field(validator=attrs.validators.gt(0))
    # Batches that may run at once, at most one of them background.
    lanes: int = attrs.field(validator=attrs.validators.gt(0))

    @classmethod
    def from_settings(cls, settings: Settings, *, lanes: int) -> SchedulerConfig:
        """The scheduler's part of `settings`, with `lanes` as the engine chose them."""
        return cls(
            max_batch=settings.max_inference_batch_size,
            window_s=settings.batch_window_ms / 1000,
            max_final_wait_s=settings.max_final_wait_s,
            max_batch_s=settings.max_batch_ms / 1000,
            background_share=settings.background_share,
            request_timeout_s=settings.inference_timeout_s,
            lanes=lanes,
        )


@attrs.define
class LiveStreams:
    """How many live streams are open: the engine counts them, the scheduler reads the count
    (file batches only yield to live traffic while there is some)."""

    _count: int = attrs.field(init=False, default=0)
    # Stream-seconds lived (the count integrated over trio time), up to `_since`.
    _stream_s: float = attrs.field(init=False, default=0.0)
    _since: float | None = attrs.field(init=False, default=None)

    @property
    def count(self) -> int:
        return self._count

    def stream_seconds(self) -> float:
        """The live streams' time so far, summed over streams (seconds)."""
        self._settle()
        return self._stream_s

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        """Count one more live stream while the block runs."""
        self._settle()
        self._count += 1
        try:
            yield
        finally:
            self._settle()
            self._count -= 1

    def _settle(self) -> None:
        now = trio.current_time()
        if self._since is not None:
            self._stream_s += self._count * (now - self._since)
        self._since = now


@attrs.define(eq=False)
class _Pending:
    """A submitted request, until its waiter has the outcome."""

    request: Request
    priority: Priority
    submitted_at: float
    done: trio.Event = attrs.field(factory=trio.Event)
    result: Result | None = None
    error: BackendError | None = None
    started: bool = False
    on_start: trio.Event | None = None
    # Its outcome is in sttd_scheduler_requests_total: once only (a request that timed out is
    # counted so, not again as ok or failed when the abandoned call ends).
    counted: bool = False


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
    """Batches requests from all sessions into single `run_batch` calls; see the module
    docstring."""

    run_batch: RunBatch
    config: SchedulerConfig
    metrics: Metrics
    live_streams: LiveStreams
    _queues: dict[Priority, list[_Pending]] = attrs.field(
        init=False, factory=lambda: {p: [] for p in Priority})
    _work: trio.lowlevel.ParkingLot = attrs.field(init=False, factory=trio.lowlevel.ParkingLot)
    _batches: int = attrs.field(init=False, default=0)
    _final_wait_ewma_s: float = attrs.field(init=False, default=0.0)
    _final_wait_at: float = attrs.field(init=False, default=0.0)  # when it was last updated
    # What a call of each class costs against its size, fitted to the calls seen.
    _costs: dict[Priority, BatchCost] = attrs.field(
        init=False, factory=lambda: {p: BatchCost() for p in Priority})
    # Background batches may not start before this time (the duty-cycle cap).
    _background_at: float = attrs.field(init=False, default=-math.inf)
    # Calls in flight: the oldest submission time among each call's requests.
    _holding_since: dict[int, float] = attrs.field(init=False, factory=dict)
    _lanes_busy: int = attrs.field(init=False, default=0)
    # When each call in flight started (by the id of its batch).
    _lane_starts: dict[int, float] = attrs.field(init=False, factory=dict)
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
        """Why the engine is degraded, or None: a backend call in flight holds a request
        submitted at least ``request_timeout_s`` ago, so that request's session has already
        been told it timed out (measured from the submission, not the call's start, so /health
        says so from the moment the session hears it)."""
        if not self._holding_since:
            return None
        held = trio.current_time() - min(self._holding_since.values())
        if held < self.config.request_timeout_s:
            return None
        return (f"a backend call has held a request for {held:.3g} s "
                f"(STT_INFERENCE_TIMEOUT_S={self.config.request_timeout_s:g})")

    def overloaded(self) -> bool:
        """Whether finals wait too long: new sessions should be refused.

        The average fades with the time since a final last started, so a burst that is over
        does not keep refusing sessions when no traffic comes to lower it.
        """
        idle_s = max(trio.current_time() - self._final_wait_at, 0.0)
        recent = self._final_wait_ewma_s * math.exp(-idle_s / _OVERLOAD_MEMORY_S)
        return recent > self.config.max_final_wait_s

    async def submit(self, request: Request, *, priority: Priority | None = None,
                     started: trio.Event | None = None) -> Result:
        """Queue `request` and wait for its result; `started` is set when its batch starts.

        `priority` defaults to the request's kind (a final or a partial). Raises
        `BackendError` if the backend, or the scheduler, failed on it, and `InferenceTimeout`
        if it has no result within ``request_timeout_s``. Cancellation withdraws it if it has
        not started.
        """
        if priority is None:
            priority = Priority.FINAL if request.kind == "final" else Priority.PARTIAL
        pending = _Pending(request, priority, trio.current_time(), on_start=started)
        self._queues[priority].append(pending)
        self._work.unpark_all()
        timed_out = False
        try:
            with trio.move_on_after(self.config.request_timeout_s) as waiting:
                await pending.done.wait()
            timed_out = waiting.cancelled_caught
        finally:
            if not pending.done.is_set() and not pending.started:
                self._withdraw(pending)
                if not timed_out:  # the waiter went away; a timeout is counted as one below
                    self.metrics.scheduler_requests_total.labels(request.kind, "withdrawn").inc()
        if not pending.done.is_set():
            pending.counted = True
            self.metrics.scheduler_requests_total.labels(request.kind, "timeout").inc()
            raise InferenceTimeout(
                f"no result within STT_INFERENCE_TIMEOUT_S={self.config.request_timeout_s:g} s")
        if pending.error is not None:
            raise pending.error
        assert pending.result is not None
        return pending.result

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve batches until cancelled; cancellation waits for the batches in flight."""
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                while not self._runnable():
                    # Woken by new work or a finished batch, or when the background pause ends.
                    paused = (self._pending() and self._lanes_busy < self.config.lanes
                              and not self._background_busy)
                    with trio.move_on_at(self._background_at if paused else math.inf):
                        await self._work.park()
                if self.config.window_s > 0 and self._runnable() < self.config.max_batch:
                    # Let requests arriving together share a call.
                    await trio.sleep(self.config.window_s)
                batch = self._take()
                if batch:
                    # Decided once: the live-stream count may change before the lane ends.
                    background = self._is_background(batch[0].priority)
                    self._lanes_busy += 1
                    self._lane_starts[id(batch)] = trio.current_time()
                    if background:
                        self._background_busy = True
                    nursery.start_soon(self._run_in_lane, batch, background)

    async def _run_in_lane(self, batch: list[_Pending], background: bool) -> None:
        started = trio.current_time()
        try:
            await self._run(batch)
        except Exception as exc:  # a bug of ours must fail this batch, not the server
            self._fail(batch, exc)
        finally:
            self._lanes_busy -= 1
            del self._lane_starts[id(batch)]
            if background:
                self._background_busy = False
                busy = trio.current_time() - started
                # The share is of all the lanes' time: with one lane in `lanes` doing background
                # work, the pause keeps it to `background_share` of the whole engine.
                self._background_at = trio.current_time() + busy * max(
                    1 / (self.config.background_share * self.config.lanes) - 1, 0.0)
            self._work.unpark_all()

    def _pending(self) -> int:
        return sum(len(queue) for queue in self._queues.values())

    def _background_allowed(self) -> bool:
        return not self._background_busy and trio.current_time() >= self._background_at

    def _runnable(self) -> int:
        """How many pending requests may start now (0 while every lane is busy)."""
        if self._lanes_busy >= self.config.lanes:
            return 0
        if self._background_allowed():
            return self._pending()
        return sum(len(queue) for priority, queue in self._queues.items()
                   if not self._is_background(priority))

    def _lanes_sharing(self, since: float) -> int:
        """The lanes that share finals waiting since `since`: the free ones, and those whose
        call started before then (each takes its share when it ends; a call started since has
        taken its share already)."""
        earlier = sum(started < since for started in self._lane_starts.values())
        return max(self.config.lanes - self._lanes_busy + earlier, 1)

    def _is_background(self, priority: Priority) -> bool:
        return priority is Priority.PARTIAL or (
            priority is Priority.FILE and self.live_streams.count > 0)

    def _take(self) -> list[_Pending]:
        batch: list[_Pending] = []
        paused = not self._background_allowed()
        for priority in Priority:
            queue = self._queues[priority]
            if not queue or (paused and self._is_background(priority)):
                continue
            room = self.config.max_batch
            fits = self._costs[priority].room(self.config.max_batch_s)
            if self._is_background(priority) and fits is not None:
                if self.config.lanes > 1:  # finals keep the other lanes meanwhile
                    fits = max(fits, _MIN_BACKGROUND_BATCH)
                room = min(room, fits)
            elif priority is Priority.FINAL:
                # A burst of finals is shared by every lane, not queued behind one: a lane
                # busy with background work frees within about max_batch_s, one busy with
                # earlier finals when they are done, and each then takes its share. (A call
                # answers its requests only at its end, and on a CPU a final costs nearly as
                # much in a big batch as alone: one lane taking 11 finals of a burst took 2.1 s
                # while the other, freed 0.2 s later, found none.)
                room = min(room, -(-len(queue) // self._lanes_sharing(queue[0].submitted_at)))
            batch = queue[:room]
            del queue[:room]
            break
        now = trio.current_time()
        for pending in batch:
            pending.started = True
            if pending.on_start is not None:
                pending.on_start.set()
            wait = now - pending.submitted_at
            self.metrics.scheduler_queue_wait_seconds.labels(pending.request.kind).observe(wait)
            if pending.priority is Priority.FINAL:
                self._final_wait_ewma_s += _WAIT_EWMA_WEIGHT * (wait - self._final_wait_ewma_s)
                self._final_wait_at = now
        if not self._queues[Priority.FINAL] and not _has_final(batch):
            # No finals waiting: let the average decay so admission reopens.
            self._final_wait_ewma_s *= 1 - _WAIT_EWMA_WEIGHT
        return batch

    async def _run(self, batch: list[_Pending]) -> None:
        self._batches += 1
        self.metrics.scheduler_batch_size.observe(len(batch))
        started = trio.current_time()
        # For `degraded`: since when this call holds a request (its oldest submission).
        self._holding_since[id(batch)] = min(pending.submitted_at for pending in batch)
        try:
            await self._call(batch, started)
        finally:
            del self._holding_since[id(batch)]

    async def _call(self, batch: list[_Pending], started: float) -> None:
        try:
            results = await self.run_batch([pending.request for pending in batch])
            self._costs[batch[0].priority].observe(len(batch), trio.current_time() - started)
        except BatchPartlyFailed as exc:
            # The backend told each request's outcome: a failure fails only its own request.
            if len(exc.outcomes) != len(batch):
                raise BackendError(f"the backend gave {len(exc.outcomes)} outcomes for "
                                   f"{len(batch)} requests") from exc
            log.warning("scheduler.batch_partly_failed size=%d: %s", len(batch), exc)
            for pending, outcome in list(zip(batch, exc.outcomes, strict=True)):
                if isinstance(outcome, BackendError):
                    self._finish(pending, None, outcome)
                else:
                    self._finish(pending, outcome, None)
            return
        except BackendError as exc:
            if len(batch) == 1:
                self._finish(batch[0], None, exc)
                return
            log.warning("scheduler.batch_failed size=%d retrying=one_by_one", len(batch))
            for pending in batch:
                try:
                    [result] = await self.run_batch([pending.request])
                except BackendError as single:
                    self._finish(pending, None, single)
                else:
                    self._finish(pending, result, None)
            return
        # Paired before any is answered: results that do not match fail the whole batch.
        for pending, result in list(zip(batch, results, strict=True)):
            self._finish(pending, result, None)

    def _finish(self, pending: _Pending, result: Result | None,
                error: BackendError | None) -> None:
        pending.result, pending.error = result, error
        pending.done.set()  # before the metrics: should counting fail, the waiter has its answer
        if not pending.counted:
            pending.counted = True
            outcome = "ok" if error is None else "failed"
            self.metrics.scheduler_requests_total.labels(pending.request.kind, outcome).inc()

    def _fail(self, batch: list[_Pending], exc: Exception) -> None:
        """Fail the requests of `batch` still waiting: the scheduler broke running it."""
        log.error("scheduler.failed kind=%s size=%d", batch[0].request.kind, len(batch),
                  exc_info=True)
        waiting = [pending for pending in batch if not pending.done.is_set()]
        for pending in waiting:  # each waiter raises its own error (tracebacks are per object)
            error = BackendError(f"the scheduler failed running this request's batch: {exc!r}")
            error.__cause__ = exc
            pending.error = error
            pending.done.set()
        for pending in waiting:
            if not pending.counted:
                pending.counted = True
                self.metrics.scheduler_requests_total.labels(pending.request.kind, "failed").inc()

    def _withdraw(self, pending: _Pending) -> None:
        queue = self._queues[pending.priority]
        if pending in queue:
            queue.remove(pending)


def _has_final(batch: Sequence[_Pending]) -> bool:
    return any(pending.priority is Priority.FINAL for pending in batch)
