"""Graceful drain: /health turns 503, newcomers are refused, sessions get their last finals.

In-process tests trigger the shutdown with an event; one test sends SIGTERM to a real
``sttd serve`` process.
"""

from __future__ import annotations

import json
import logging
import signal
from typing import Any

import attrs
import httpx
import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry
from trio_websocket import WebSocketConnection, open_websocket_url

from sttd.admission import AppState
from sttd.audio import encode_wav, pcm16_to_float32
from sttd.metrics import EngineLoad, Metrics
from sttd.server import serve
from sttd.settings import Settings
from tests.conftest import (
    RunningServer,
    load_pcm,
    receive_type,
    receive_until_close,
    reference_texts,
    send_pcm,
)
from tests.test_cli import _env, _Lines, partial_process
from tests.test_limits import _multipart, _read_until_closed_or_answered
from tests.test_wire import _trim_trailing_quiet

TIMEOUT_S = 30
NAMES = ["ps_goforward", "ps_cards_001"]


@attrs.frozen
class _Stoppable:
    server: RunningServer
    trigger: trio.Event
    stopped: trio.Event


async def _start(nursery: trio.Nursery, **overrides: Any) -> _Stoppable:
    """A server on loopback that drains and stops when `trigger` is set."""
    settings = Settings(**{"backend": "mock", "host": "127.0.0.1", "port": 0, **overrides})
    state = AppState(settings, Metrics.create(CollectorRegistry()))
    trigger, stopped = trio.Event(), trio.Event()

    async def run(*, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        await serve(settings, state=state, shutdown_trigger=trigger.wait, task_status=task_status)
        stopped.set()

    port = await nursery.start(run)
    with trio.fail_after(10):
        await state.engine_loaded.wait()
    return _Stoppable(RunningServer(port, state), trigger, stopped)


async def _open_utterance(ws: WebSocketConnection, name: str) -> None:
    """Stream `name` with no endpoint after it; return once the server has read all of it."""
    await receive_type(ws, "ready")
    await send_pcm(ws, _trim_trailing_quiet(load_pcm(name)))
    # Frames are read in order: the answer to a bad message means the audio before it is in.
    await ws.send_message(json.dumps({"type": "sync"}))
    assert (await receive_type(ws, "error"))["code"] == "invalid_message"


async def _start_upload(port: int) -> tuple[trio.SocketStream, bytes]:
    """An upload whose client sent half its body; returns the stream and the rest."""
    head, body = _multipart(encode_wav(pcm16_to_float32(load_pcm("ps_librivox_0930"))))
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(head + body[: len(body) // 2])
    return stream, body[len(body) // 2:]


async def test_drain_finalizes_sessions_refuses_newcomers_and_waits_for_uploads(
        nursery: trio.Nursery) -> None:
    refs = reference_texts()
    running = await _start(nursery, drain_s=TIMEOUT_S)
    server, state = running.server, running.server.state
    closes: dict[str, tuple[list[dict[str, Any]], int]] = {}

    async def session(name: str, *, task_status: trio.TaskStatus[None]) -> None:
        async with open_websocket_url(server.ws_url(f"call_id={name}&sample_rate=16000")) as ws:
            await _open_utterance(ws, name)
            task_status.started()
            closes[name] = await receive_until_close(ws)

    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as sessions, \
                httpx.AsyncClient(base_url=server.http_url, timeout=TIMEOUT_S) as client:
            for name in NAMES:
                await sessions.start(session, name)
            upload, rest = await _start_upload(server.port)
            await trio.testing.wait_all_tasks_blocked()
            assert (len(state.sessions), state.uploads) == (2, 1)

            running.trigger.set()
            await state.sessions.wait_count(0)
            # The upload holds the drain open: the server still answers, and refuses new work.
            health = await client.get("/health")
            late_upload = await client.post("/v1/stt/transcribe", files={"file": ("a", b"RIFF")})
            async with open_websocket_url(server.ws_url()) as late:
                late_messages, late_code = await receive_until_close(late)
            assert not running.stopped.is_set()

            async with upload:
                await upload.send_all(rest)
                response = await _read_until_closed_or_answered(upload)
        await running.stopped.wait()

    for name in NAMES:
        messages, code = closes[name]
        assert [(m["type"], m["utterance_id"], m["text"]) for m in messages
                if m["type"] == "final"] == [("final", 0, refs[name])]
        assert messages[-1]["type"] == "final"  # then the close, with no error before it
        assert code == 1001
    assert health.status_code == 503
    assert _without_capacity(health.json()) == {"status": "draining", "backend": "mock",
                                                "sessions": 0}
    assert late_upload.status_code == 503
    assert late_upload.json()["error"]["code"] == "shutting_down"
    assert [(m["type"], m["code"]) for m in late_messages] == [("error", "shutting_down")]
    assert late_code == 1001
    assert response.startswith(b"HTTP/1.1 200 ")
    assert json.loads(response.partition(b"\r\n\r\n")[2])["text"] == refs["ps_librivox_0930"]
    registry = state.metrics.registry
    assert registry.get_sample_value("sttd_sessions_total", {"outcome": "drained"}) == 2
    assert registry.get_sample_value("sttd_errors_total", {"code": "shutting_down"}) == 2


async def test_a_drain_keeps_the_audio_already_on_its_way(nursery: trio.Nursery) -> None:
    """The drain comes while the frames a client sent are still in the socket and the serving
    stack's queue: they are part of the utterance, and its final says all of them (the session
    stopped reading at once, and cut the last 0.2-0.4 s of real-time clients' audio)."""
    refs = reference_texts()
    running = await _start(nursery, drain_s=TIMEOUT_S)
    name = "ps_librivox_0880"
    with trio.fail_after(TIMEOUT_S):
        async with open_websocket_url(running.server.ws_url()) as ws:
            await receive_type(ws, "ready")
            await send_pcm(ws, _trim_trailing_quiet(load_pcm(name)), chunk_bytes=640)
            running.trigger.set()  # no round trip: the last frames are still on their way
            messages, code = await receive_until_close(ws)
    assert [m["text"] for m in messages if m["type"] == "final"] == [refs[name]]
    assert code == 1001


async def test_drain_gives_up_after_drain_s(
        nursery: trio.Nursery, caplog: pytest.LogCaptureFixture) -> None:
    """An upload that never finishes holds the drain for STT_DRAIN_S, then the server stops."""
    running = await _start(nursery, drain_s=0.5, shutdown_grace_s=0.5)
    caplog.set_level(logging.INFO, logger="sttd.server")
    with trio.fail_after(TIMEOUT_S):
        upload, _ = await _start_upload(running.server.port)
        async with upload:
            await trio.testing.wait_all_tasks_blocked()
            assert running.server.state.uploads == 1
            running.trigger.set()
            await running.stopped.wait()
    drained = [r.getMessage() for r in caplog.records if r.getMessage().startswith("server.drained")]
    assert drained == ["server.drained sessions_left=0 uploads_left=1"]
    assert running.server.state.uploads == 0  # hypercorn's shutdown cancelled it


def _without_capacity(body: dict[str, Any]) -> dict[str, Any]:
    """/health's body less its measured capacity (the mock's varies with the machine)."""
    return {key: value for key, value in body.items() if key != "capacity"}


@attrs.frozen
class _StuckEngine:
    """Stands in for an engine whose backend call has run past STT_INFERENCE_TIMEOUT_S."""

    backend_name: str = "mock"

    def degraded(self) -> str | None:
        return "a backend call has been running for 31 s (STT_INFERENCE_TIMEOUT_S=30)"

    def load(self) -> EngineLoad:
        return EngineLoad(None, None, None)  # stuck before it measured anything


async def test_health_reports_a_degraded_engine(server: RunningServer) -> None:
    server.state.engine = _StuckEngine()  # type: ignore[assignment]
    async with httpx.AsyncClient(base_url=server.http_url, timeout=TIMEOUT_S) as client:
        health = await client.get("/health")
    assert health.status_code == 200
    assert health.json() == {
        "status": "degraded", "backend": "mock", "sessions": 0,
        "capacity": {"streams": None, "stream_demand_s": None, "load": None},
        "reason": "a backend call has been running for 31 s (STT_INFERENCE_TIMEOUT_S=30)"}


async def test_sigterm_drains_a_real_process() -> None:
    refs = reference_texts()
    drain_s = 20
    env = _env(STT_BACKEND="mock", STT_HOST="127.0.0.1", STT_PORT="0", STT_LOG_FORMAT="json",
               STT_VAD="energy", STT_DRAIN_S=str(drain_s))
    closes: dict[str, tuple[list[dict[str, Any]], int]] = {}
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            process = await nursery.start(partial_process, env)
            assert process.stderr is not None
            lines = _Lines(process.stderr)
            port = int((await lines.wait_for('"event": "server.listening"')).split('"port": "')[1]
                       .split('"')[0])
            await lines.wait_for('"event": "engine.ready"')
            base = f"127.0.0.1:{port}"
            # The upload goes first, so its handler is running long before the signal.
            upload, rest = await _start_upload(port)

            async def session(name: str, *, task_status: trio.TaskStatus[None]) -> None:
                url = f"ws://{base}/v1/stt/ws?call_id={name}&sample_rate=16000"
                async with open_websocket_url(url) as ws:
                    await _open_utterance(ws, name)
                    task_status.started()
                    closes[name] = await receive_until_close(ws)

            async with trio.open_nursery() as sessions:
                for name in NAMES:
                    await sessions.start(session, name)
                process.send_signal(signal.SIGTERM)
                signalled_at = trio.current_time()
                await lines.wait_for('"event": "server.draining"')
            async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
                health = await client.get(f"http://{base}/health")
            async with upload:
                await upload.send_all(rest)
                response = await _read_until_closed_or_answered(upload)
            await lines.wait_for('"event": "server.stopped"')
            code = await process.wait()
            exited_after_s = trio.current_time() - signalled_at
    for name in NAMES:
        messages, close_code = closes[name]
        assert [m["text"] for m in messages if m["type"] == "final"] == [refs[name]]
        assert close_code == 1001
    assert health.status_code == 503
    assert health.json()["status"] == "draining"
    assert response.startswith(b"HTTP/1.1 200 ")
    assert code == 0
    assert exited_after_s < drain_s
    assert "Traceback" not in lines.seen

