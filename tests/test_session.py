"""Session behaviour with a fake transport and a fake engine: overflow, failures, cancellation.

No sockets and no threads here, so these run on trio's MockClock where time matters.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
import numpy as np
import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry

from sttd.backends.base import Request, Result
from sttd.backends.mock import MockBackend
from sttd.errors import BackendError
from sttd.metrics import Metrics
from sttd.nursery import Session
from sttd.protocol import SessionParams
from sttd.settings import Settings
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

    async def receive(self) -> bytes | str | None:
        return await self.incoming.receive()

    async def send(self, text: str) -> None:
        if self.sent:  # the ready message always goes through
            await self.readable.wait()
        self.sent.append(json.loads(text))

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

    async def transcribe(self, request: Request, *, session: object,
                         started: trio.Event | None = None) -> Result:
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


def _session(engine: FakeEngine, **settings: Any) -> tuple[Session, Metrics]:
    metrics = Metrics.create(CollectorRegistry())
    session = Session(
        SessionParams(call_id="t"), engine,
        Settings(**{"backend": "mock", "vad": "energy", **settings}), metrics)
    return session, metrics


def _frames(pcm: np.ndarray, samples: int = 320) -> list[bytes]:
    data = pcm.tobytes()
    return [data[i : i + 2 * samples] for i in range(0, len(data), 2 * samples)]


async def test_overflow_drops_oldest_then_finalizes_and_closes_1013() -> None:
    gate = trio.Event()
    engine = FakeEngine(gate=gate)
    session, metrics = _session(engine, in_queue_size=10, in_queue_max_drops=5)
    transport = FakeTransport.create()
    speech = load_pcm("ps_librivox_0880")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run, transport)
        # An utterance and just enough silence to end it: the infer task asks for a final,
        # which blocks (more silence would already overflow the queue behind it).
        for frame in _frames(np.concatenate([load_pcm("ps_cards_001"), silence(0.6)])):
            await transport.incoming_send.send(frame)
        await trio.testing.wait_all_tasks_blocked()
        assert "final" in engine.calls
        # The engine is stuck, so new speech piles up: 10 fit, then the oldest are dropped.
        for frame in _frames(speech[16000 + 8 * 320 :])[:16]:  # loud from its first frame
            await transport.incoming_send.send(frame)
        await trio.testing.wait_all_tasks_blocked()
        stats = session.statistics()
        assert stats is not None
        assert stats.audio.dropped_frames == 6
        assert stats.audio.frames_buffered == 10
        gate.set()
        await transport.closed.wait()
    # The blocked final, then a final for what was left, before the error and the close.
    finals = transport.of_type("final")
    assert [f["utterance_id"] for f in finals] == [0, 1]
    assert finals[0]["text"] == reference_texts()["ps_cards_001"]
    assert [m["type"] for m in transport.sent][-2:] == ["final", "error"]
    assert transport.sent[-1]["code"] == "overloaded"
    assert "STT_IN_QUEUE_MAX_DROPS=5" in transport.sent[-1]["message"]
    assert transport.close_code == 1013
    assert session.outcome == "overloaded"
    assert metrics.frames_dropped_total._value.get() == 6
    assert metrics.errors_total.labels("overloaded")._value.get() == 1


async def test_slow_reader_loses_partials_never_finals(autojump_clock: trio.abc.Clock) -> None:
    refs = reference_texts()
    engine = FakeEngine()
    session, metrics = _session(engine, out_queue_size=5)
    transport = FakeTransport.create(reading=False)
    names = ["ps_goforward", "ps_cards_001", "ps_librivox_0880", "ps_librivox_0930"]
    audio = np.concatenate([part for name in names for part in (load_pcm(name), silence(1.0))])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run, transport)
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
    dropped = stats.output.dropped_partials
    assert dropped > 0
    assert metrics.partials_dropped_total._value.get() == dropped
    assert transport.close_code == 1000


async def test_cancelling_the_session_ends_all_tasks_and_counts_it() -> None:
    engine = FakeEngine()
    session, metrics = _session(engine)
    transport = FakeTransport.create()
    speech = load_pcm("ps_librivox_0880")
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.run, transport)
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
        nursery.start_soon(session.run, transport)
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


async def test_unexpected_error_reports_internal_and_closes_1011() -> None:
    engine = FakeEngine(crash=True)
    session, metrics = _session(engine)
    transport = FakeTransport.create()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run, transport)
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
        nursery.start_soon(session.run, transport)
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
        nursery.start_soon(session.run, transport)
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
