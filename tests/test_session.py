"""Session behaviour with a fake transport and a fake engine: overflow, failures, cancellation.

No sockets and no threads here, so these run on trio's MockClock where time matters.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from typing import Any

import attrs
import numpy as np
import numpy.typing as npt
import pytest
import soxr  # type: ignore[import-untyped]
import trio
import trio.testing
from prometheus_client import CollectorRegistry

from werkzeug.datastructures import MultiDict

from sttd.admission import session_core
from sttd.api import DeepgramCodec, NativeCodec
from sttd.audio import StreamConverter, float32_to_pcm16, pcm16_to_float32
from sttd.backends.base import Request, Result
from sttd.backends.mock import MockBackend
from sttd.errors import BackendError
from sttd.metrics import Metrics
from sttd.nursery import Admission, Session
from sttd.settings import Settings
from sttd.vad import silero_model
from tests.conftest import load_pcm, reference_texts, silence


@attrs.define
class FakeTransport:
    """A WebSocket stand-in: the test pushes client frames and reads what the server sent."""

    incoming_send: trio.MemorySendChannel[bytes | str | None]
    incoming: trio.MemoryReceiveChannel[bytes | str | None]
    sent: list[dict[str, Any]] = attrs.field(factory=list)
    close_code: int | None = None
    closed: trio.Event = attrs.field(factory=trio.Event)
    # While unset, send() blocks after the ready message: a client that reads slowly.
    readable: trio.Event = attrs.field(factory=trio.Event)

    @classmethod
    def create(cls, *, reading: bool = True) -> FakeTransport:
        send, receive = trio.open_memory_channel[bytes | str | None](1000)
        transport = cls(send, receive)
        if reading:
            transport.readable.set()
        return transport

    async def receive(self) -> bytes | str:
        message = await self.incoming.receive()
        return b"" if message is None else message  # None: an empty binary frame

    async def send(self, text: str) -> bool:
        if self.sent:  # the ready message always goes through
            await self.readable.wait()
        self.sent.append(json.loads(text))
        return True

    async def close(self, code: int, reason: str = "") -> None:
        self.close_code = code
        self.closed.set()

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.sent if m["type"] == kind]


@attrs.define
class FakeEngine:
    """Runs the mock backend inline; `gate`, when given, holds every call until it is set."""

    backend: MockBackend = attrs.field(factory=MockBackend.from_directory)
    gate: trio.Event | None = None
    calls: list[str] = attrs.field(factory=list)
    fail_kinds: frozenset[str] = frozenset()
    crash: bool = False

    @property
    def backend_name(self) -> str:
        return "fake"

    def check_language(self, language: str | None) -> None:
        self.backend.check_language(language)

    def overloaded(self) -> bool:
        return False

    @contextlib.contextmanager
    def live_stream(self) -> Iterator[None]:
        yield

    async def transcribe(self, request: Request, *, started: trio.Event | None = None) -> Result:
        self.calls.append(request.kind)
        if started is not None:
            started.set()
        if self.gate is not None:
            await self.gate.wait()
        await trio.lowlevel.checkpoint()
        if self.crash:
            raise RuntimeError("bug in the engine")
        if request.kind in self.fail_kinds:
            raise BackendError("model fell over")
        return self.backend.transcribe([request])[0]


CODEC = NativeCodec()  # sttd's own protocol keeps no state between messages


@contextlib.contextmanager
def _unregistered(session: Session) -> Iterator[None]:
    yield


def _session(engine: FakeEngine, **settings: Any) -> tuple[Session, Metrics]:
    """A session admitted as the server admits one, with its core, on the energy VAD."""
    metrics = Metrics.create(CollectorRegistry())
    config = Settings(**{"backend": "mock", "vad": "energy", **settings})
    request = CODEC.accept(MultiDict({"call_id": "t", "sample_rate": "16000"}), config)
    admission = Admission(request, session_core(request, config), engine, _unregistered)
    return Session(admission, config, metrics), metrics


def _frames(pcm: np.ndarray, samples: int = 320) -> list[bytes]:
    data = pcm.tobytes()
    return [data[i : i + 2 * samples] for i in range(0, len(data), 2 * samples)]


@pytest.fixture
def one_final_in_flight(monkeypatch: pytest.MonkeyPatch) -> None:
    """A session that may have one final decoding at a time (8 normally): the second waits,
    and so does the session behind it. The quick way to reach a session's memory bound."""
    import sttd.nursery

    monkeypatch.setattr(sttd.nursery, "_MAX_FINALS_IN_FLIGHT", 1)


