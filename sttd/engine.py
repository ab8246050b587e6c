"""The shared speech engine: one backend behind the cross-session scheduler.

Every request from every session goes through one `Scheduler`, which runs batched backend calls
in a worker thread under one `CapacityLimiter` (the backend is never called concurrently unless
``inference_threads`` says so). `run` must be started in the app-level nursery.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Protocol

import attrs
import trio

from sttd.backends.base import ASRBackend, Request, Result
from sttd.errors import BackendError
from sttd.metrics import Metrics
from sttd.scheduler import Priority, Scheduler, Superseded

__all__ = ["Engine", "Superseded", "Transcriber"]

log = logging.getLogger(__name__)


class Transcriber(Protocol):
    """What a session needs from the engine."""

    @property
    def backend_name(self) -> str: ...

    def check_language(self, language: str | None) -> None: ...

    def overloaded(self) -> bool: ...

    async def transcribe(self, request: Request, *, session: Hashable,
                         started: trio.Event | None = None) -> Result:
        """Transcribe one request for `session`; `started` is set when its batch starts.

        Raises `BackendError` if the backend failed on it, `Superseded` if a newer partial of
        the same session replaced it.
        """
        ...


@attrs.define
class Engine:
    """The backend, its limiter, and the scheduler that batches requests for it."""

    backend: ASRBackend
    metrics: Metrics
    limiter: trio.CapacityLimiter
    max_batch: int = 32
    window_s: float = 0.005
    max_final_wait_s: float = 1.0
    max_batch_s: float = 0.25
    background_share: float = 0.5
    request_timeout_s: float = 30.0
    live_streams: Callable[[], int] = lambda: 1
    scheduler: Scheduler = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.scheduler = Scheduler(self._run_batch, self.metrics, max_batch=self.max_batch,
                                   window_s=self.window_s, max_final_wait_s=self.max_final_wait_s,
                                   max_batch_s=self.max_batch_s, live_streams=self.live_streams,
                                   background_share=self.background_share,
                                   request_timeout_s=self.request_timeout_s,
                                   lanes=int(self.limiter.total_tokens))

    @classmethod
    def create(cls, backend: ASRBackend, metrics: Metrics, *, threads: int = 1,
               max_batch: int = 32, window_s: float = 0.005,
               max_final_wait_s: float = 1.0, max_batch_s: float = 0.25,
               background_share: float = 0.5, request_timeout_s: float = 30.0, live_streams: Callable[[], int] = lambda: 1) -> Engine:
        return cls(backend, metrics, trio.CapacityLimiter(threads), max_batch=max_batch,
                   window_s=window_s, max_final_wait_s=max_final_wait_s, max_batch_s=max_batch_s,
                   background_share=background_share, request_timeout_s=request_timeout_s,
                   live_streams=live_streams)

    @property
    def backend_name(self) -> str:
        return self.backend.name

    def check_language(self, language: str | None) -> None:
        self.backend.check_language(language)

    def overloaded(self) -> bool:
        return self.scheduler.overloaded()

    def degraded(self) -> str | None:
        """Why the engine is degraded (a backend call stuck past the timeout, or a backend
        that reports trouble, like a remote one whose upstreams all fail), or None."""
        reason = self.scheduler.degraded()
        backend_check = getattr(self.backend, "degraded", None)
        if reason is None and callable(backend_check):
            reason = backend_check()
        return reason

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the scheduler until cancelled."""
        await self.scheduler.run(task_status=task_status)

    async def transcribe(self, request: Request, *, session: Hashable,
                         started: trio.Event | None = None) -> Result:
        return await self.scheduler.submit(request, session=session, started=started)

    async def transcribe_batch(self, requests: Sequence[Request]) -> list[Result]:
        """Transcribe file pieces, below live traffic in priority; raises `BackendError`."""
        results: list[Result | None] = [None] * len(requests)
        owner = object()

        async def one(index: int) -> None:
            results[index] = await self.scheduler.submit(
                requests[index], session=(owner, index), priority=Priority.FILE)

        async with trio.open_nursery() as nursery:
            for index in range(len(requests)):
                nursery.start_soon(one, index)
        return [result for result in results if result is not None]

    async def _run_batch(self, requests: Sequence[Request]) -> list[Result]:
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
