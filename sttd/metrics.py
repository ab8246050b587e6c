"""Every Prometheus metric sttd exports, defined against a registry the caller passes in.

Names use the ``sttd_`` prefix and base units; labels come from closed sets only.

With several worker processes (``sttd serve --workers``), prometheus-client's multiprocess mode
is on (``PROMETHEUS_MULTIPROC_DIR``, set by the supervisor): every worker's counters,
histograms and gauges are kept in that directory, and `Metrics.exposition` on any worker
reports them summed over the workers (``sttd_sessions_active`` over the live ones,
``sttd_engine_ready`` as the least ready). The gauges computed at scrape time (queue depths,
measured capacity and load) are then the scraped worker's own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Final, Literal, get_args

import glob
import os

import attrs
import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["SESSION_OUTCOMES", "EngineLoad", "Metrics", "QueueDepths", "SessionOutcome"]

# How a WebSocket session can end (the `outcome` label of sttd_sessions_total): the client's end;
# the client went away; refused at connect; overloaded (too many dropped frames); a server bug;
# idle; the session time limit; the server drained; a message over the size limit; a client
# that stopped reading.
SessionOutcome = Literal["ended", "client_gone", "rejected", "overloaded", "internal_error",
                         "idle", "session_limit", "drained", "refused", "slow_client"]
SESSION_OUTCOMES: Final = get_args(SessionOutcome)

_LATENCY_BUCKETS_S = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
_FRAME_LAG_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_INFERENCE_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0)


@attrs.frozen
class QueueDepths:
    """Summed queue depths over live sessions."""

    audio_frames: int
    output_messages: int
    max_backlog_s: float = 0.0


@attrs.frozen
class EngineLoad:
    """What the engine measured it can hold, and what it holds."""

    capacity_streams: int | None  # None until the costs are known
    stream_demand_s: float | None  # lane-seconds one live stream needs per second
    load: float | None  # the live streams' expected work, as a share of the lanes' time


@attrs.define
class Metrics:
    """The server's metrics; construct one per registry with `Metrics.create`."""

    registry: CollectorRegistry
    sessions_active: Gauge
    sessions_total: Counter
    audio_received_seconds_total: Counter
    partials_sent_total: Counter
    finals_sent_total: Counter
    frames_dropped_total: Counter
    audio_skipped_seconds_total: Counter
    warnings_total: Counter
    partials_dropped_total: Counter
    partials_failed_total: Counter
    speculative_finals_total: Counter
    thorough_finals_total: Counter
    thorough_file_pieces_total: Counter
    errors_total: Counter
    inference_duration_seconds: Histogram
    final_latency_seconds: Histogram
    frame_lag_seconds: Histogram
    http_requests_total: Counter
    engine_ready: Gauge
    scheduler_batch_size: Histogram
    scheduler_queue_wait_seconds: Histogram
    scheduler_requests_total: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> Metrics:
        """Register all metrics on `registry`."""
        return cls(
            registry=registry,
            sessions_active=Gauge(
                "sttd_sessions_active", "WebSocket sessions open now.", registry=registry,
                multiprocess_mode="livesum",
            ),
            sessions_total=Counter(
                "sttd_sessions_total", "WebSocket sessions ended, by outcome.", ["outcome"],
                registry=registry,
            ),
            audio_received_seconds_total=Counter(
                "sttd_audio_received_seconds_total", "Seconds of audio received over WebSockets.",
                registry=registry,
            ),
            partials_sent_total=Counter(
                "sttd_partials_sent_total", "Partial transcripts sent.", registry=registry
            ),
            finals_sent_total=Counter(
                "sttd_finals_sent_total", "Final transcripts sent.", registry=registry
            ),
            frames_dropped_total=Counter(
                "sttd_frames_dropped_total",
                "Audio frames dropped because a session's input queue was full.",
                registry=registry,
            ),
            audio_skipped_seconds_total=Counter(
                "sttd_audio_skipped_seconds_total",
                "Seconds of audio lost because a session's input queue was full (frames dropped).",
                registry=registry,
            ),
            warnings_total=Counter(
                "sttd_warnings_total", "Warnings sent to clients, by code.", ["code"],
                registry=registry,
            ),
            partials_dropped_total=Counter(
                "sttd_partials_dropped_total",
                "Partial transcripts dropped because a session's output queue was 80% full.",
                registry=registry,
            ),
            partials_failed_total=Counter(
                "sttd_partials_failed_total",
                "Partial decodes the engine failed, by error code: not sent to the client (the "
                "utterance's final answers for it, or reports its own failure).",
                ["code"], registry=registry,
            ),
            speculative_finals_total=Counter(
                "sttd_speculative_finals_total",
                "Finals decoded early, while the VAD waited out the silence after the speech, by "
                "outcome: used as the utterance's final, or dropped (speech resumed).",
                ["outcome"], registry=registry,
            ),
            thorough_finals_total=Counter(
                "sttd_thorough_finals_total",
                "Live finals decoded thoroughly (whisper: with the beam) because the engine had "
                "time to spare; the others are decoded greedily.",
                registry=registry,
            ),
            thorough_file_pieces_total=Counter(
                "sttd_thorough_file_pieces_total",
                "Pieces of uploaded files decoded thoroughly (whisper: with the beam) because the "
                "engine had time to spare and no other file was being decoded.",
                registry=registry,
            ),
            errors_total=Counter(
                "sttd_errors_total", "Errors reported to clients, by code.", ["code"],
                registry=registry,
            ),
            inference_duration_seconds=Histogram(
                "sttd_inference_duration_seconds", "Backend call duration, by kind.", ["kind"],
                buckets=_INFERENCE_BUCKETS_S, registry=registry,
            ),
            final_latency_seconds=Histogram(
                "sttd_final_latency_seconds",
                "From the audio (or commit) that ended an utterance arriving to its final sent.",
                buckets=_LATENCY_BUCKETS_S, registry=registry,
            ),
            frame_lag_seconds=Histogram(
                "sttd_frame_lag_seconds",
                "From an audio frame read off the WebSocket to its session processing it (VAD).",
                buckets=_FRAME_LAG_BUCKETS_S, registry=registry,
            ),
            http_requests_total=Counter(
                "sttd_http_requests_total", "HTTP requests, by route and status.",
                ["route", "status"], registry=registry,
            ),
            engine_ready=Gauge(
                "sttd_engine_ready", "1 once the speech engine is loaded, else 0.",
                registry=registry, multiprocess_mode="livemin",
            ),
            scheduler_batch_size=Histogram(
                "sttd_scheduler_batch_size", "Requests per batched backend call.",
                buckets=_BATCH_BUCKETS, registry=registry,
            ),
            scheduler_queue_wait_seconds=Histogram(
                "sttd_scheduler_queue_wait_seconds",
                "Time a request waited in the scheduler before its batch started, by kind.",
                ["kind"], buckets=_INFERENCE_BUCKETS_S, registry=registry,
            ),
            scheduler_requests_total=Counter(
                "sttd_scheduler_requests_total",
                "Scheduler requests by kind and outcome (ok, failed, timeout, withdrawn).",
                ["kind", "outcome"], registry=registry,
            ),
        )

    def watch_queues(self, depths: Callable[[], QueueDepths]) -> None:
        """Export queue depths read from `depths` at scrape time."""
        self.registry.register(_QueueCollector(depths))

    def watch_engine(self, load: Callable[[], EngineLoad | None]) -> None:
        """Export the engine's measured capacity and load, read from `load` at scrape time
        (None while no engine is loaded)."""
        self.registry.register(_EngineCollector(load))

    def workers(self) -> dict[str, float] | None:
        """With several workers, what they hold together: open sessions, whether every live
        engine is ready (1) or not (0), and how many workers are alive (each has its own
        ``sttd_engine_ready`` file until the supervisor finds it dead and removes it); None for
        a single process."""
        directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if not directory:
            return None
        from prometheus_client import multiprocess

        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
        live = len(glob.glob(os.path.join(glob.escape(directory), "gauge_livemin_*.db")))
        totals = {"sessions": 0.0, "ready": 0.0, "live": float(live)}
        for family in merged.collect():
            for sample in family.samples:
                if sample.name == "sttd_sessions_active":
                    totals["sessions"] += sample.value
                elif sample.name == "sttd_engine_ready":
                    totals["ready"] = sample.value
        return totals

    def exposition(self) -> bytes:
        """The text a scrape of /metrics returns: this process's metrics, or, with several
        workers, all of theirs (see the module docstring)."""
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
        kept = frozenset(getattr(self, field.name)._name for field in attrs.fields(Metrics)
                         if field.name != "registry")
        merged.register(_ScrapeTime(self.registry, kept))
        return generate_latest(merged)