async def test_overflow_drops_oldest_then_finalizes_and_closes_1013(
        autojump_clock: trio.abc.Clock, one_final_in_flight: None) -> None:
    gate = trio.Event()
    engine = FakeEngine(gate=gate)
    session, metrics = _session(engine, in_queue_size=10, in_queue_max_drops=5)
    transport = FakeTransport.create()
    speech = load_pcm("ps_librivox_0880")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run, transport, CODEC)
        # Two utterances, each with just enough silence to end it: the first final is stuck in
        # the engine, and the session waits to start the second (more silence would already
        # overflow the queue behind it). A live client: frames arrive in real time (a client
        # ahead of it is held back instead).
        for name in ("ps_cards_001", "ps_goforward"):
            for frame in _frames(np.concatenate([load_pcm(name), silence(0.6)])):
                await transport.incoming_send.send(frame)
                await trio.sleep(0.02)
        await trio.testing.wait_all_tasks_blocked()
        assert engine.calls.count("final") == 1
        # The session cannot go on, so new speech piles up: 10 fit, then the oldest drop.
        for frame in _frames(speech[16000 + 8 * 320 :])[:16]:  # loud from its first frame
            await transport.incoming_send.send(frame)
            await trio.sleep(0.02)
        await trio.testing.wait_all_tasks_blocked()
        stats = session.statistics()
        assert stats is not None
        assert stats.audio.dropped_frames == 6
        assert stats.audio.frames_buffered == 10
        gate.set()
        await transport.closed.wait()
    # The blocked finals, then the error and the close. (What was left after the drops, 0.2 s
    # of a word, has no text, so its final is not sent.)
    finals = transport.of_type("final")
    assert [f["text"] for f in finals] == [reference_texts()[name]
                                           for name in ("ps_cards_001", "ps_goforward")]
    assert [m["type"] for m in transport.sent][-2:] == ["final", "error"]
    assert transport.sent[-1]["code"] == "overloaded"
    # The first drop was reported at once (a warning, not silence).
    [warning] = transport.of_type("warning")
    assert (warning["code"], warning["frames_dropped"]) == ("lagging", 1)
    assert "STT_IN_QUEUE_MAX_DROPS=5" in transport.sent[-1]["message"]
    assert transport.close_code == 1013
    assert session.outcome == "overloaded"
    assert metrics.frames_dropped_total._value.get() == 6
    assert metrics.errors_total.labels("overloaded")._value.get() == 1


async def test_slow_reader_loses_partials_never_finals(autojump_clock: trio.abc.Clock) -> None:
    refs = reference_texts()
    engine = FakeEngine()
    # A generous lag limit: the jam behind the unread finals must not turn into skipped audio
    # here (that policy has its own tests below).
    session, metrics = _session(engine, out_queue_size=5, max_lag_s=60.0)
    transport = FakeTransport.create(reading=False)
    names = ["ps_goforward", "ps_cards_001", "ps_librivox_0880", "ps_librivox_0930"]
    audio = np.concatenate([part for name in names for part in (load_pcm(name), silence(1.0))])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run, transport, CODEC)
        for frame in _frames(audio, samples=1600):
            await transport.incoming_send.send(frame)
            await trio.sleep(0.1)  # real-time pacing on the mock clock
        await transport.incoming_send.send(json.dumps({"type": "end"}))
        await trio.testing.wait_all_tasks_blocked()
        # The client has read nothing yet: the queue is full of finals and a few partials.
        stats = session.statistics()
        assert stats is not None
        assert stats.output.messages_buffered == 5
        transport.readable.set()
        await transport.closed.wait()
    finals = transport.of_type("final")
    assert [f["text"] for f in finals] == [refs[name] for name in names]
    after = session.statistics()
    assert after is not None
    dropped = after.output.dropped_partials
    assert dropped >= stats.output.dropped_partials > 0
    assert metrics.partials_dropped_total._value.get() == dropped
    assert transport.close_code == 1000


