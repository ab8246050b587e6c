"""HTTP routes against the real server on loopback: /health, /metrics, POST /v1/stt/transcribe."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import numpy as np
import pytest
import soxr
import trio
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import open_websocket_url

from sttd.audio import encode_wav, pcm16_to_float32
from tests.conftest import (
    RunningServer,
    load_pcm,
    receive_until_close,
    reference_texts,
    send_pcm,
    silence,
    start_server,
)

TIMEOUT_S = 30
TRANSCRIBE = "/v1/stt/transcribe"


@pytest.fixture
async def client(server: RunningServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.http_url, timeout=TIMEOUT_S) as http:
        yield http


def _metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _wav(name: str, rate_hz: int = 16000, sample_format: str = "pcm16", channels: int = 1,
         extensible: bool = False) -> bytes:
    samples = pcm16_to_float32(np.concatenate([silence(0.5), load_pcm(name), silence(0.5)]))
    if rate_hz != 16000:
        samples = soxr.resample(samples, 16000, rate_hz).astype(np.float32)
    return encode_wav(samples, rate_hz, sample_format=sample_format, channels=channels,
                      extensible=extensible)


async def test_health_reports_backend_and_sessions(server: RunningServer,
                                                   client: httpx.AsyncClient) -> None:
    response = await client.get("/health")
    assert response.status_code == 200
    body = response.json()
    capacity = body.pop("capacity")
    assert body == {"status": "ok", "backend": "mock", "sessions": 0}
    # The mock costs next to nothing: whatever it measured, no stream is expected to load it.
    assert set(capacity) == {"streams", "stream_demand_s", "load"} and capacity["load"] == 0
    async with open_websocket_url(server.ws_url()) as ws:
        await ws.get_message()
        busy = await client.get("/health")
    assert busy.json()["sessions"] == 1


async def test_health_is_503_while_the_engine_loads(server: RunningServer,
                                                    client: httpx.AsyncClient) -> None:
    server.state.engine = None  # as before the model finished loading
    health = await client.get("/health")
    assert health.status_code == 503
    assert health.json()["status"] == "loading"
    upload = await client.post(TRANSCRIBE, files={"file": ("a.wav", _wav("ps_cards_001"))})
    assert upload.status_code == 503
    assert upload.json()["error"]["code"] == "overloaded"
    async with open_websocket_url(server.ws_url()) as ws:
        messages, code = await receive_until_close(ws)
    assert [m["code"] for m in messages] == ["overloaded"]
    assert code == 1013


VARIANTS = [
    pytest.param(16000, "pcm16", 1, False, id="16k-pcm16-mono"),
    pytest.param(16000, "pcm8", 1, False, id="16k-pcm8"),
    pytest.param(16000, "pcm24", 1, False, id="16k-pcm24"),
    pytest.param(16000, "pcm32", 1, False, id="16k-pcm32"),
    pytest.param(16000, "float32", 1, False, id="16k-float32"),
    pytest.param(16000, "float64", 1, False, id="16k-float64"),
    pytest.param(8000, "pcm16", 1, False, id="8k-pcm16"),
    pytest.param(44100, "pcm16", 2, False, id="44k1-pcm16-stereo"),
    pytest.param(48000, "float32", 6, True, id="48k-float32-6ch-extensible"),
    pytest.param(22050, "pcm24", 2, True, id="22k05-pcm24-stereo-extensible"),
]


@pytest.mark.parametrize(("rate_hz", "sample_format", "channels", "extensible"), VARIANTS)
async def test_transcribe_accepts_every_wav_variant(
    client: httpx.AsyncClient, rate_hz: int, sample_format: str, channels: int, extensible: bool
) -> None:
    refs = reference_texts()
    data = _wav("ps_goforward", rate_hz, sample_format, channels, extensible)
    response = await client.post(TRANSCRIBE, files={"file": ("speech.wav", data, "audio/wav")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["text"] == refs["ps_goforward"]
    expected_ms = 1000 + load_pcm("ps_goforward").size // 16
    assert abs(body["duration_ms"] - expected_ms) <= 1
    assert body["latency_ms"] >= 0
    assert [s["text"] for s in body["segments"]] == [refs["ps_goforward"]]


async def test_transcribe_cuts_a_long_file_at_pauses(client: httpx.AsyncClient) -> None:
    refs = reference_texts()
    names = ["ps_librivox_0880", "ps_cards_001", "ps_goforward"]
    audio = np.concatenate([part for name in names for part in (load_pcm(name), silence(1.0))])
    data = encode_wav(pcm16_to_float32(audio))
    response = await client.post(TRANSCRIBE, params={"language": "en"},
                                 files={"file": ("long.wav", data)})
    body = response.json()
    assert body["text"] == " ".join(refs[name] for name in names)
    segments = body["segments"]
    assert [s["text"] for s in segments] == [refs[name] for name in names]
    assert all(a["end_ms"] <= b["start_ms"] for a, b in zip(segments, segments[1:]))


async def test_silent_file_gives_empty_text(client: httpx.AsyncClient) -> None:
    data = encode_wav(np.zeros(32000, np.float32))
    body = (await client.post(TRANSCRIBE, files={"file": ("quiet.wav", data)})).json()
    assert body == {**body, "text": "", "segments": [], "duration_ms": 2000}


BAD_UPLOADS = [
    pytest.param({"files": {"file": ("x.mp3", b"ID3\x04\x00" + bytes(2000))}}, 415,
                 "unsupported_media_type", id="not-wav"),
    pytest.param({"files": {"file": ("x.wav", b"RIFF\x00\x00\x00\x00WAVEjunk" + bytes(40))}}, 400,
                 "bad_audio", id="riff-without-fmt"),
    pytest.param({"files": {"file": ("x.wav", b"")}}, 415, "unsupported_media_type",
                 id="empty-file"),
    pytest.param({"files": {"other": ("x.wav", b"RIFF")}}, 400, "invalid_param",
                 id="no-file-field"),
    pytest.param({"content": b'{"file": 1}', "headers": {"content-type": "application/json"}},
                 415, "unsupported_media_type", id="json-body"),
    pytest.param({"params": {"language": "fr"}, "files": {"file": ("a.wav", b"RIFF")}}, 400,
                 "unsupported_language", id="french"),
    pytest.param({"params": {"language": "!!"}, "files": {"file": ("a.wav", b"RIFF")}}, 400,
                 "invalid_param", id="bad-language"),
]


@pytest.mark.parametrize(("request_kwargs", "status", "code"), BAD_UPLOADS)
async def test_bad_uploads_get_json_errors(
    server: RunningServer, client: httpx.AsyncClient, request_kwargs: dict[str, object],
    status: int, code: str
) -> None:
    response = await client.post(TRANSCRIBE, **request_kwargs)  # type: ignore[arg-type]
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"]
    metrics = _metrics((await client.get("/metrics")).text)
    assert metrics[("sttd_errors_total", (("code", code),))] == 1
    assert metrics[("sttd_http_requests_total",
                    (("route", TRANSCRIBE), ("status", str(status))))] == 1
    # The server is fine afterwards.
    assert (await client.get("/health")).status_code == 200


async def test_oversized_upload_is_refused_without_reading_it(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, max_upload_bytes=10_000)
    async with httpx.AsyncClient(base_url=server.http_url, timeout=TIMEOUT_S) as client:
        declared = await client.post(TRANSCRIBE, files={"file": ("a.wav", bytes(20_000))})
        assert declared.status_code == 413
        assert declared.json()["error"]["code"] == "payload_too_large"
        assert "10000" in declared.json()["error"]["message"]

        async def chunks() -> AsyncIterator[bytes]:
            boundary = b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n\r\n"
            yield boundary
            for _ in range(100):  # 100 x 1 kB with no Content-Length: streamed, never whole
                yield bytes(1000)
            yield b"\r\n--b--\r\n"

        streamed = await client.post(
            TRANSCRIBE, content=chunks(),
            headers={"content-type": "multipart/form-data; boundary=b"})
        assert streamed.status_code == 413
        assert streamed.json()["error"]["code"] == "payload_too_large"
        assert (await client.get("/health")).status_code == 200


async def test_unknown_route_is_json_404(client: httpx.AsyncClient) -> None:
    response = await client.get("/nope")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


async def test_a_wrong_method_is_counted_under_its_route(client: httpx.AsyncClient) -> None:
    """A GET on a POST route is a 405 counted under that route; an unknown path under
    "unmatched" (no client's path becomes a label)."""
    wrong = await client.get(TRANSCRIBE)
    assert (wrong.status_code, wrong.json()["error"]["code"]) == (405, "method_not_allowed")
    await client.get("/nope/" + "x" * 50)
    metrics = _metrics((await client.get("/metrics")).text)
    assert metrics[("sttd_http_requests_total", (("route", TRANSCRIBE), ("status", "405")))] == 1
    assert metrics[("sttd_http_requests_total", (("route", "unmatched"), ("status", "404")))] == 1


async def test_metrics_count_what_happened(server: RunningServer,
                                           client: httpx.AsyncClient) -> None:
    refs = reference_texts()
    names = ["ps_goforward", "ps_cards_001"]
    audio = np.concatenate([part for name in names for part in (load_pcm(name), silence(1.0))])
    with trio.fail_after(TIMEOUT_S):
        async with open_websocket_url(server.ws_url()) as ws:
            await ws.get_message()
            await send_pcm(ws, audio)
            await ws.send_message(json.dumps({"type": "end"}))
            messages, _ = await receive_until_close(ws)
    await client.get("/health")
    await client.post(TRANSCRIBE, files={"file": ("a.wav", _wav("ps_cards_001"))})
    response = await client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    metrics = _metrics(response.text)
    partials = sum(1 for m in messages if m["type"] == "partial")
    assert [m["text"] for m in messages if m["type"] == "final"] == [refs[n] for n in names]
    assert metrics[("sttd_sessions_active", ())] == 0
    assert metrics[("sttd_sessions_total", (("outcome", "ended"),))] == 1
    assert metrics[("sttd_finals_sent_total", ())] == 2
    assert metrics[("sttd_partials_sent_total", ())] == partials
    assert metrics[("sttd_audio_received_seconds_total", ())] == pytest.approx(audio.size / 16000)
    assert metrics[("sttd_frames_dropped_total", ())] == 0
    assert metrics[("sttd_partials_dropped_total", ())] == 0
    assert metrics[("sttd_final_latency_seconds_count", ())] == 2
    assert metrics[("sttd_frame_lag_seconds_count", ())] == -(-audio.nbytes // 3200)  # each frame
    # Stream: 2 finals + its partials; file: 1 final. The stream's two finals may share one
    # batched backend call (it is sent as fast as the socket takes it).
    assert metrics[("sttd_scheduler_requests_total", (("kind", "final"), ("outcome", "ok")))] == 3
    assert 2 <= metrics[("sttd_inference_duration_seconds_count", (("kind", "final"),))] <= 3
    assert metrics.get(("sttd_inference_duration_seconds_count", (("kind", "partial"),)), 0) >= partials
    assert metrics[("sttd_http_requests_total", (("route", "/health"), ("status", "200")))] == 1
    assert metrics[("sttd_http_requests_total", (("route", TRANSCRIBE), ("status", "200")))] == 1
    assert metrics[("sttd_queue_depth", (("queue", "audio_in"),))] == 0
    assert metrics[("sttd_queue_depth", (("queue", "output"),))] == 0
    assert metrics[("sttd_engine_ready", ())] == 1
    assert metrics[("sttd_tasks_live", ())] > 0


async def test_a_send_or_close_racing_the_clients_close_frame_is_dropped_not_an_error() -> None:
    """hypercorn raises UnexpectedMessageError for a message sent after the client's close frame
    came in; that is the client leaving, not a server failure (it was counted `internal`)."""
    from hypercorn.utils import UnexpectedMessageError

    import trio

    from sttd.admission import AsgiTransport

    async def closed_socket(message: dict[str, object]) -> None:
        raise UnexpectedMessageError("ASGIWebsocketState.CLOSED", str(message["type"]))

    async def no_receive() -> dict[str, object]:
        raise AssertionError("not read")

    transport = AsgiTransport(no_receive, closed_socket, gone=trio.CancelScope(),
                              max_message_bytes=10)
    # Not delivered, so a final sent this way is not counted as sent.
    assert await transport.send('{"type": "error"}') is False
    await transport.close(1008, "invalid_param")


async def test_static_names_are_looked_up_only_from_the_packaged_list(server: RunningServer) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as client:
        too_long = await client.get("/static/" + "a" * 300 + ".js")  # ENAMETOOLONG on disk
        unknown = await client.get("/static/nope.js")
        page = await client.get("/static/index.html")
    assert (too_long.status_code, unknown.status_code, page.status_code) == (404, 404, 200)
    assert too_long.json()["error"]["code"] == "not_found"
    assert server.state.metrics.registry.get_sample_value(
        "sttd_errors_total", {"code": "internal"}) is None
