"""The shared speech engine: one backend behind the cross-session scheduler.

Three objects, each with one job, built in one direction by `Engine.from_settings`:

* `_BatchRunner` runs one batched backend call in a worker thread, under a `CapacityLimiter`
  of one token per lane, and records how long it took. A backend bug comes out as
  `BackendError`. Calls are never abandoned on cancellation (no stray threads on the backend);
* `Scheduler` decides which requests go into which call and when, and runs up to ``lanes``
  calls at once (so the backend is called concurrently when ``lanes`` > 1);
* `Engine` is what sessions and the file pipeline call: it counts live streams for the
  scheduler, admits new ones from its measured capacity (`CapacityModel`, fed by the runner
  with every call's cost, and at start by `calibrate`), reports health, and closes the
  backend.

`Engine.run` must be started in the app-level nursery, and `Engine.aclose` called once the
server has stopped.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import logging
from collections.abc import Sequence

import attrs
import numpy as np
import numpy.typing as npt
import trio

from sttd.audio import SAMPLE_RATE_HZ, decode_wav
from sttd.backends import ASRBackend, Request, Result, resolve_lanes
from sttd.engine._capacity import PRIOR_UTTERANCE_S, CapacityModel, CapacityStatistics
from sttd.engine._scheduler import LiveStreams, Priority, Scheduler, SchedulerConfig
from sttd.errors import BackendError, Overloaded
from sttd.metrics import EngineLoad, Metrics
from sttd.session import TAIL_MS
from sttd.settings import Settings

__all__ = ["Engine"]

log = logging.getLogger(__name__)

# Rounds of calls on every lane at once that calibration times.
_CALIBRATION_ROUNDS = 3
# The longest `aclose` waits for the backend to release what it holds.
_CLOSE_TIMEOUT_S = 30.0
# Below this share of the lanes' time taken by the live streams' expected work (and with no
# final waiting too long), the engine has time to spare: live finals go `thorough` (whisper:
# beam 5 rather than greedy, 0.9 to 1.9 WER points better one session at a time, clean and in
# white noise or hum, for a few per cent more per final; at 4 sessions on 2 EPYC vCPUs it
# added 0.1-0.4 s to the finals' p95, so not near capacity: benchmarks/README.md). At 0.35, 3
# sessions on a noisy line still got the beam there (p95 1.49 s); at 0.25 they did not (1.14-1.24).
_SPARE_LOAD = 0.25
# Pieces of one file queued in the scheduler at once, per lane: enough that every lane has a
# full batch of background work (the scheduler's least is 4; short pieces make bigger ones)
# while the rest of the file waits; few enough that 15 s pieces clear within the timeout.
_FILE_PIECES_PER_LANE = 8


@attrs.define
class _Calibration:
    """What the start-up calibration left to say: why it failed (None: it did not, or a call
    has succeeded since)."""

    error: str | None = None


@attrs.frozen
class _BatchRunner:
    """Runs one batched backend call at a time per limiter token, in a worker thread."""

    backend: ASRBackend
    limiter: trio.CapacityLimiter
    metrics: Metrics
    capacity: CapacityModel
    # Why the start-up calibration failed, until a backend call succeeds (see `Engine.degraded`).
    calibration: _Calibration = attrs.field(factory=lambda: _Calibration())

    async def run(self, requests: Sequence[Request]) -> list[Result]:
        """The backend's results for `requests`; raises `BackendError`. Cancellation waits for
        the call in flight. What the call cost goes to the metrics and the capacity model."""
        started = trio.current_time()
        try:
            results = await self.timed(requests)
        finally:
            elapsed = trio.current_time() - started
            for kind in {request.kind for request in requests}:
                self.metrics.inference_duration_seconds.labels(kind).observe(elapsed)
        # A scheduler batch is of one kind (file pieces are finals by cost). A thorough file
        # batch is left out: the engine decodes files so only while it has time to spare, and
        # admission must price a final at what it costs near capacity (greedy).
        if not (requests[0].origin == "file" and requests[0].thorough):
            self.capacity.observe(requests[0].kind, elapsed,
                                  sum(request.duration_s for request in requests), len(requests))
        return results

    async def timed(self, requests: Sequence[Request]) -> list[Result]:
        """The backend's results for `requests`, recorded nowhere (`Engine.calibrate` times
        these itself)."""
        return await trio.to_thread.run_sync(self._call, list(requests), limiter=self.limiter)

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
        self.calibration.error = None  # the backend works: whatever failed at start is past
        return results


@attrs.define
class Engine:
    """The backend, and the scheduler that batches every session's requests for it."""

    backend: ASRBackend
    scheduler: Scheduler
    _runner: _BatchRunner
    _live_streams: LiveStreams
    # Live finals' audio and the streams' time already handed to the capacity model, seconds.
    _final_audio_s: float = attrs.field(init=False, default=0.0)
    _reported: tuple[float, float] = attrs.field(init=False, default=(0.0, 0.0))
    # Batches of file pieces in `transcribe_batch` now.
    _file_batches: int = attrs.field(init=False, default=0)

    @classmethod
    def from_settings(cls, backend: ASRBackend, settings: Settings, metrics: Metrics) -> Engine:
        """An engine for `backend`, with its lanes, limiter and scheduler from `settings`."""
        lanes, source = resolve_lanes(settings, backend.preferred_lanes)
        log.info("engine.lanes lanes=%d source=%s", lanes, source)
        # Speculative finals start this much before the end of speech is confirmed (never for
        # a streaming backend: admission turns speculation off for those).
        head_start_ms = (max(settings.vad_silence_ms - max(settings.speculate_ms, TAIL_MS), 0)
                         if settings.speculate_ms and not backend.incremental else 0)
        runner = _BatchRunner(backend, trio.CapacityLimiter(lanes), metrics,
                              CapacityModel(lanes, settings.max_load, settings.max_final_wait_s,
                                            settings.max_batch_ms / 1000,
                                            head_start_s=head_start_ms / 1000))
        live_streams = LiveStreams()
        config = SchedulerConfig.from_settings(settings, lanes=lanes)
        if backend.incremental:
            # A streaming model's partials are the decoding itself (each piece of audio once):
            # holding them back only moves that work into the finals, so they keep no pause.
            config = attrs.evolve(config, background_share=1.0)
        scheduler = Scheduler(runner.run, config, metrics, live_streams)
        return cls(backend, scheduler, runner, live_streams)

    @property
    def lanes(self) -> int:
        return self.scheduler.config.lanes

    @property
    def live_streams(self) -> int:
        """Live streams open now."""
        return self._live_streams.count

    def capacity(self) -> CapacityStatistics:
        """What the engine measured it can hold, as of now."""
        model = self._runner.capacity
        stream_s = self._live_streams.stream_seconds()
        audio_s, seen_s = self._reported
        model.observe_streams(self._final_audio_s - audio_s, stream_s - seen_s)
        self._reported = (self._final_audio_s, stream_s)
        return model.statistics()

    def load(self) -> EngineLoad:
        """The measured capacity and what the live streams are expected to need of it."""
        stats = self.capacity()
        demand = stats.stream_demand
        load = None if demand is None else self.live_streams * demand / self.lanes
        return EngineLoad(stats.capacity, demand, load)

    def admit_stream(self) -> None:
        """Raise `Overloaded` if one more live stream would not fit the measured capacity.

        Admitting it would make every admitted stream's finals late: refusing the newcomer at
        connect keeps them whole. An idle engine always takes one: on a machine too slow for
        the latency target with this model (capacity 0), one stream served late beats none.
        """
        stats = self.capacity()
        if stats.capacity is not None and self.live_streams >= max(stats.capacity, 1):
            demand_ms = round(1000 * (stats.stream_demand or 0.0))
            raise Overloaded(
                f"the server is at its measured capacity of {stats.capacity} live streams "
                f"(each needs about {demand_ms} ms of engine time a second on this machine, "
                f"STT_MAX_LOAD={self._runner.capacity.max_load:g}); retry later")

    async def calibrate(self) -> None:
        """Measure what calls cost on this machine: a final of a built-in clip's first
        `PRIOR_UTTERANCE_S` and a partial of all of it, on every lane at once (as under load),
        three rounds after a warm-up, the slowest of each kind counted (for an incremental
        backend, the clip as one utterance: partials half a second apart, then its final).
        Call it before `run`. Blocks for a few backend calls; a failure is logged, and the
        costs are then learnt from live traffic alone."""
        clip = _calibration_clip()
        # A final as long as the capacity model's utterances until it sees real ones (see
        # sttd.engine._capacity); an incremental backend's is its whole utterance, the clip.
        final_audio = (clip if self.backend.incremental
                       else clip[: round(PRIOR_UTTERANCE_S * SAMPLE_RATE_HZ)])
        worst = {"final": 0.0, "partial": 0.0}

        async def timed(request: Request) -> None:
            started = trio.current_time()
            await self._runner.timed([request])
            worst[request.kind] = max(worst[request.kind], trio.current_time() - started)

        async def utterance(stream_id: str) -> None:
            """An incremental backend's utterance: its partials each add half a second, its
            final the rest (each call timed on its own)."""
            step = SAMPLE_RATE_HZ // 2
            for end in range(step, clip.size, step):
                await timed(Request(clip[:end], "partial", stream_id=stream_id))
            await timed(Request(clip, "final", stream_id=stream_id))

        try:
            if self.backend.incremental:
                await utterance("calibration:warm-up")  # not counted: first calls cost more
                worst = {"final": 0.0, "partial": 0.0}
                for round_ in range(_CALIBRATION_ROUNDS):
                    async with trio.open_nursery() as nursery:
                        for lane in range(self.lanes):
                            nursery.start_soon(utterance, f"calibration:{round_}:{lane}")
            else:
                # The partial of the whole clip: a long one.
                for request in (Request(final_audio, "final"), Request(clip, "partial")):
                    await self._runner.timed([request])  # a warm-up, not counted
                    for _ in range(_CALIBRATION_ROUNDS):
                        async with trio.open_nursery() as nursery:
                            for _ in range(self.lanes):
                                nursery.start_soon(timed, request)
        except* BackendError as failed:
            log.warning("engine.calibration_failed backend=%s", self.backend.name,
                        exc_info=True)
            # /health says so until a call succeeds: a server whose backend cannot serve (a
            # remote one with a wrong URL, say) must not pass a health-checked rollout.
            self._runner.calibration.error = str(failed.exceptions[0])
        else:
            # The slowest call of each kind: a first estimate on the safe side, which live
            # traffic then corrects (rounds on a shared machine differ by half).
            model = self._runner.capacity
            model.observe("final", worst["final"], final_audio.size / SAMPLE_RATE_HZ, 1)
            model.observe("partial", worst["partial"], clip.size / SAMPLE_RATE_HZ, 1)
        stats = self.capacity()
        log.info("engine.calibrated final_s_per_audio_s=%.4f partial_s=%.4f capacity=%s",
                 stats.final_s_per_audio_s or 0.0, stats.partial_s or 0.0, stats.capacity)

    @property
    def backend_name(self) -> str:
        return self.backend.name

    def check_language(self, language: str | None) -> None:
        """Raise `UnsupportedLanguage` if the backend cannot transcribe `language`."""
        self.backend.check_language(language)

    def check_task(self, task: str) -> None:
        """Raise `Unsupported` if the backend cannot do `task`."""
        self.backend.check_task(task)

    def check_hotwords(self, hotwords: Sequence[str]) -> None:
        """Raise `Unsupported` if the backend cannot take `hotwords`."""
        self.backend.check_hotwords(hotwords)

    def overloaded(self) -> bool:
        """Whether finals wait too long in the queue: new sessions should be refused."""
        return self.scheduler.overloaded()

    def degraded(self) -> str | None:
        """Why the engine is degraded (a backend call stuck past the timeout, a backend that
        reports trouble, like a remote one whose upstreams all fail, or one that failed its
        start-up calibration and has not served a call since), or None."""
        calibration = self._runner.calibration.error
        return (self.scheduler.degraded() or self.backend.degraded()
                or (None if calibration is None
                    else f"the backend failed its start-up calibration: {calibration}"))

    def live_stream(self) -> contextlib.AbstractContextManager[None]:
        """Count one live stream while the block runs (a session, for its lifetime): file
        pieces yield to live traffic only while some is open."""
        return self._live_streams.counting()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the scheduler until cancelled."""
        await self.scheduler.run(task_status=task_status)

    async def transcribe(self, request: Request, *, started: trio.Event | None = None) -> Result:
        """Transcribe one live request; `started` is set when its batch starts. A final is
        decoded `thorough` while the engine has time to spare (`has_time_to_spare`).

        Raises `BackendError` (`InferenceTimeout` past STT_INFERENCE_TIMEOUT_S). Cancelling
        withdraws it if it has not started.
        """
        if request.kind == "final":
            self._final_audio_s += request.duration_s
            if self.backend.decodes_thoroughly and self.has_time_to_spare():
                request = attrs.evolve(request, thorough=True)
                self._runner.metrics.thorough_finals_total.inc()
        return await self.scheduler.submit(request, started=started)

    def has_time_to_spare(self) -> bool:
        """Whether the live streams leave the engine time for thorough finals (`_SPARE_LOAD`):
        their expected work is a small share of the lanes' time and no final waits too long."""
        load = self.load().load
        return load is not None and load <= _SPARE_LOAD and not self.overloaded()

    async def transcribe_batch(self, requests: Sequence[Request]) -> list[Result]:
        """Transcribe file pieces, below live traffic in priority; one result per request.

        The pieces are decoded `thorough` when the engine has time to spare and no other
        file's batch is in flight (whisper: beam 5, 1.2 WER points better on the dev set for
        x1.28 the time, `benchmarks/file_beam.py`); a file that shares the engine with others
        or with a full load of live streams goes greedy, batch by batch.

        Raises the first `BackendError` of its pieces (the others are withdrawn or dropped).
        """
        if (self.backend.decodes_thoroughly and self._file_batches == 0
                and self.has_time_to_spare()):
            requests = [attrs.evolve(request, thorough=True) for request in requests]
            self._runner.metrics.thorough_file_pieces_total.inc(len(requests))
        results: list[Result | None] = [None] * len(requests)
        failure: BackendError | None = None
        # A piece's STT_INFERENCE_TIMEOUT_S runs from when it is queued, so a batch's pieces go
        # to the scheduler a few at a time, in order: the last of a batch of long pieces must
        # not time out waiting behind its own file's others.
        queued = trio.Semaphore(_FILE_PIECES_PER_LANE * self.lanes)

        async def one(index: int) -> None:
            async with queued:
                results[index] = await self.scheduler.submit(requests[index],
                                                             priority=Priority.FILE)

        self._file_batches += 1
        try:
            async with trio.open_nursery() as nursery:
                for index in range(len(requests)):
                    nursery.start_soon(one, index)
        except* BackendError as failed:
            # Anything else (Cancelled, a bug) is not matched here and goes on as it came.
            failure = _first(failed)
        finally:
            self._file_batches -= 1
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


def _calibration_clip() -> npt.NDArray[np.float32]:
    """5 s of read English speech shipped with sttd (calibration.wav: LibriVox's public-domain
    reading of Sense and Sensibility, from pocketsphinx's tests; sttd/engine/SOURCES.md)."""
    return decode_wav((importlib.resources.files(__package__) / "calibration.wav").read_bytes())


def _first(group: BaseExceptionGroup[BackendError]) -> BackendError:
    """The first `BackendError` in `group`, however deeply nested."""
    first = group.exceptions[0]
    return first if isinstance(first, BackendError) else _first(first)
