"""Admission from measured capacity: the cost model (sans I/O), the engine's calibration, and
refusals at connect on the real server."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import httpx
import numpy as np
import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry
from trio_websocket import ConnectionRejected, open_websocket_url

from sttd.audio import pcm16_to_float32
from sttd.backends import Request
from sttd.backends.mock import MockBackend
from sttd.engine import PARTIALS_PER_SPEECH_S, PRIOR_UTTERANCE_S, CapacityModel, Engine
from sttd.errors import Overloaded
from sttd.metrics import Metrics
from sttd.settings import Settings
from tests.conftest import (
    RunningServer,
    load_pcm,
    receive_until_close,
    reference_texts,
    send_pcm,
    silence,
)

TIMEOUT_S = 30


def test_capacity_is_the_lanes_time_over_one_streams_measured_demand() -> None:
    model = CapacityModel(lanes=2, max_load=0.75, max_final_wait_s=10.0, max_batch_s=0.0)
    assert model.capacity is None  # nothing measured yet: no limit of the model's own
    model.observe("final", 0.3, audio_s=3.0, requests=1)  # 0.1 s a second of speech
    assert model.capacity is None  # partials not seen yet
    model.observe("partial", 0.4, audio_s=4.0, requests=8)  # 50 ms a partial
    # demand = 0.7 (speech share before any stream) * (0.1 + 1 partial/s * 0.05) = 0.105
    assert model.stream_demand == pytest.approx(0.7 * (0.1 + PARTIALS_PER_SPEECH_S * 0.05))
    assert model.capacity == int(2 * 0.75 / 0.105)  # 14: the lanes' time binds first
    assert model.statistics().load_capacity == 14
    assert model.burst_capacity == int(2 * 10.0 / (0.1 * 3.0))  # 3 s utterances: 66


def test_a_burst_of_finals_bounds_the_capacity_too() -> None:
    """Streams that end their sentences together: every final must clear within
    STT_MAX_FINAL_WAIT_S, after a partial batch that may hold a lane."""
    model = CapacityModel(lanes=2, max_load=0.75, max_final_wait_s=1.0, max_batch_s=0.25)
    model.observe("final", 0.12, audio_s=4.0, requests=1)  # 0.03 s a second of speech
    model.observe("partial", 0.01, audio_s=1.0, requests=1)
    stats = model.statistics()
    assert stats.utterance_s == pytest.approx(3.0 + 0.1 * (4.0 - 3.0))
    per_final_s = 0.03 * stats.utterance_s
    assert stats.burst_capacity == int(2 * (1.0 - 0.25) / per_final_s)  # 16
    assert stats.load_capacity is not None and stats.load_capacity > 16
    assert model.capacity == stats.burst_capacity


def test_costs_follow_what_the_machine_does_now() -> None:
    model = CapacityModel(lanes=1, max_load=1.0, max_final_wait_s=10.0, max_batch_s=0.0)
    model.observe("final", 0.3, audio_s=3.0, requests=1)
    model.observe("partial", 0.05, audio_s=1.0, requests=1)
    before = model.capacity
    for _ in range(50):  # a neighbour takes half the CPU: every call twice as long
        model.observe("final", 0.6, audio_s=3.0, requests=1)
        model.observe("partial", 0.1, audio_s=1.0, requests=1)
    assert before is not None and model.capacity == pytest.approx(before / 2, abs=1)


def test_the_speech_share_is_learnt_from_the_streams() -> None:
    model = CapacityModel(lanes=1, max_load=1.0, max_final_wait_s=10.0, max_batch_s=0.0)
    model.observe("final", 0.1, audio_s=1.0, requests=1)
    model.observe("partial", 0.1, audio_s=1.0, requests=1)
    assert model.statistics().speech_share == 0.7
    model.observe_streams(final_audio_s=3.0, stream_s=10.0)  # too little time to tell yet
    assert model.statistics().speech_share == 0.7
    for _ in range(20):
        model.observe_streams(final_audio_s=9.0, stream_s=30.0)  # speech 30% of the time
    assert model.statistics().speech_share == pytest.approx(0.3, abs=0.01)
    model.observe_streams(final_audio_s=0.0, stream_s=3000.0)  # silence: floor, not zero
    assert model.statistics().speech_share >= 0.2


def test_a_backend_that_costs_nothing_sets_no_limit() -> None:
    model = CapacityModel(lanes=1, max_load=0.75, max_final_wait_s=1.0, max_batch_s=0.25)
    model.observe("final", 0.0, audio_s=3.0, requests=1)
    model.observe("partial", 0.0, audio_s=3.0, requests=1)
    assert model.capacity is None


def _clocked_mock(clock: trio.testing.MockClock, cost_s: float,
                  seen: list[Request] | None = None, *, per_request: bool = False,
                  thorough: bool = False) -> MockBackend:
    """The mock backend, each call (or, `per_request`, each request in it) costing `cost_s` on
    the trio clock the engine times it with; the requests it gets go to `seen`. With
    `thorough`, it says it has a thorough way to decode (as whisper's beam)."""

    class Clocked(MockBackend):  # type: ignore[misc]
        @property
        def decodes_thoroughly(self) -> bool:
            return thorough

        def transcribe(self, requests):  # type: ignore[no-untyped-def]
            if seen is not None:
                seen.extend(requests)
            trio.from_thread.run_sync(clock.jump, cost_s * (len(requests) if per_request else 1))
            return super().transcribe(requests)

    backend: MockBackend = Clocked.from_directory()
    return backend


async def test_the_engine_calibrates_on_every_lane_and_refuses_past_capacity(
        mock_clock: trio.testing.MockClock) -> None:
    seen: list[Request] = []
    engine = Engine.from_settings(_clocked_mock(mock_clock, 0.02, seen), Settings(backend="mock", inference_lanes=2),
                                  Metrics.create(CollectorRegistry()))
    await engine.calibrate()
    # For each kind, a warm-up call, then three rounds on both lanes at once.
    assert [r.kind for r in seen] == ["final"] * 7 + ["partial"] * 7
    # The final as long as the utterances the model assumes, priced per its own seconds: each
    # call here costs the same whatever its audio (as a padded window nearly does), so a final
    # of that length is priced as the partial's call.
    assert {r.duration_s for r in seen if r.kind == "final"} == {PRIOR_UTTERANCE_S}
    stats = engine.capacity()
    assert stats.final_s_per_audio_s is not None and stats.partial_s is not None
    assert stats.final_s_per_audio_s * PRIOR_UTTERANCE_S == pytest.approx(stats.partial_s)
    assert stats.partial_s is not None and stats.partial_s >= 0.02
    assert stats.capacity is not None and stats.capacity > 0
    held = []
    for _ in range(stats.capacity):
        engine.admit_stream()
        held.append(engine.live_stream())
        held[-1].__enter__()
    with pytest.raises(Overloaded, match=f"measured capacity of {stats.capacity} live streams"):
        engine.admit_stream()
    held.pop().__exit__(None, None, None)
    engine.admit_stream()  # room again
    for hold in held:
        hold.__exit__(None, None, None)


async def _running_engine(nursery: trio.Nursery, backend: MockBackend, metrics: Metrics,
                          **settings: Any) -> Engine:
    """An engine on `backend`, calibrated and running in `nursery` (2 lanes unless said)."""
    engine = Engine.from_settings(
        backend, Settings(**{"backend": "mock", "inference_lanes": 2, "batch_window_ms": 0.0,
                             **settings}), metrics)
    await engine.calibrate()
    await nursery.start(engine.run)
    return engine


async def test_finals_go_thorough_only_while_the_engine_has_time_to_spare(
        nursery: trio.Nursery, mock_clock: trio.testing.MockClock) -> None:
    seen: list[Request] = []
    metrics = Metrics.create(CollectorRegistry())
    engine = await _running_engine(nursery, _clocked_mock(mock_clock, 0.02, seen,
                                                         thorough=True), metrics)
    seen.clear()
    clip = pcm16_to_float32(load_pcm("ps_goforward"))
    assert engine.has_time_to_spare()
    assert (await engine.transcribe(Request(clip, "final"))).text == reference_texts()["ps_goforward"]
    await engine.transcribe(Request(clip, "partial"))  # never: partials are redone anyway
    with contextlib.ExitStack() as held:
        # Live streams whose expected work fills more of the lanes' time than spare allows.
        while (engine.load().load or 0.0) <= 0.35:
            held.enter_context(engine.live_stream())
        assert not engine.has_time_to_spare()
        await engine.transcribe(Request(clip, "final"))
    assert engine.has_time_to_spare()
    assert [(r.kind, r.thorough) for r in seen] == [("final", True), ("partial", False),
                                                    ("final", False)]
    assert metrics.registry.get_sample_value("sttd_thorough_finals_total") == 1


async def test_a_file_goes_thorough_only_alone_on_an_engine_with_time_to_spare(
        nursery: trio.Nursery, mock_clock: trio.testing.MockClock) -> None:
    """An idle engine gives a file's pieces the dearer decode, one file at a time, and keeps
    what they cost out of the capacity model, which prices finals as they cost under load."""
    seen: list[Request] = []
    metrics = Metrics.create(CollectorRegistry())
    engine = await _running_engine(nursery, _clocked_mock(mock_clock, 0.02, seen,
                                                         thorough=True), metrics)
    seen.clear()
    clip = pcm16_to_float32(load_pcm("ps_goforward"))
    pieces = [Request(clip, "final", origin="file")] * 2
    cost = engine.capacity().final_s_per_audio_s
    results = await engine.transcribe_batch(pieces)
    assert [r.text for r in results] == [reference_texts()["ps_goforward"]] * 2
    assert [r.thorough for r in seen] == [True, True]
    assert engine.capacity().final_s_per_audio_s == cost  # not learnt from
    assert metrics.registry.get_sample_value("sttd_thorough_file_pieces_total") == 2

    seen.clear()
    other = pcm16_to_float32(load_pcm("ps_cards_001"))
    async with trio.open_nursery() as files:  # two files at once (trio picks which starts)
        files.start_soon(engine.transcribe_batch, pieces)
        files.start_soon(engine.transcribe_batch, [Request(other, "final", origin="file")])
    # Whichever came first got the beam, all of its pieces; the other went greedy.
    flags = {size: {r.thorough for r in seen if r.audio.size == size}
             for size in (clip.size, other.size)}
    assert sorted(flags.values(), key=sorted) == [{False}, {True}]
    assert len(seen) == 3
    counted = 2 + sum(r.thorough for r in seen)  # the first file's, and the winner's

    seen.clear()
    with contextlib.ExitStack() as held:
        while (engine.load().load or 0.0) <= 0.35:
            held.enter_context(engine.live_stream())
        cost = engine.capacity().final_s_per_audio_s
        await engine.transcribe_batch(pieces)
    assert [r.thorough for r in seen] == [False, False]
    assert engine.capacity().final_s_per_audio_s != cost  # a greedy file batch is learnt from
    assert metrics.registry.get_sample_value("sttd_thorough_file_pieces_total") == counted


async def test_a_backend_without_a_thorough_way_gets_no_thorough_request(
        nursery: trio.Nursery, mock_clock: trio.testing.MockClock) -> None:
    """On an idle engine whose backend decodes one way only, nothing is marked or counted
    thorough, and what its file batches cost is learnt like any final's."""
    seen: list[Request] = []
    metrics = Metrics.create(CollectorRegistry())
    engine = await _running_engine(nursery, _clocked_mock(mock_clock, 0.02, seen), metrics)
    assert engine.has_time_to_spare()
    seen.clear()
    clip = pcm16_to_float32(load_pcm("ps_goforward"))
    await engine.transcribe(Request(clip, "final"))
    cost = engine.capacity().final_s_per_audio_s
    await engine.transcribe_batch([Request(clip, "final", origin="file")] * 2)
    assert [r.thorough for r in seen] == [False, False, False]
    assert metrics.registry.get_sample_value("sttd_thorough_finals_total") == 0
    assert metrics.registry.get_sample_value("sttd_thorough_file_pieces_total") == 0
    assert engine.capacity().final_s_per_audio_s != cost  # the file batch was learnt from


async def test_a_long_file_batch_does_not_time_out_behind_its_own_pieces(
        nursery: trio.Nursery, mock_clock: trio.testing.MockClock) -> None:
    """Each piece's STT_INFERENCE_TIMEOUT_S runs from when it is queued: a batch whose pieces
    take far longer in all than the timeout still completes when each takes much less."""
    engine = await _running_engine(nursery, _clocked_mock(mock_clock, 0.5, per_request=True),
                                   Metrics.create(CollectorRegistry()), inference_lanes=1,
                                   inference_timeout_s=5.0)
    clip = pcm16_to_float32(load_pcm("ps_goforward"))
    started = trio.current_time()
    results = await engine.transcribe_batch([Request(clip, "final", origin="file")] * 32)
    assert trio.current_time() - started >= 16.0  # longer in all than one piece may take
    assert [r.text for r in results] == [reference_texts()["ps_goforward"]] * 32


async def test_an_engine_too_slow_for_the_target_still_takes_one_stream(
        mock_clock: trio.testing.MockClock) -> None:
    """Whisper base on a slow 2-core machine measured capacity 0 and refused every session:
    an idle server must serve one, late, rather than none."""

    engine = Engine.from_settings(_clocked_mock(mock_clock, 5.0), Settings(backend="mock"),
                                  Metrics.create(CollectorRegistry()))
    await engine.calibrate()
    assert engine.capacity().capacity == 0
    engine.admit_stream()
    with engine.live_stream():
        with pytest.raises(Overloaded, match="measured capacity of 0 live streams"):
            engine.admit_stream()
    engine.admit_stream()


async def test_a_failed_calibration_shows_in_health_until_a_call_succeeds(
        nursery: trio.Nursery) -> None:
    """A backend that cannot serve at start (a remote one with a wrong URL) must not pass a
    health-checked rollout: the engine says it is degraded until a call of its succeeds."""
    from sttd.errors import BackendError

    class Broken(MockBackend):  # type: ignore[misc]
        broken = True

        def transcribe(self, requests):  # type: ignore[no-untyped-def]
            if Broken.broken:
                raise BackendError("HTTP 404: no such route")
            return super().transcribe(requests)

    engine = await _running_engine(nursery, Broken.from_directory(),
                                   Metrics.create(CollectorRegistry()))
    reason = engine.degraded()
    assert reason is not None and "calibration" in reason and "HTTP 404" in reason
    Broken.broken = False
    await engine.transcribe(Request(np.zeros(16000, np.float32), "final"))
    assert engine.degraded() is None


def _fill(server: RunningServer, capacity_cost_s: float) -> None:
    """Teach the server's engine that one stream costs `capacity_cost_s` lane-seconds a second
    of speech: as if it had measured a much slower machine."""
    engine = server.state.engine
    assert engine is not None
    model = engine._runner.capacity
    for _ in range(100):
        model.observe("final", capacity_cost_s, audio_s=1.0, requests=1)
        model.observe("partial", capacity_cost_s, audio_s=1.0, requests=1)


async def test_sessions_past_the_measured_capacity_are_refused_at_connect(
        server: RunningServer) -> None:
    _fill(server, 0.35)  # demand 0.7 * 0.7 = 0.49 lane-s/s: one stream fits in 0.75 of a lane
    refs = reference_texts()
    with trio.fail_after(TIMEOUT_S):
        async with open_websocket_url(server.ws_url()) as live:
            assert json.loads(await live.get_message())["type"] == "ready"
            # A second one at once: the first is counted from the moment it was admitted.
            async with open_websocket_url(server.ws_url()) as refused:
                messages, code = await receive_until_close(refused)
            assert code == 1013
            [error] = messages
            assert error["code"] == "overloaded"
            assert "measured capacity of 1 live streams" in error["message"]
            async with httpx.AsyncClient(base_url=server.http_url) as http:
                health = (await http.get("/health")).json()
                metrics = (await http.get("/metrics")).text
            assert health["capacity"]["streams"] == 1
            assert health["capacity"]["load"] == pytest.approx(0.49, abs=0.01)
            assert "sttd_capacity_streams 1.0" in metrics
            # Deepgram's clients are told before the upgrade, with when to come back.
            with pytest.raises(ConnectionRejected) as rejected:
                async with open_websocket_url(server.ws_url().replace(
                        "/v1/stt/ws?call_id=test&sample_rate=16000",
                        "/v1/listen?encoding=linear16&sample_rate=16000")):
                    pass
            assert rejected.value.status_code == 503
            assert dict(rejected.value.headers or [])[b"retry-after"] == b"5"
            # The admitted session is whole.
            await send_pcm(live, np.concatenate([load_pcm("ps_cards_001"), silence(1.0)]))
            await live.send_message(json.dumps({"type": "end"}))
            finals, live_code = await receive_until_close(live)
    assert live_code == 1000
    assert [m["text"] for m in finals if m["type"] == "final"] == [refs["ps_cards_001"]]
    assert server.state.metrics.sessions_total.labels("rejected")._value.get() == 2


def test_max_load_zero_turns_the_limit_off_but_keeps_measuring() -> None:
    model = CapacityModel(lanes=1, max_load=0.0, max_final_wait_s=1.0, max_batch_s=0.25)
    model.observe("final", 1.0, audio_s=1.0, requests=1)
    model.observe("partial", 1.0, audio_s=1.0, requests=1)
    assert model.capacity is None
    assert model.stream_demand == pytest.approx(0.7 * 2.0)


def test_a_speculative_head_start_widens_the_burst_budget() -> None:
    """Finals decoded while the VAD waits out its silence start that much earlier, so a burst
    of them has that much longer to clear."""
    plain = CapacityModel(lanes=2, max_load=1.0, max_final_wait_s=1.0, max_batch_s=0.5)
    early = CapacityModel(lanes=2, max_load=1.0, max_final_wait_s=1.0, max_batch_s=0.5,
                          head_start_s=0.3)
    for model in (plain, early):
        model.observe("final", 0.3, audio_s=3.0, requests=1)  # 0.1 s a second of speech
        model.observe("partial", 0.01, audio_s=1.0, requests=1)
    per_final_s = 0.1 * (3.0 + 0.1 * (3.0 - 3.0))
    assert plain.burst_capacity == int(2 * 0.5 / per_final_s)  # 3
    assert early.burst_capacity == int(2 * 0.8 / per_final_s)  # 5


def test_the_engine_gives_speculation_its_head_start() -> None:
    backend = MockBackend.from_directory()
    metrics = Metrics.create(CollectorRegistry())
    on = Engine.from_settings(backend, Settings(backend="mock"), metrics)
    off = Engine.from_settings(backend, Settings(backend="mock", speculate_ms=0),
                               Metrics.create(CollectorRegistry()))
    # 500 ms of silence ends speech; the final starts after 200 of them.
    assert on._runner.capacity.head_start_s == pytest.approx(0.3)
    assert off._runner.capacity.head_start_s == 0.0


def test_a_streaming_backends_partials_keep_no_pause() -> None:
    """Its partials are the decoding itself: a pause after each would idle its one lane."""
    from sttd.backends.nemo import NemoBackend, NemoOptions
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "references" / "nemo"
    streaming = NemoBackend.load(NemoOptions(model=str(folder / "online-ctc"), threads=1,
                                             decoding="greedy_search"))
    offline = NemoBackend.load(NemoOptions(model=str(folder / "offline-ctc"), threads=1,
                                           decoding="greedy_search"))
    settings = Settings(backend="nemo")
    metrics = Metrics.create(CollectorRegistry())
    assert Engine.from_settings(streaming, settings, metrics).scheduler.config.background_share == 1.0
    assert Engine.from_settings(offline, settings, Metrics.create(CollectorRegistry())
                                ).scheduler.config.background_share == 0.5
    # Admission turns speculation off for a streaming model: no head start to count on.
    assert Engine.from_settings(streaming, settings, Metrics.create(CollectorRegistry())
                                )._runner.capacity.head_start_s == 0.0
    assert Engine.from_settings(offline, settings, Metrics.create(CollectorRegistry())
                                )._runner.capacity.head_start_s == pytest.approx(0.3)
