"""The shared speech engine: one backend behind the cross-session scheduler.

Three objects, each with one job, built in one direction by `Engine.from_settings`:

* `_BatchRunner` runs one batched backend call in a worker thread, under a `CapacityLimiter`
  of one token per lane, and records how long it took. A backend bug comes out as
  `BackendError`. Calls are never abandoned on cancellation (no stray threads on the backend);
* `Scheduler` decides which requests go into which call and when, and runs up to ``lanes``
  calls at once (so the backend is called concurrently when ``lanes`` > 1);
* `Engine` is what sessions and the file pipeline call: it counts live streams for the
  scheduler, reports health, and closes the backend.

`Engine.run` must be started in the app-level nursery, and `Engine.aclose` called once the
server has stopped.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence

import attrs
import trio

from sttd.backends import ASRBackend, Request, Result, resolve_lanes
from sttd.engine._scheduler import LiveStreams, Priority, Scheduler, SchedulerConfig
from sttd.errors import BackendError
from sttd.metrics import Metrics
from sttd.settings import Settings

__all__ = ["Engine"]

log = logging.getLogger(__name__)

# The longest `aclose` waits for the backend to release what it holds.
_CLOSE_TIMEOUT_S = 30.0


@attrs.frozen
class _BatchRunner:
    """Runs one batched backend call at a time per limiter token, in a worker thread."""

    backend: ASRBackend
    limiter: trio.CapacityLimiter
    metrics: Metrics

    async def run(self, requests: Sequence[Request]) -> list[Result]:
        """The backend's results for `requests`; raises `BackendError`. Cancellation waits for
        the call in flight."""
        started = time.perf_counter()
        try:
            return await trio.to_thread.run_sync(self._call, list(requests), limiter=self.limiter)
        finally:
            elapsed = time.perf_counter() - started
            for kind in {request.kind for request in requests}:
                self.metrics.inference_duration_seconds.labels(kind).observe(elapsed)

    def _call(self, requests: list[Request]) -> list[Result]:
        try:
            results = self.backend.transcribe(requests)
        except BackendError:
            raise
        except Exception as exc:  # a backend bug must fail this call, not the server
            log.error("engine.failed backend=%s requests=%d", self.backend.name, len(requests),
                      exc_info=True)
            raise BackendError(f"backend {self.backend.name} failed: {exc!r}") from exc
        if len(results) != len(requests):
            raise BackendError(
                f"backend {self.backend.name} returned {len(results)} results "
                f"for {len(requests)} requests")
        return results


@attrs.define
class Engine:
    """The backend, and the scheduler that batches every session's requests for it."""

    backend: ASRBackend
    scheduler: Scheduler
    _live_streams: LiveStreams

    @classmethod
    def from_settings(cls, backend: ASRBackend, settings: Settings, metrics: Metrics) -> Engine:
        """An engine for `backend`, with its lanes, limiter and scheduler from `settings`."""
        lanes, source = resolve_lanes(settings, backend.preferred_lanes)
        log.info("engine.lanes lanes=%d source=%s", lanes, source)
        runner = _BatchRunner(backend, trio.CapacityLimiter(lanes), metrics)
        live_streams = LiveStreams()
        scheduler = Scheduler(runner.run, SchedulerConfig.from_settings(settings, lanes=lanes),
                              metrics, live_streams)
        return cls(backend, scheduler, live_streams)

    @property
    def backend_name(self) -> str:
        return self.backend.name

    def check_language(self, language: str | None) -> None:
        """Raise `UnsupportedLanguage` if the backend cannot transcribe `language`."""
        self.backend.check_language(language)

    def overloaded(self) -> bool:
        """Whether finals wait too long in the queue: new sessions should be refused."""
        return self.scheduler.overloaded()

    def degraded(self) -> str | None:
        """Why the engine is degraded (a backend call stuck past the timeout, or a backend
        that reports trouble, like a remote one whose upstreams all fail), or None."""
        return self.scheduler.degraded() or self.backend.degraded()

    def live_stream(self) -> contextlib.AbstractContextManager[None]:
        """Count one live stream while the block runs (a session, for its lifetime): file
        pieces yield to live traffic only while some is open."""
        return self._live_streams.counting()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the scheduler until cancelled."""
        await self.scheduler.run(task_status=task_status)

    async def transcribe(self, request: Request, *, started: trio.Event | None = None) -> Result:
        """Transcribe one live request; `started` is set when its batch starts.

        Raises `BackendError` (`InferenceTimeout` past STT_INFERENCE_TIMEOUT_S). Cancelling
        withdraws it if it has not started.
        """
        return await self.scheduler.submit(request, started=started)

    async def transcribe_batch(self, requests: Sequence[Request]) -> list[Result]:
        """Transcribe file pieces, below live traffic in priority; one result per request.

        Raises the first `BackendError` of its pieces (the others are withdrawn or dropped).
        """
        results: list[Result | None] = [None] * len(requests)
        failure: BackendError | None = None

        async def one(index: int) -> None:
            results[index] = await self.scheduler.submit(requests[index], priority=Priority.FILE)

        try:
            async with trio.open_nursery() as nursery:
                for index in range(len(requests)):
                    nursery.start_soon(one, index)
        except* BackendError as failed:
            # Anything else (Cancelled, a bug) is not matched here and goes on as it came.
            failure = _first(failed)
        if failure is not None:
            raise failure  # outside the handler: its context stays its own
        done = [result for result in results if result is not None]
        assert len(done) == len(requests)
        return done

    async def aclose(self) -> None:
        """Close the backend (`ASRBackend.close`) in a worker thread, for at most 30 s.

        Shielded: it runs to the end (or the bound) even in a cancelled scope. A close still
        running then is abandoned: it is the last thing the server does.
        """
        with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_TIMEOUT_S) as scope:
            await trio.to_thread.run_sync(self.backend.close, abandon_on_cancel=True)
        if scope.cancelled_caught:
            log.warning("engine.close_timeout backend=%s timeout_s=%g", self.backend.name,
                        _CLOSE_TIMEOUT_S)


def _first(group: BaseExceptionGroup[BackendError]) -> BackendError:
    """The first `BackendError` in `group`, however deeply nested."""
    first = group.exceptions[0]
    return first if isinstance(first, BackendError) else _first(first)