async def test_cancelling_the_session_ends_all_tasks_and_counts_it() -> None:
    engine = FakeEngine()
    session, metrics = _session(engine)
    transport = FakeTransport.create()
    speech = load_pcm("ps_librivox_0880")
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.run, transport, CODEC)
            for frame in _frames(speech[: speech.size // 2]):
                await transport.incoming_send.send(frame)
            await trio.testing.wait_all_tasks_blocked()
            assert metrics.sessions_active._value.get() == 1
            scope.cancel()  # what the web framework does when the client goes away
    assert scope.cancelled_caught
    assert metrics.sessions_active._value.get() == 0
    assert metrics.sessions_total.labels("client_gone")._value.get() == 1
    assert transport.close_code is None


async def test_failed_inference_is_reported_and_the_session_goes_on() -> None:
    refs = reference_texts()
    engine = FakeEngine(fail_kinds=frozenset({"final"}))
    session, metrics = _session(engine)
    transport = FakeTransport.create()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run, transport, CODEC)
        for frame in _frames(np.concatenate([load_pcm("ps_cards_001"), silence(1.0)])):
            await transport.incoming_send.send(frame)
        await trio.testing.wait_all_tasks_blocked()
        engine.fail_kinds = frozenset()
        for frame in _frames(np.concatenate([load_pcm("ps_goforward"), silence(1.0)])):
            await transport.incoming_send.send(frame)
        await transport.incoming_send.send(json.dumps({"type": "end"}))
        await transport.closed.wait()
    errors = transport.of_type("error")
    assert [e["code"] for e in errors] == ["inference_failed"]
    assert "utterance 0" in errors[0]["message"]
    assert [(f["utterance_id"], f["text"]) for f in transport.of_type("final")] == [
        (1, refs["ps_goforward"])]
    assert transport.close_code == 1000
    assert metrics.errors_total.labels("inference_failed")._value.get() == 1


async def test_failed_partials_are_counted_not_sent(autojump_clock: trio.abc.Clock) -> None:
    """A partial the engine fails is tentative work lost, not the client's concern: its final
    answers for the utterance. (Each was an error to the client, which could not tell a
    hundred of them from a lost final while the engine was down.)"""
    refs = reference_texts()
    engine = FakeEngine(fail_kinds=frozenset({"partial"}))
    session, metrics = _session(engine)
    transport = FakeTransport.create()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run, transport, CODEC)
        for frame in _frames(np.concatenate([load_pcm("ps_librivox_0880"), silence(1.0)])):
            await transport.incoming_send.send(frame)
            await trio.sleep(0.02)
        await transport.incoming_send.send(json.dumps({"type": "end"}))
        await transport.closed.wait()
    assert "partial" in engine.calls
    assert transport.of_type("error") == [] and transport.of_type("partial") == []
    assert [f["text"] for f in transport.of_type("final")] == [refs["ps_librivox_0880"]]
    assert metrics.partials_failed_total.labels("inference_failed")._value.get() == \
        engine.calls.count("partial")
    assert metrics.errors_total.labels("inference_failed")._value.get() == 0


async def test_unexpected_error_reports_internal_and_closes_1011() -> None:
    engine = FakeEngine(crash=True)
    session, metrics = _session(engine)
    transport = FakeTransport.create()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run, transport, CODEC)
        for frame in _frames(np.concatenate([load_pcm("ps_cards_001"), silence(1.0)])):
            await transport.incoming_send.send(frame)
        await transport.closed.wait()
    assert transport.sent[-1] == {
        "type": "error", "code": "internal",
        "message": "the server failed on this session; see its logs"}
    assert transport.close_code == 1011
    assert session.outcome == "internal_error"
    assert metrics.sessions_total.labels("internal_error")._value.get() == 1


@pytest.mark.parametrize("chunk_samples", [1, 160, 16000])
async def test_commit_mid_speech_gives_one_final_whatever_the_framing(chunk_samples: int) -> None:
    refs = reference_texts()
    engine = FakeEngine()
    session, _ = _session(engine)
    transport = FakeTransport.create()
    speech = load_pcm("ps_goforward")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run, transport, CODEC)
        # Odd byte counts: every frame but the last splits a sample.
        data = speech.tobytes()
        step = 2 * chunk_samples + 1
        for offset in range(0, len(data), step):
            await transport.incoming_send.send(data[offset : offset + step])
        await transport.incoming_send.send(b"")
        await transport.incoming_send.send(None)  # an empty binary frame, as quart reports it
        await transport.incoming_send.send(json.dumps({"type": "commit"}))
        await transport.incoming_send.send(json.dumps({"type": "end"}))
        await transport.closed.wait()
    finals = transport.of_type("final")
    assert [f["text"] for f in finals] == [refs["ps_goforward"]]
    assert finals[0]["end_ms"] <= speech.size // 16


