"""Limits against the real server on loopback: sessions, message size, stalled HTTP clients."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from sttd.audio import encode_wav, pcm16_to_float32
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
from tests.test_wire import _trim_trailing_quiet

TIMEOUT_S = 30
END = json.dumps({"type": "end"})
# What a stalled client may wait for the server to close on it: far past the 0.5 s setting,
# short of hypercorn's own 5 s keep-alive timeout.
STALL_BOUND_S = 3
READ_TIMEOUT_S = 0.5


def _errors(server: RunningServer, code: str) -> float:
    value = server.state.metrics.registry.get_sample_value("sttd_errors_total", {"code": code})
    return value or 0.0


async def _stream_to_end(ws: WebSocketConnection, name: str) -> list[str]:
    """Stream fixture `name` and end; its finals (the session is ready already)."""
    await send_pcm(ws, np.concatenate([load_pcm(name), silence(1.0)]), chunk_bytes=640)
    await ws.send_message(END)
    messages, code = await receive_until_close(ws)
    assert code == 1000
    return [m["text"] for m in messages if m["type"] == "final"]


async def test_sessions_past_the_limit_are_refused_and_the_others_go_on(
        nursery: trio.Nursery) -> None:
    refs = reference_texts()
    server = await start_server(nursery, max_sessions=2)
    with trio.fail_after(TIMEOUT_S):
        async with open_websocket_url(server.ws_url()) as first, \
                open_websocket_url(server.ws_url()) as second:
            await receive_type(first, "ready")
            await receive_type(second, "ready")
            async with open_websocket_url(server.ws_url()) as third:
                messages, code = await receive_until_close(third)
            assert code == 1013
            assert [(m["type"], m["code"]) for m in messages] == [("error", "overloaded")]
            assert "STT_MAX_SESSIONS=2" in messages[0]["message"]
            # The two live sessions are untouched.
            finals = [await _stream_to_end(first, "ps_goforward"),
                      await _stream_to_end(second, "ps_cards_001")]
        await server.state.sessions.wait_count(0)
        # With room again, a newcomer is served.
        async with open_websocket_url(server.ws_url()) as fourth:
            await receive_type(fourth, "ready")
            finals.append(await _stream_to_end(fourth, "ps_librivox_0930"))
    assert finals == [[refs["ps_goforward"]], [refs["ps_cards_001"]], [refs["ps_librivox_0930"]]]
    assert server.state.metrics.registry.get_sample_value(
        "sttd_sessions_total", {"outcome": "rejected"}) == 1


async def test_connections_arriving_together_cannot_pass_the_session_limit(
        nursery: trio.Nursery) -> None:
    """Each admitted connection counts at once: its session registers only after the upgrade
    is accepted, and eight connections at once all passed a limit of two, counted that way."""
    server = await start_server(nursery, max_sessions=2, max_load=0)
    first: dict[int, str] = {}
    all_answered, done = trio.Event(), trio.Event()

    async def connect(index: int) -> None:
        async with open_websocket_url(server.ws_url(f"call_id=c{index}&sample_rate=16000")) as ws:
            first[index] = json.loads(await ws.get_message())["type"]
            if len(first) == 8:
                all_answered.set()
            await done.wait()  # the admitted stay connected until every answer is in

    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as clients:
            for index in range(8):
                clients.start_soon(connect, index)
            await all_answered.wait()
            done.set()
    assert sorted(first.values()) == ["error"] * 6 + ["ready"] * 2


OVERSIZED = [
    pytest.param(lambda limit: bytes(limit + 1), id="binary-one-past"),
    pytest.param(lambda limit: bytes(10 * limit), id="binary-ten-times"),
    pytest.param(lambda limit: "x" * (limit + 1), id="text-one-past"),
    pytest.param(lambda limit: "é" * (limit // 2 + 1), id="text-utf8-bytes-past"),
]


@pytest.mark.parametrize("oversized", OVERSIZED)
async def test_oversized_message_sends_the_finals_then_closes_1009(
        nursery: trio.Nursery, oversized: object) -> None:
    """The session's finals (one closed utterance, one open) come before the error and 1009.

    The message after the oversized one is of the other type, which used to stop hypercorn's
    whole server; a session beside it must not notice.
    """
    refs = reference_texts()
    limit = 64_000
    server = await start_server(nursery, max_message_bytes=limit, vad="energy")
    audio = np.concatenate([load_pcm("ps_goforward"), silence(1.0),
                            _trim_trailing_quiet(load_pcm("ps_cards_001"))])
    message = oversized(limit)  # type: ignore[operator]
    after: bytes | str = END if isinstance(message, bytes) else bytes(640)
    beside: list[list[str]] = []

    async def bystander() -> None:
        async with open_websocket_url(server.ws_url()) as ws:
            await receive_type(ws, "ready")
            beside.append(await _stream_to_end(ws, "ps_librivox_0930"))

    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as clients:
            clients.start_soon(bystander)
            async with open_websocket_url(server.ws_url()) as ws:
                await receive_type(ws, "ready")
                await send_pcm(ws, audio)
                await ws.send_message(message)
                await ws.send_message(after)
                messages, code = await receive_until_close(ws)
    finals = [m["text"] for m in messages if m["type"] == "final"]
    assert finals == [refs["ps_goforward"], refs["ps_cards_001"]]
    assert messages[-1]["type"] == "error"
    assert messages[-1]["code"] == "payload_too_large"
    assert f"at most {limit} bytes (STT_MAX_MESSAGE_BYTES)" in messages[-1]["message"]
    assert code == 1009
    assert beside == [[refs["ps_librivox_0930"]]]
    assert _errors(server, "payload_too_large") == 1
    assert _errors(server, "internal") == 0
    sessions_total = server.state.metrics.sessions_total
    assert sessions_total.labels("refused")._value.get() == 1  # not counted as a normal end
    async with httpx.AsyncClient(base_url=server.http_url, timeout=TIMEOUT_S) as client:
        assert (await client.get("/health")).status_code == 200


async def test_message_at_the_limit_is_let_through(nursery: trio.Nursery) -> None:
    refs = reference_texts()
    pcm = np.concatenate([load_pcm("ps_goforward"), silence(1.0)]).tobytes()
    server = await start_server(nursery, max_message_bytes=len(pcm))
    with trio.fail_after(TIMEOUT_S):
        async with open_websocket_url(server.ws_url()) as ws:
            await receive_type(ws, "ready")
            await ws.send_message(pcm)  # the whole recording in one message
            await ws.send_message(END)
            messages, code = await receive_until_close(ws)
    assert [m["text"] for m in messages if m["type"] == "final"] == [refs["ps_goforward"]]
    assert code == 1000


async def _read_until_closed(stream: trio.SocketStream) -> bytes:
    """Everything the server sends until it closes the connection."""
    received = b""
    with trio.fail_after(STALL_BOUND_S):
        while chunk := await stream.receive_some():
            received += chunk
    return received


async def test_stalled_request_headers_are_cut_off(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, http_read_timeout_s=READ_TIMEOUT_S)
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        await stream.send_all(b"POST /v1/stt/transcribe HTTP/1.1\r\nHost: sttd\r\nContent-Le")
        assert await _read_until_closed(stream) == b""
    async with httpx.AsyncClient(base_url=server.http_url, timeout=TIMEOUT_S) as client:
        assert (await client.get("/health")).status_code == 200


async def test_idle_kept_alive_connection_is_closed(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, http_read_timeout_s=READ_TIMEOUT_S)
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        await stream.send_all(b"GET /health HTTP/1.1\r\nHost: sttd\r\n\r\n")
        response = await _read_until_closed(stream)
    assert response.startswith(b"HTTP/1.1 200 ")
    assert json.loads(response.partition(b"\r\n\r\n")[2])["sessions"] == 0  # all of it came


async def test_a_kept_alive_connection_the_client_closes_is_closed_at_once(
        nursery: trio.Nursery) -> None:
    """A client that closes its idle kept-alive connection (every HTTP client that ends its
    session, curl, an SDK per request) is answered with the server's close at once, not after
    the keep-alive timeout: each such socket held a file descriptor in CLOSE-WAIT for
    STT_HTTP_READ_TIMEOUT_S (30 s), and 34 uploads a second made 1000 of them."""
    server = await start_server(nursery, http_read_timeout_s=60.0)
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        await stream.send_all(b"GET /health HTTP/1.1\r\nHost: sttd\r\n\r\n")
        response = await _read_until_closed_or_answered(stream)
        assert response.startswith(b"HTTP/1.1 200 ")
        # Idle: hypercorn has finished the request's cycle (its last byte went out before
        # that ended, and nothing signals the end to a client).
        await trio.sleep(0.3)
        await stream.send_eof()  # the client is done with it
        with trio.fail_after(STALL_BOUND_S):
            assert await stream.receive_some() == b""


async def test_refused_upload_closes_its_connection_without_the_body(
        nursery: trio.Nursery) -> None:
    """The body a refusal leaves unread cannot keep the connection (the timeout is long here)."""
    server = await start_server(nursery, max_upload_bytes=1000)
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        await stream.send_all(b"POST /v1/stt/transcribe HTTP/1.1\r\nHost: sttd\r\n"
                              b"Content-Type: multipart/form-data; boundary=b\r\n"
                              b"Content-Length: 10000000\r\n\r\n--b\r\n")
        response = await _read_until_closed(stream)
    assert response.startswith(b"HTTP/1.1 413 ")
    assert b"connection: close" in response


def _multipart(data: bytes, boundary: str = "b0undary") -> tuple[bytes, bytes]:
    """A request head (with Content-Length) and body uploading `data` as field 'file'."""
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\n").encode()
    body += data + f"\r\n--{boundary}--\r\n".encode()
    head = (f"POST /v1/stt/transcribe HTTP/1.1\r\nHost: sttd\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    return head, body


async def test_stalled_upload_body_gets_408_and_is_closed(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, http_read_timeout_s=READ_TIMEOUT_S)
    head, body = _multipart(encode_wav(pcm16_to_float32(load_pcm("ps_cards_001"))))
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        await stream.send_all(head + body[: len(body) // 2])
        response = await _read_until_closed(stream)
    status_line, _, rest = response.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 408 "
    error = json.loads(rest.partition(b"\r\n\r\n")[2])["error"]
    assert error["code"] == "request_timeout"
    assert "STT_HTTP_READ_TIMEOUT_S=0.5 s" in error["message"]
    assert _errors(server, "request_timeout") == 1
    assert server.state.uploads == 0


async def test_slow_upload_that_keeps_coming_is_not_cut_off(nursery: trio.Nursery) -> None:
    """Gaps shorter than the read timeout never trip it, however long the upload takes."""
    server = await start_server(nursery, http_read_timeout_s=2 * READ_TIMEOUT_S)
    head, body = _multipart(encode_wav(pcm16_to_float32(load_pcm("ps_cards_001"))))
    pieces = 8
    step = -(-len(body) // pieces)
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        await stream.send_all(head)
        for offset in range(0, len(body), step):
            await trio.sleep(READ_TIMEOUT_S / 2)  # 2 s in all: twice the read timeout
            await stream.send_all(body[offset: offset + step])
        response = await _read_until_closed_or_answered(stream)
    status_line, _, rest = response.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 200 "
    assert json.loads(rest.partition(b"\r\n\r\n")[2])["text"] == reference_texts()["ps_cards_001"]


async def _read_until_closed_or_answered(stream: trio.SocketStream) -> bytes:
    """One whole response with a Content-Length (the connection may stay open after it)."""
    received = b""
    with trio.fail_after(STALL_BOUND_S):
        while True:
            head, sep, body = received.partition(b"\r\n\r\n")
            if sep:
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                if len(body) >= length:
                    return received
            chunk = await stream.receive_some()
            if not chunk:
                return received
            received += chunk


async def test_quiet_websocket_outlives_the_http_read_timeout(nursery: trio.Nursery) -> None:
    """The read timeout is for HTTP requests: a WebSocket session waits on its idle timeout."""
    refs = reference_texts()
    server = await start_server(nursery, http_read_timeout_s=READ_TIMEOUT_S)
    with trio.fail_after(TIMEOUT_S):
        async with open_websocket_url(server.ws_url()) as ws:
            await receive_type(ws, "ready")
            await trio.sleep(3 * READ_TIMEOUT_S)  # the timeout under test is a real one
            assert await _stream_to_end(ws, "ps_cards_001") == [refs["ps_cards_001"]]


async def test_uploads_past_the_limit_are_refused_and_the_one_in_flight_goes_on(
        nursery: trio.Nursery) -> None:
    """Each upload may spool STT_MAX_UPLOAD_BYTES to disk and keeps the engine busy: past
    STT_MAX_UPLOADS in flight, newcomers get 503 overloaded; the upload in flight finishes."""
    server = await start_server(nursery, max_uploads=1)
    head, body = _multipart(encode_wav(pcm16_to_float32(load_pcm("ps_cards_001"))))
    first = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with first, httpx.AsyncClient(base_url=server.http_url, timeout=10) as client:
        await first.send_all(head + body[: len(body) // 2])  # in flight: its body still coming
        with trio.fail_after(STALL_BOUND_S):
            await server.state.wait_uploads(1)
        refused = await client.post("/v1/stt/transcribe", content=body,
                                    headers={"Content-Type": head.split(b"Content-Type: ")[1]
                                             .split(b"\r\n")[0].decode()})
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "overloaded"
        assert "STT_MAX_UPLOADS=1" in refused.json()["error"]["message"]
        await first.send_all(body[len(body) // 2:])
        response = await _read_until_closed_or_answered(first)
        assert response.startswith(b"HTTP/1.1 200 ")
        assert json.loads(response.partition(b"\r\n\r\n")[2])["text"] == (
            reference_texts()["ps_cards_001"])
        again = await client.post("/v1/stt/transcribe", content=body,
                                  headers={"Content-Type": head.split(b"Content-Type: ")[1]
                                           .split(b"\r\n")[0].decode()})
        assert again.status_code == 200
    assert _errors(server, "overloaded") == 1
