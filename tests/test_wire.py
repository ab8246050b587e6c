"""WebSocket protocol tests against the real server on loopback, with a trio-websocket client."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soxr
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import open_websocket_url

from sttd.audio import float32_to_pcm16, pcm16_to_float32
from sttd.vad import frame_rms
from tests.conftest import (
    RunningServer,
    load_pcm,
    receive_type,
    receive_until_close,
    reference_texts,
    send_pcm,
    silence,
    start_server,
)
from tests.test_formats import encode_media

TIMEOUT_S = 30


def _sample(server: RunningServer, name: str, labels: dict[str, str] | None = None) -> float:
    from prometheus_client import generate_latest

    text = generate_latest(server.state.metrics.registry).decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and (labels is None or sample.labels == labels):
                return sample.value
    return 0.0


def _trim_trailing_quiet(pcm: np.ndarray) -> np.ndarray:
    """Cut `pcm` right after its last loud 20 ms frame, so no endpoint silence follows."""
    frames = pcm[: pcm.size - pcm.size % 320].reshape(-1, 320)
    loud = [i for i, frame in enumerate(frames) if frame_rms(frame) > 300]
    return pcm[: (loud[-1] + 1) * 320]


def _count_tasks() -> int:
    def walk(task: trio.lowlevel.Task) -> int:
        return 1 + sum(walk(child) for nursery in task.child_nurseries
                       for child in nursery.child_tasks)

    return walk(trio.lowlevel.current_root_task())


async def test_ready_message_describes_the_session(server: RunningServer) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with open_websocket_url(server.ws_url("call_id=abc-1&sample_rate=16000")) as ws:
            ready = json.loads(await ws.get_message())
    assert ready["type"] == "ready"
    assert ready["call_id"] == "abc-1"
    assert ready["sample_rate"] == 16000
    assert ready["backend"] == "mock"
    assert len(ready["session_id"]) == 12


async def test_fixtures_streamed_fast_give_their_reference_finals(server: RunningServer) -> None:
    refs = reference_texts()
    names = ["ps_goforward", "ps_cards_001", "ps_librivox_0880", "ps_librivox_0930"]
    audio = np.concatenate([part for name in names for part in (load_pcm(name), silence(1.0))])
    with trio.fail_after(TIMEOUT_S):
        async with open_websocket_url(server.ws_url()) as ws:
            assert json.loads(await ws.get_message())["type"] == "ready"
            # Odd-sized frames: the byte carried over must not be lost.
            await send_pcm(ws, audio, chunk_bytes=3201)
            await ws.send_message(json.dumps({"type": "end"}))
            messages, code = await receive_until_close(ws)
    finals = [m for m in messages if m["type"] == "final"]
    assert [f["text"] for f in finals] == [refs[name] for name in names]
    assert [f["utterance_id"] for f in finals] == [0, 1, 2, 3]
    assert code == 1000
    assert messages[-1]["type"] == "final"
    # Utterances are ordered, do not overlap, and lie inside the audio sent.
    bounds = [(f["start_ms"], f["end_ms"]) for f in finals]
    assert all(a[1] <= b[0] for a, b in zip(bounds, bounds[1:]))
    assert bounds[-1][1] <= audio.size // 16
    # Every partial precedes its final and is a prefix of it.
    for partial in (m for m in messages if m["type"] == "partial"):
        final = finals[partial["utterance_id"]]
        assert messages.index(partial) < messages.index(final)
        assert final["text"].startswith(partial["text"])
    assert _sample(server, "sttd_audio_received_seconds_total") == pytest.approx(audio.size / 16000)
    assert _sample(server, "sttd_finals_sent_total") == 4
    assert _sample(server, "sttd_sessions_total", {"outcome": "ended"}) == 1


async def test_commit_forces_a_final_and_the_session_goes_on(server: RunningServer) -> None:
    refs = reference_texts()
    speech = _trim_trailing_quiet(load_pcm("ps_librivox_0930"))
    with trio.fail_after(TIMEOUT_S):
        async with open_websocket_url(server.ws_url()) as ws:
            await receive_type(ws, "ready")
            await send_pcm(ws, speech)
            await ws.send_message(json.dumps({"type": "commit"}))
            final = await receive_type(ws, "final")
            assert final["text"] == refs["ps_librivox_0930"]
            assert final["utterance_id"] == 0
            # The session is still open: a second utterance gets a final too.
            await send_pcm(ws, np.concatenate([load_pcm("ps_cards_001"), silence(1.0)]))
            second = await receive_type(ws, "final")
            await ws.send_message(json.dumps({"type": "end"}))
            rest, code = await receive_until_close(ws)
    assert second["text"] == refs["ps_cards_001"]
    assert second["utterance_id"] == 1
    assert [m for m in rest if m["type"] == "final"] == []
    assert code == 1000


async def test_end_finalizes_open_speech_before_closing(server: RunningServer) -> None:
    refs = reference_texts()
    speech = _trim_trailing_quiet(load_pcm("ps_goforward"))
    with trio.fail_after(TIMEOUT_S):
        async with open_websocket_url(server.ws_url()) as ws:
            await receive_type(ws, "ready")
            await send_pcm(ws, speech)
            await ws.send_message(json.dumps({"type": "end"}))
            messages, code = await receive_until_close(ws)
    assert messages[-1]["type"] == "final"
    assert messages[-1]["text"] == refs["ps_goforward"]
    assert code == 1000


async def test_a_client_that_sends_on_after_its_end_still_gets_its_connection_closed(
        server: RunningServer) -> None:
    """A microphone task still running after `end`: hypercorn hands the app 10 messages at a
    time and reads no more from the socket while they wait, so the client's close reply behind
    the frames it sent on was never read. The connection stayed open (and its tasks alive), and
    the client hung in its closing handshake. Now the server reads them off after its close."""
    refs = reference_texts()
    speech = _trim_trailing_quiet(load_pcm("ps_goforward"))
    await trio.testing.wait_all_tasks_blocked()
    baseline_tasks = _count_tasks()
    with trio.fail_after(TIMEOUT_S):
        async with open_websocket_url(server.ws_url(), disconnect_timeout=TIMEOUT_S) as ws:
            await receive_type(ws, "ready")
            await send_pcm(ws, speech)
            await ws.send_message(json.dumps({"type": "end"}))
            for _ in range(40):  # 0.8 s more of the microphone
                await ws.send_message(bytes(640))
            messages, code = await receive_until_close(ws)
        await server.state.sessions.wait_count(0)
        await trio.testing.wait_all_tasks_blocked()
    assert [m["text"] for m in messages if m["type"] == "final"] == [refs["ps_goforward"]]
    assert code == 1000
    assert _count_tasks() == baseline_tasks


async def test_a_client_that_stops_reading_is_let_go_on_the_real_server(
        nursery: trio.Nursery) -> None:
    """hypercorn shields its socket sends from cancellation, so STT_SEND_TIMEOUT_S alone could
    not end a session whose client stopped reading: it held on (and held a drain) for as long
    as the client lived. The listening socket's TCP_USER_TIMEOUT (the send timeout) now makes
    the kernel drop such a connection. The client here floods messages the server answers
    (errors) through a 4 KiB receive buffer it never reads."""
    import socket

    import wsproto
    from wsproto.events import AcceptConnection, Request, TextMessage

    server = await start_server(nursery, send_timeout_s=1.0)
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", server.port))
    stream = trio.SocketStream(sock)
    ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    await stream.send_all(ws.send(Request(host="127.0.0.1",
                                          target="/v1/stt/ws?call_id=mute&sample_rate=16000")))
    while not any(isinstance(e, AcceptConnection) for e in ws.events()):
        ws.receive_data(await stream.receive_some(4096))
    await server.state.sessions.wait_count(1)
    flood = ws.send(TextMessage(data="{not json"))
    try:
        with trio.fail_after(20):
            with trio.move_on_after(15):  # until the server lets go (its RST breaks our sends)
                try:
                    while True:
                        await stream.send_all(flood * 100)
                except trio.BrokenResourceError:
                    pass
            await server.state.sessions.wait_count(0)
    finally:
        await stream.aclose()  # else a server still stuck in its send could not shut down
    outcomes = {outcome: _sample(server, "sttd_sessions_total", {"outcome": outcome})
                for outcome in ("slow_client", "client_gone")}
    assert sum(outcomes.values()) == 1, outcomes


@pytest.mark.parametrize(("codec", "rate_hz"), [("mulaw", 8000), ("alaw", 8000),
                                               ("pcm_s16le", 8000), ("pcm_s16le", 48000)])
async def test_telephony_and_other_rates_give_the_reference_finals(
        server: RunningServer, codec: str, rate_hz: int) -> None:
    """G.711 at 8 kHz (as telephony sends it, encoded by FFmpeg) and PCM16 at other rates are
    converted to 16 kHz; frames of 30 ms, whatever a sample's size."""
    names = ["ps_cards_001", "ps_goforward"]
    pcm = np.concatenate([part for name in names for part in (load_pcm(name), silence(1.0))])
    if codec == "pcm_s16le":
        data = float32_to_pcm16(soxr.resample(pcm16_to_float32(pcm), 16000, rate_hz)).tobytes()
    else:
        data = encode_media(pcm, codec, "pcm_" + codec, rate_hz=rate_hz, layout="mono")
    chunk = len(data) * 30 // (1000 * len(pcm) // 16000)  # about 30 ms
    with trio.fail_after(TIMEOUT_S):
        async with open_websocket_url(server.ws_url(
                f"call_id=t&sample_rate={rate_hz}&codec={codec}")) as ws:
            ready = await receive_type(ws, "ready")
            for offset in range(0, len(data), chunk):
                await ws.send_message(data[offset:offset + chunk])
            await ws.send_message(json.dumps({"type": "end"}))
            messages, code = await receive_until_close(ws)
    assert ready["sample_rate"] == rate_hz
    refs = reference_texts()
    assert [m["text"] for m in messages if m["type"] == "final"] == [refs[n] for n in names]
    assert code == 1000