async def test_unrecognised_speech_gives_no_final_unless_the_client_forces_one() -> None:
    engine = FakeEngine()
    session, _ = _session(engine)
    transport = FakeTransport.create()
    # Loud audio the mock cannot match: time-reversed speech.
    babble = load_pcm("ps_librivox_0880")[::-1].copy()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run, transport, CODEC)
        for frame in _frames(np.concatenate([babble, silence(1.0)])):
            await transport.incoming_send.send(frame)
        await trio.testing.wait_all_tasks_blocked()
        assert "final" in engine.calls  # the VAD ended an utterance, but its text is empty
        assert transport.of_type("final") == []
        for frame in _frames(babble):
            await transport.incoming_send.send(frame)
        await transport.incoming_send.send(json.dumps({"type": "commit"}))
        await trio.testing.wait_all_tasks_blocked()
        await transport.incoming_send.send(json.dumps({"type": "end"}))
        await transport.closed.wait()
    finals = transport.of_type("final")
    assert [(f["utterance_id"], f["text"]) for f in finals] == [(1, "")]


# --- limits, drain and lag (issue 6) -----------------------------------------------------------


def _codes(transport: FakeTransport, kind: str) -> list[str]:
    return [m["code"] for m in transport.of_type(kind)]


async def test_idle_session_closes_after_the_idle_timeout_and_keepalive_holds_it(
        autojump_clock: trio.abc.Clock) -> None:
    session, metrics = _session(FakeEngine(), idle_timeout_s=10.0)
    transport = FakeTransport.create()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run, transport, CODEC)
        await trio.sleep(8)
        await transport.incoming_send.send(json.dumps({"type": "keepalive"}))
        await trio.sleep(8)  # 16 s since the start, 8 since the keepalive: still open
        assert transport.close_code is None
        await transport.closed.wait()
        closed_at = trio.current_time()
    # 10 s after the keepalive, and at most a second later (the receive loop moves its deadline
    # once a second, not at every message).
    assert 18.0 <= closed_at <= 19.0
    assert _codes(transport, "error") == ["idle_timeout"]
    assert transport.close_code == 1000
    assert metrics.sessions_total.labels("idle")._value.get() == 1
    assert metrics.errors_total.labels("idle_timeout")._value.get() == 1


async def test_a_realtime_session_has_its_own_idle_bound(
        autojump_clock: trio.abc.Clock) -> None:
    """OpenAI's Realtime protocol has no keepalive: a push-to-talk client sends nothing between
    turns, so its sessions are bounded by STT_REALTIME_IDLE_TIMEOUT_S, not STT_IDLE_TIMEOUT_S."""
    from sttd.api import RealtimeCodec

    metrics = Metrics.create(CollectorRegistry())
    config = Settings(backend="mock", vad="energy", idle_timeout_s=10.0,
                      realtime_idle_timeout_s=100.0)
    codec = RealtimeCodec()
    request = codec.accept(MultiDict({"intent": "transcription"}), config)
    admission = Admission(request, session_core(request, config), FakeEngine(), _unregistered)
    transport = FakeTransport.create()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(Session(admission, config, metrics).run, transport, codec)
        await transport.closed.wait()
        closed_at = trio.current_time()
    assert closed_at == pytest.approx(100.0)
    [error] = [m for m in transport.sent if m["type"] == "error"]
    assert error["error"]["code"] == "idle_timeout"
    assert error["error"]["type"] == "invalid_request_error"
    assert "STT_REALTIME_IDLE_TIMEOUT_S=100" in error["error"]["message"]
    assert metrics.sessions_total.labels("idle")._value.get() == 1


async def test_session_time_limit_finalizes_open_speech_then_closes(
        autojump_clock: trio.abc.Clock) -> None:
    speech = load_pcm("ps_librivox_0880")
    session, metrics = _session(FakeEngine(), max_session_s=speech.size / 16000 - 0.5)
    transport = FakeTransport.create()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run, transport, CODEC)
        for frame in _frames(speech, samples=1600):
            await transport.incoming_send.send(frame)
            await trio.sleep(0.1)
        await transport.closed.wait()
    # The utterance was still open at the limit: its final comes before the error and close.
    assert [m["type"] for m in transport.sent][-2:] == ["final", "error"]
    # The mock transcribes the part it heard: the last half second was never sent.
    assert transport.of_type("final")[0]["text"].startswith("he was not an ill disposed")
    assert _codes(transport, "error") == ["session_too_long"]
    assert transport.close_code == 1000
    assert metrics.sessions_total.labels("session_limit")._value.get() == 1


