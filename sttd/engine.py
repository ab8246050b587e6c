"""The shared speech engine: one backend, called from worker threads under one limiter."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Protocol

import attrs
import trio

from sttd.backends.base import ASRBackend, Request, Result
from sttd.errors import BackendError
from sttd.metrics import Metrics

__all__ = ["Engine", "Transcriber"]

log = logging.getLogger(__name__)


class Transcriber(Protocol):
    """What a session needs from the engine."""

    @property
    def backend_name(self) -> str: ...

    def check_language(self, language: str | None) -> None: ...

    async def transcribe(self, request: Request) -> Result:
        """Transcribe one request; raises `BackendError` if the backend failed on it."""
        ...


@attrs.define
class Engine:
    """Runs backend calls in worker threads, at most `limiter.total_tokens` at a time."""

    backend: ASRBackend
    metrics: Metrics
    limiter: trio.CapacityLimiter

    @classmethod
    def create(cls, backend: ASRBackend, metrics: Metrics, *, threads: int = 1) -> Engine:
        return cls(backend, metrics, trio.CapacityLimiter(threads))

    @property
    def backend_name(self) -> str:
        return self.backend.name

    def check_language(self, language: str | None) -> None:
        self.backend.check_language(language)

    async def transcribe(self, request: Request) -> Result:
        return (await self.transcribe_batch([request]))[0]

    async def transcribe_batch(self, requests: Sequence[Request]) -> list[Result]:
        """Transcribe `requests` in one backend call; raises `BackendError` on failure.

        Cancellation waits for the call in flight: the engine never runs abandoned work.
        """
        started = time.perf_counter()
        try:
            results = await trio.to_thread.run_sync(
                self._call, list(requests), limiter=self.limiter
            )
        finally:
            elapsed = time.perf_counter() - started
            for kind in {request.kind for request in requests}:
                self.metrics.inference_duration_seconds.labels(kind).observe(elapsed)
        return results

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