@pytest.mark.parametrize(("query", "timed"), [("", True), ("&words=false", False)])
async def test_words_false_gives_finals_without_word_timings(server: RunningServer, query: str,
                                                             timed: bool) -> None:
    speech = _trim_trailing_quiet(load_pcm("ps_goforward"))
    with trio.fail_after(TIMEOUT_S):
        async with open_websocket_url(server.ws_url("call_id=w&sample_rate=16000" + query)) as ws:
            await receive_type(ws, "ready")
            await send_pcm(ws, speech)
            await ws.send_message(json.dumps({"type": "end"}))
            messages, _ = await receive_until_close(ws)
    [final] = [m for m in messages if m["type"] == "final"]
    assert final["text"] == reference_texts()["ps_goforward"]
    assert [w["word"] for w in final["words"]] == (final["text"].split() if timed else [])


@pytest.mark.parametrize("abrupt", [False, True], ids=["close-frame", "tcp-reset"])
@pytest.mark.parametrize("after_end", [False, True], ids=["mid-utterance", "after-end"])
async def test_disconnect_leaks_nothing(server: RunningServer, abrupt: bool,
                                        after_end: bool) -> None:
    """A client gone mid-utterance cancels its session. After its end the session no longer
    reads the connection (its transport learns of a client gone only by reading,
    `sttd.admission.AsgiTransport`): it finishes its last finals, whose sends fail quietly, and
    ends whole."""
    speech = load_pcm("ps_librivox_0880")
    await trio.testing.wait_all_tasks_blocked()
    baseline_tasks = _count_tasks()
    with trio.fail_after(TIMEOUT_S):
        async with open_websocket_url(server.ws_url()) as ws:
            await receive_type(ws, "ready")
            if after_end:
                await send_pcm(ws, speech)
                await ws.send_message(json.dumps({"type": "end"}))
            else:
                await send_pcm(ws, speech[: speech.size // 2])
                await receive_type(ws, "partial")  # the session is mid-utterance
                assert _sample(server, "sttd_sessions_active") == 1
            if abrupt:
                await ws._stream.aclose()  # no close handshake: the peer just vanishes
        await server.state.sessions.wait_count(0)
        await trio.testing.wait_all_tasks_blocked()
    assert _sample(server, "sttd_sessions_active") == 0
    if after_end:
        assert sum(_sample(server, "sttd_sessions_total", {"outcome": outcome})
                   for outcome in ("ended", "client_gone")) == 1
        assert _sample(server, "sttd_errors_total", {"code": "internal"}) == 0
    else:
        assert _sample(server, "sttd_sessions_total", {"outcome": "client_gone"}) == 1
    assert server.state.sessions.queue_depths().audio_frames == 0
    assert _count_tasks() == baseline_tasks


async def test_a_failure_before_a_session_starts_refuses_the_upgrade_and_is_counted(
        server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug in a streaming route outside any session: the upgrade gets hypercorn's 500, the
    failure is counted as internal, and the next connection is served."""
    from trio_websocket import ConnectionRejected

    import sttd.http

    def broken(*_args: object) -> None:
        raise RuntimeError("a bug")

    with monkeypatch.context() as patched:
        patched.setattr(sttd.http, "admit_session", broken)
        with trio.fail_after(TIMEOUT_S), pytest.raises(ConnectionRejected) as refused:
            async with open_websocket_url(server.ws_url()):
                pass
    assert refused.value.status_code == 500
    assert _sample(server, "sttd_errors_total", {"code": "internal"}) == 1
    with trio.fail_after(TIMEOUT_S):
        async with open_websocket_url(server.ws_url()) as ws:
            await receive_type(ws, "ready")


INVALID_QUERIES = [
    ("sample_rate=16000", "call_id"),
    ("call_id=&sample_rate=16000", "call_id"),
    ("call_id=a", "sample_rate"),
    ("call_id=a&sample_rate=1000", "sample_rate"),
    ("call_id=a&sample_rate=400000", "sample_rate"),
    ("call_id=a&sample_rate=abc", "sample_rate"),
    ("call_id=a&sample_rate=16000&codec=opus", "codec"),
    ("call_id=a&sample_rate=16000&channels=2", "channels"),
    ("call_id=a&sample_rate=16000&frame_ms=5", "frame_ms"),
    ("call_id=a&sample_rate=16000&frame_ms=201", "frame_ms"),
    ("call_id=a&sample_rate=16000&partial_ms=99", "partial_ms"),
    ("call_id=a&sample_rate=16000&language=not_a_language", "language"),
    ("call_id=a&sample_rate=16000&hotwords=" + ",".join(["w"] * 101), "hotwords"),
]


@pytest.mark.parametrize(("query", "param"), INVALID_QUERIES)
async def test_invalid_parameter_gets_error_then_1008(
    server: RunningServer, query: str, param: str
) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with open_websocket_url(server.ws_url(query)) as ws:
            messages, code = await receive_until_close(ws)
    assert code == 1008
    assert len(messages) == 1
    assert messages[0]["type"] == "error"
    assert messages[0]["code"] == "invalid_param"
    assert param in messages[0]["message"]
    assert _sample(server, "sttd_errors_total", {"code": "invalid_param"}) == 1
    assert _sample(server, "sttd_sessions_total", {"outcome": "rejected"}) == 1


async def test_unsupported_language_is_refused(server: RunningServer) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with open_websocket_url(server.ws_url("call_id=a&sample_rate=16000&language=fr")) as ws:
            messages, code = await receive_until_close(ws)
    assert code == 1008
    assert [m["code"] for m in messages] == ["unsupported_language"]
    assert "'fr'" in messages[0]["message"]


async def test_bad_text_message_is_reported_and_the_session_goes_on(server: RunningServer) -> None:
    refs = reference_texts()
    with trio.fail_after(TIMEOUT_S):
        async with open_websocket_url(server.ws_url()) as ws:
            await receive_type(ws, "ready")
            await ws.send_message("this is not json")
            first = json.loads(await ws.get_message())
            await ws.send_message(json.dumps({"type": "rewind"}))
            second = json.loads(await ws.get_message())
            await ws.send_message(json.dumps({"type": "keepalive"}))
            await send_pcm(ws, np.concatenate([load_pcm("ps_cards_001"), silence(1.0)]))
            await ws.send_message(json.dumps({"type": "end"}))
            messages, code = await receive_until_close(ws)
    assert (first["type"], first["code"]) == ("error", "invalid_message")
    assert (second["type"], second["code"]) == ("error", "invalid_message")
    assert "rewind" in second["message"]
    assert [m["text"] for m in messages if m["type"] == "final"] == [refs["ps_cards_001"]]
    assert code == 1000
    assert _sample(server, "sttd_errors_total", {"code": "invalid_message"}) == 2


async def test_silence_gives_no_transcripts(server: RunningServer) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with open_websocket_url(server.ws_url()) as ws:
            await receive_type(ws, "ready")
            await send_pcm(ws, silence(3.0))
            await ws.send_message(json.dumps({"type": "end"}))
            messages, code = await receive_until_close(ws)
    assert messages == []
    assert code == 1000


async def test_sessions_are_independent(server: RunningServer) -> None:
    refs = reference_texts()
    results: dict[str, list[str]] = {}

    async def one(name: str) -> None:
        async with open_websocket_url(server.ws_url(f"call_id={name}&sample_rate=16000")) as ws:
            await receive_type(ws, "ready")
            await send_pcm(ws, np.concatenate([load_pcm(name), silence(1.0)]), chunk_bytes=640)
            await ws.send_message(json.dumps({"type": "end"}))
            messages, _ = await receive_until_close(ws)
        results[name] = [m["text"] for m in messages if m["type"] == "final"]

    names = ["ps_goforward", "ps_cards_001", "ps_librivox_0880", "ps_librivox_0930"]
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            for name in names:
                nursery.start_soon(one, name)
    assert results == {name: [refs[name]] for name in names}


async def test_new_sessions_are_refused_while_the_engine_is_overloaded(
        server: RunningServer) -> None:
    engine = server.state.engine
    assert engine is not None
    with trio.fail_after(TIMEOUT_S):
        async with open_websocket_url(server.ws_url()) as live:
            await receive_type(live, "ready")
            engine.scheduler._final_wait_ewma_s = 2 * engine.scheduler.config.max_final_wait_s
            engine.scheduler._final_wait_at = trio.current_time()  # as if a final just waited
            async with open_websocket_url(server.ws_url()) as refused:
                messages, code = await receive_until_close(refused)
            assert code == 1013
            assert [m["code"] for m in messages] == ["overloaded"]
            assert "STT_MAX_FINAL_WAIT_S" in messages[0]["message"]
            # The session already open is untouched.
            await send_pcm(live, np.concatenate([load_pcm("ps_cards_001"), silence(1.0)]))
            await live.send_message(json.dumps({"type": "end"}))
            finals, live_code = await receive_until_close(live)
    assert [m["text"] for m in finals if m["type"] == "final"] == [reference_texts()["ps_cards_001"]]
    assert live_code == 1000
    assert _sample(server, "sttd_sessions_total", {"outcome": "rejected"}) == 1