async def test_drain_finalizes_open_speech_and_closes_1001() -> None:
    session, metrics = _session(FakeEngine())
    transport = FakeTransport.create()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run, transport, CODEC)
        for frame in _frames(load_pcm("ps_goforward")):  # no silence after: still open
            await transport.incoming_send.send(frame)
        await trio.testing.wait_all_tasks_blocked()
        assert transport.of_type("final") == []
        session.drain()
        await transport.closed.wait()
    assert [f["text"] for f in transport.of_type("final")] == [reference_texts()["ps_goforward"]]
    assert transport.close_code == 1001
    assert transport.of_type("error") == []
    assert metrics.sessions_total.labels("drained")._value.get() == 1


@attrs.define
class _HeldVad:
    """A VAD driver whose net calls wait for `release`, as a busy shared batcher's do."""

    release: trio.Event = attrs.field(factory=trio.Event)
    waiting: trio.Event = attrs.field(factory=trio.Event)

    async def drive(self, steps: Any, *, shielded: bool = False) -> Any:
        try:
            call = next(steps)
            while True:
                self.waiting.set()
                with trio.CancelScope(shield=shielded):
                    await self.release.wait()
                call = steps.send(call.score())
        except StopIteration as stop:
            return stop.value


async def test_a_drain_waits_for_the_frame_the_receive_task_is_feeding_between_utterances(
        ) -> None:
    # Between utterances the receive task feeds the core itself. A drain cancels the receive
    # loop; the frame it was feeding (waiting on the VAD's net) must still go in whole, or the
    # endpointer would stop part-way through it.
    silero_model()
    config = Settings(backend="mock", vad="silero")
    request = CODEC.accept(MultiDict({"call_id": "t", "sample_rate": "16000"}), config)
    core = session_core(request, config)  # its VAD's net: a stream of the loaded Silero
    vad = _HeldVad()
    session = Session(Admission(request, core, FakeEngine(), _unregistered, vad=vad), config,
                      Metrics.create(CollectorRegistry()))
    line = np.random.default_rng(0).normal(0, 104, 1600).astype(np.int16)  # -50 dBFS, 100 ms
    transport = FakeTransport.create()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.run, transport, CODEC)
            await trio.testing.wait_all_tasks_blocked()  # the infer task waits on its channel
            await transport.incoming_send.send(line.tobytes())
            await transport.incoming_send.send(line.tobytes())
            await vad.waiting.wait()
            session.drain()
            await trio.testing.wait_all_tasks_blocked()
            # The receive task is in the first frame's feed: the second is not read yet.
            assert transport.incoming.statistics().current_buffer_used == 1
            assert transport.close_code is None
            vad.release.set()
            await transport.closed.wait()
    assert transport.close_code == 1001
    # Both frames went in whole: the one being fed, and the one the client had sent before
    # the drain (taken in the drain's short tail, `Session.drain`).
    assert core.tracker.position == 2 * line.size
    assert core.tracker.endpointer.position == 2 * line.size - 2 * line.size % 512


async def test_a_session_drained_before_it_reads_closes_at_once() -> None:
    session, _ = _session(FakeEngine())
    transport = FakeTransport.create()
    session.drain()
    with trio.fail_after(5):
        await session.run(transport, CODEC)
    assert [m["type"] for m in transport.sent] == ["ready"]
    assert transport.close_code == 1001