@attrs.frozen
class _ScrapeTime(Collector):
    """The families of `registry` computed at scrape time: all but those `kept` in files."""

    registry: CollectorRegistry
    kept: frozenset[str]

    def collect(self) -> Iterable[Metric]:
        return [family for family in self.registry.collect() if family.name not in self.kept]


@attrs.frozen
class _EngineCollector(Collector):
    load: Callable[[], EngineLoad | None]

    def collect(self) -> Iterable[GaugeMetricFamily]:
        now = self.load()
        if now is None:
            return
        if now.capacity_streams is not None:
            yield GaugeMetricFamily(
                "sttd_capacity_streams", "Live streams the engine measured it can hold "
                "(STT_MAX_LOAD of its lanes' time); newcomers past it are refused.",
                value=now.capacity_streams)
        if now.stream_demand_s is not None:
            yield GaugeMetricFamily(
                "sttd_stream_demand_seconds", "Engine lane-seconds one live stream needs per "
                "second: its finals and one partial a second while it speaks, as measured.",
                value=now.stream_demand_s)
        if now.load is not None:
            yield GaugeMetricFamily(
                "sttd_engine_load", "The live streams' expected work as a share of the "
                "engine's lane time.", value=now.load)


@attrs.frozen
class _QueueCollector(Collector):
    depths: Callable[[], QueueDepths]

    def collect(self) -> Iterable[GaugeMetricFamily]:
        now = self.depths()
        family = GaugeMetricFamily(
            "sttd_queue_depth", "Items buffered in session queues, summed over sessions.",
            labels=["queue"],
        )
        family.add_metric(["audio_in"], now.audio_frames)
        family.add_metric(["output"], now.output_messages)
        yield family
        yield GaugeMetricFamily(
            "sttd_session_backlog_seconds_max",
            "Largest backlog of any session: audio received but not yet processed.",
            value=now.max_backlog_s)
        tasks = _live_tasks()
        if tasks is not None:
            yield GaugeMetricFamily(
                "sttd_tasks_live", "Trio tasks alive in the server (leak check).", value=tasks)


def _live_tasks() -> int | None:
    """Tasks in the trio task tree, or None outside trio (a scrape from another thread)."""
    try:
        root = trio.lowlevel.current_root_task()
    except RuntimeError:
        return None
    if root is None:
        return None
    count = 0
    stack = [root]
    while stack:
        task = stack.pop()
        count += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return count