@pytest.mark.parametrize("speculate_ms", [0, 200])
async def test_a_slow_engine_delays_finals_but_the_session_keeps_listening(
        autojump_clock: trio.abc.Clock, speculate_ms: int) -> None:
    """Head-of-line blocking used to turn a slow decode into skipped speech: while a final
    waited, the session stopped reading. Now the VAD keeps up and finals queue in the engine,
    speculative ones too."""
    gate = trio.Event()
    engine = FakeEngine(gate=gate)
    session, metrics = _session(engine, max_lag_s=1.0, speculate_ms=speculate_ms)
    transport = FakeTransport.create()
    names = ["ps_cards_001", "ps_goforward", "ps_librivox_0880", "ps_cards_001"]
    parts = [np.concatenate([load_pcm(name), silence(1.0)]) for name in names]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run, transport, CODEC)
        for frame in _frames(np.concatenate(parts)):
            await transport.incoming_send.send(frame)
            await trio.sleep(0.02)  # real time: about 20 s while the engine is stuck
        await trio.testing.wait_all_tasks_blocked()
        # Every utterance found, none decoded (a speculation dropped when speech resumed
        # after a pause inside an utterance is one decode more).
        assert (engine.calls.count("final") == len(names) if not speculate_ms
                else len(names) <= engine.calls.count("final") <= 2 * len(names))
        assert transport.of_type("final") == []
        stats = session.statistics()
        assert stats is not None and stats.audio.samples_buffered == 0  # no backlog at all
        gate.set()
        await transport.incoming_send.send(json.dumps({"type": "end"}))
        await transport.closed.wait()
    refs = reference_texts()
    finals = transport.of_type("final")
    assert [f["text"] for f in finals] == [refs[name] for name in names]  # in order, all of it
    assert [f["utterance_id"] for f in finals] == [0, 1, 2, 3]
    # Stream times are the client's, and each final's backlog is what it was: none.
    starts = np.cumsum([0] + [part.size for part in parts[:-1]]) // 16
    assert all(abs(f["start_ms"] - start) < 400 for f, start in zip(finals, starts))
    assert [f["backlog_ms"] for f in finals] == [0] * len(names)
    assert transport.of_type("warning") == []
    assert metrics.frames_dropped_total._value.get() == 0
    assert metrics.audio_skipped_seconds_total._value.get() == 0


async def test_client_ahead_of_real_time_is_held_back_not_skipped(
        autojump_clock: trio.abc.Clock, one_final_in_flight: None) -> None:
    gate = trio.Event()
    engine = FakeEngine(gate=gate)
    session, metrics = _session(engine, max_lag_s=1.0)
    transport = FakeTransport.create()
    refs = reference_texts()
    names = ["ps_cards_001", "ps_goforward", "ps_librivox_0880", "ps_librivox_0930"]
    audio = np.concatenate([part for name in names for part in (load_pcm(name), silence(1.0))])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run, transport, CODEC)

        async def client() -> None:  # as fast as it can: no pacing at all
            for frame in _frames(audio):
                await transport.incoming_send.send(frame)
            await transport.incoming_send.send(json.dumps({"type": "end"}))

        nursery.start_soon(client)
        await trio.testing.wait_all_tasks_blocked()
        stats = session.statistics()
        assert stats is not None
        # The first final is stuck and the second waits for it: the session stopped reading
        # at 2 s of queued audio.
        assert stats.audio.samples_buffered <= 2 * 16000 + 320
        assert transport.incoming.statistics().current_buffer_used > 0
        gate.set()
        await transport.closed.wait()
    assert [f["text"] for f in transport.of_type("final")] == [refs[name] for name in names]
    assert transport.of_type("warning") == []
    assert metrics.frames_dropped_total._value.get() == 0
    assert metrics.audio_skipped_seconds_total._value.get() == 0


async def test_an_hour_of_unbroken_speech_keeps_memory_flat() -> None:
    import tracemalloc

    engine = FakeEngine()
    session, metrics = _session(engine, streaming_chunk_size_sec=5.0)  # fewer mock decodes: faster
    transport = FakeTransport.create()
    # Speech with no pause long enough to end an utterance: cuts at STT_MAX_UTTERANCE_S only.
    speech = np.concatenate([load_pcm(name) for name in
                             ("ps_librivox_0880", "ps_librivox_0930", "ps_cards_001")])
    speech = np.concatenate([speech, speech[::-1]])  # loops back on itself without a seam
    seconds = speech.size / 16000
    loops = int(3600 / seconds) + 1
    traced: dict[int, int] = {}
    tracemalloc.start()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.run, transport, CODEC)
            for loop in range(loops):
                for frame in _frames(speech, samples=16000):
                    await transport.incoming_send.send(frame)
                await trio.testing.wait_all_tasks_blocked()
                if loop in (loops // 6, loops - 1):  # after ~10 min, and at the hour
                    traced[loop] = tracemalloc.get_traced_memory()[0]
                transport.sent.clear()  # the client consumed them
            await transport.incoming_send.send(json.dumps({"type": "end"}))
            await transport.closed.wait()
    finally:
        tracemalloc.stop()
    assert loops * seconds >= 3600
    # Cut at 15 s at most (the mock gives no text for cuts that are not whole fixtures).
    assert engine.calls.count("final") >= 3600 / 15
    early, late = traced[loops // 6], traced[loops - 1]
    # 50 minutes more speech (~96 MB of PCM) must not show: an untrimmed buffer would grow by
    # tens of MB. Runs have measured 0.0-0.6 MiB of drift, not explained yet.
    assert late - early < 2 * 1024 * 1024, (early, late)


# --- correctness fixes of the redesign (issue 13) -------------------------------------------------


async def test_dropped_frames_leave_a_gap_so_later_stream_times_stay_true(
        autojump_clock: trio.abc.Clock, one_final_in_flight: None) -> None:
    gate = trio.Event()
    engine = FakeEngine(gate=gate)
    session, metrics = _session(engine, in_queue_size=10, in_queue_max_drops=10_000,
                                max_lag_s=60.0)
    transport = FakeTransport.create()
    first = np.concatenate([load_pcm("ps_cards_001"), silence(0.6), load_pcm("ps_goforward"),
                            silence(0.6)])
    stall = silence(2.0)
    last = np.concatenate([load_pcm("ps_librivox_0930"), silence(1.0)])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run, transport, CODEC)
        # The first final is stuck and the second waits for it: the stall's frames overflow.
        for part in (first, stall):
            for frame in _frames(part):
                await transport.incoming_send.send(frame)
                await trio.sleep(0.02)
        gate.set()
        await trio.testing.wait_all_tasks_blocked()
        for frame in _frames(last):
            await transport.incoming_send.send(frame)
            await trio.sleep(0.02)
        await transport.incoming_send.send(json.dumps({"type": "end"}))
        await transport.closed.wait()
    dropped = metrics.frames_dropped_total._value.get()
    assert dropped >= 80  # most of the 2 s stall could not be queued
    finals = transport.of_type("final")
    refs = reference_texts()
    assert [f["text"] for f in finals] == [refs["ps_cards_001"], refs["ps_goforward"],
                                           refs["ps_librivox_0930"]]
    # The dropped audio counts as stream time: the last utterance starts where it was sent
    # (less the 300 ms of pre-roll), not `dropped` frames of 20 ms earlier.
    expected_start_ms = (first.size + stall.size) // 16
    assert abs(finals[2]["start_ms"] - expected_start_ms) < 400
    stats = session.statistics()
    assert stats is not None and stats.audio.dropped_frames == dropped
    assert metrics.audio_skipped_seconds_total._value.get() == pytest.approx(
        stats.audio.dropped_samples / 16000)


async def test_a_client_that_never_reads_is_closed_after_the_send_timeout(
        autojump_clock: trio.abc.Clock) -> None:
    session, metrics = _session(FakeEngine(), send_timeout_s=5.0)
    transport = FakeTransport.create(reading=False)  # reads the ready message, then nothing
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run, transport, CODEC)
        for frame in _frames(np.concatenate([load_pcm("ps_goforward"), silence(1.0)])):
            await transport.incoming_send.send(frame)
            await trio.sleep(0.02)
        with trio.fail_after(60):  # virtual: held for hours before the send timeout
            await transport.closed.wait()
    assert transport.close_code == 1008
    assert session.outcome == "slow_client"
    assert metrics.sessions_total.labels("slow_client")._value.get() == 1
    assert metrics.finals_sent_total._value.get() == 0
    assert metrics.sessions_active._value.get() == 0


@attrs.define
class ClosingTransport(FakeTransport):
    """The client's close frame came in first: finals are not delivered any more."""

    async def send(self, text: str) -> bool:
        if json.loads(text)["type"] == "final":
            return False
        return await super().send(text)


async def test_a_final_not_delivered_is_not_counted_as_sent() -> None:
    session, metrics = _session(FakeEngine())
    send, receive = trio.open_memory_channel[bytes | str | None](1000)
    transport = ClosingTransport(send, receive)
    transport.readable.set()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run, transport, CODEC)
        for frame in _frames(np.concatenate([load_pcm("ps_goforward"), silence(1.0)])):
            await transport.incoming_send.send(frame)
        await transport.incoming_send.send(json.dumps({"type": "end"}))
        await transport.closed.wait()
    assert transport.of_type("final") == []
    assert metrics.finals_sent_total._value.get() == 0
    assert metrics.final_latency_seconds._sum.get() == 0


async def test_resampling_a_client_stream_runs_off_the_event_loop(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A Deepgram client at 8 kHz: each frame is resampled in a worker thread, not on the loop
    every other session shares, and the session hears the same words."""
    calls: list[bool] = []
    convert = StreamConverter.convert_pcm16

    def recording(self: StreamConverter, data: bytes | memoryview, *, last: bool = False
                  ) -> npt.NDArray[np.int16]:
        calls.append(threading.current_thread() is threading.main_thread())
        return convert(self, data, last=last)

    monkeypatch.setattr(StreamConverter, "convert_pcm16", recording)
    metrics = Metrics.create(CollectorRegistry())
    config = Settings(backend="mock", vad="energy")
    codec = DeepgramCodec()
    request = codec.accept(MultiDict({"encoding": "linear16", "sample_rate": "8000"}), config)
    admission = Admission(request, session_core(request, config), FakeEngine(), _unregistered)
    session = Session(admission, config, metrics)
    speech = np.concatenate([load_pcm("ps_goforward"), silence(1.0)])
    narrow = float32_to_pcm16(soxr.resample(pcm16_to_float32(speech), 16000, 8000))
    transport = FakeTransport.create()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run, transport, codec)
        for frame in _frames(narrow, samples=160):
            await transport.incoming_send.send(frame)
        await transport.incoming_send.send(json.dumps({"type": "CloseStream"}))
        await transport.closed.wait()
    assert calls and not any(calls)
    [final] = [m for m in transport.of_type("Results") if m["is_final"]]
    assert final["channel"]["alternatives"][0]["transcript"] == reference_texts()["ps_goforward"]


async def test_a_round_reports_the_backlog_behind_its_first_item() -> None:
    """The lag check must see what was queued when the round began: measured after the round
    was taken, the backlog would always read 0 and a lagging session would never skip
    partials."""
    from sttd.channels import open_audio_channel
    from sttd.nursery import _receive_round
    from sttd.session import AudioFrame

    send, receive = open_audio_channel(10)
    for index in range(3):
        send.send_nowait(AudioFrame(np.zeros(320, np.int16), float(index)))
    items, backlog = await _receive_round(receive)
    assert len(items) == 3
    assert backlog == 2 * 320
    assert receive.samples_buffered == 0


@attrs.define
class HoldingEngine(FakeEngine):
    """Holds every final in its queue (not started) until `gate` is set, and records the
    finals withdrawn from it."""

    withdrawn: list[str] = attrs.field(factory=list)

    async def transcribe(self, request: Request, *, started: trio.Event | None = None) -> Result:
        if request.kind == "final":
            try:
                assert self.gate is not None
                await self.gate.wait()
            except trio.Cancelled:
                self.withdrawn.append(request.kind)
                raise
        return await super().transcribe(request, started=started)


async def test_a_speculative_final_is_withdrawn_when_speech_resumes_and_used_when_it_ends(
        autojump_clock: trio.abc.Clock) -> None:
    gate = trio.Event()
    engine = HoldingEngine(gate=gate)
    session, metrics = _session(engine)
    transport = FakeTransport.create()
    # Speech, a 300 ms pause (a speculation, then speech again), speech, a long pause.
    loud = np.full(16000, 3000, np.int16)
    audio = np.concatenate([loud, silence(0.3), loud, silence(1.0)])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run, transport, CODEC)
        for frame in _frames(audio):
            await transport.incoming_send.send(frame)
            await trio.sleep(0.02)
        await trio.testing.wait_all_tasks_blocked()
        assert engine.withdrawn == ["final"]  # the first pause's, never decoded
        # Counted as it happens, not when the session closes.
        assert metrics.speculative_finals_total.labels("dropped")._value.get() == 1
        gate.set()
        await transport.incoming_send.send(json.dumps({"type": "end"}))
        await transport.closed.wait()
    assert engine.calls.count("final") == 1  # the second pause's speculation was the final
    assert transport.close_code == 1000
    used = metrics.speculative_finals_total.labels("used")._value.get()
    dropped = metrics.speculative_finals_total.labels("dropped")._value.get()
    assert (used, dropped) == (1, 1)
