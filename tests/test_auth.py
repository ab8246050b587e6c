"""Access and CORS against the real server on loopback: bearer keys, ?token=, /metrics, origins."""

from __future__ import annotations

import hmac
import json
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import trio
from trio_websocket import open_websocket_url

from sttd.audio import encode_wav, pcm16_to_float32
from sttd.admission import Access
from sttd.errors import ConfigError
from sttd.server import serve
from sttd.settings import Settings
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
from tests.test_cli import _env

TIMEOUT_S = 30
TRANSCRIBE = "/v1/stt/transcribe"
KEYS = ("k-first", "k-second")


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _upload() -> dict[str, tuple[str, bytes]]:
    audio = np.concatenate([silence(0.5), load_pcm("ps_cards_001"), silence(0.5)])
    return {"file": ("a.wav", encode_wav(pcm16_to_float32(audio)))}


def _errors(server: RunningServer, code: str) -> float:
    value = server.state.metrics.registry.get_sample_value("sttd_errors_total", {"code": code})
    return value or 0.0


@pytest.fixture
async def locked(nursery: trio.Nursery) -> RunningServer:
    return await start_server(nursery, api_keys=" , ".join(KEYS), metrics_token="m-token")


async def test_http_api_needs_a_valid_bearer_key(locked: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=locked.http_url, timeout=TIMEOUT_S) as client:
        refused = [
            await client.post(TRANSCRIBE, files=_upload()),
            await client.post(TRANSCRIBE, files=_upload(), headers=_bearer("k-third")),
            await client.post(TRANSCRIBE, files=_upload(), headers=_bearer("k-first-")),
            await client.post(TRANSCRIBE, files=_upload(), headers={"Authorization": "k-first"}),
            await client.post(TRANSCRIBE, files=_upload(), headers={"Authorization": "Basic k-first"}),
            # ?token= is for browsers' WebSockets only.
            await client.post(TRANSCRIBE, files=_upload(), params={"token": "k-first"}),
            await client.get("/v1/anything"),
        ]
        accepted = [await client.post(TRANSCRIBE, files=_upload(), headers=_bearer(key))
                    for key in KEYS]
        lower = await client.post(TRANSCRIBE, files=_upload(),
                                  headers={"Authorization": "bearer k-second"})
        health = await client.get("/health")
    for response in refused:
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json()["error"]["code"] == "unauthorized"
        assert "k-first" not in response.text
    text = reference_texts()["ps_cards_001"]
    assert [r.json()["text"] for r in [*accepted, lower]] == [text, text, text]
    assert health.status_code == 200  # /health stays open
    assert _errors(locked, "unauthorized") == len(refused)


async def test_websocket_needs_a_key_in_the_header_or_the_token_parameter(
        locked: RunningServer) -> None:
    refs = reference_texts()
    speech = np.concatenate([load_pcm("ps_goforward"), silence(1.0)])
    end = json.dumps({"type": "end"})
    token_query = "call_id=a&sample_rate=16000&token="
    refused: list[tuple[str, list[tuple[bytes, bytes]]]] = [
        (locked.ws_url(), []),
        (locked.ws_url(token_query + "nope"), []),
        (locked.ws_url(), [(b"Authorization", b"Bearer nope")]),
    ]
    accepted: list[tuple[str, list[tuple[bytes, bytes]]]] = [
        (locked.ws_url(), [(b"Authorization", b"Bearer k-second")]),
        (locked.ws_url(token_query + "k-first"), []),
    ]
    finals = []
    with trio.fail_after(TIMEOUT_S):
        for url, headers in refused:
            async with open_websocket_url(url, extra_headers=headers) as ws:
                messages, code = await receive_until_close(ws)
            assert [(m["type"], m["code"]) for m in messages] == [("error", "unauthorized")]
            assert code == 1008
        for url, headers in accepted:
            async with open_websocket_url(url, extra_headers=headers) as ws:
                await receive_type(ws, "ready")
                await send_pcm(ws, speech)
                await ws.send_message(end)
                messages, code = await receive_until_close(ws)
            assert code == 1000
            finals.append([m["text"] for m in messages if m["type"] == "final"])
    assert finals == [[refs["ps_goforward"]]] * 2
    assert _errors(locked, "unauthorized") == len(refused)


@pytest.mark.parametrize("key", ["k-first", "nope"])
async def test_deepgram_browsers_key_comes_as_subprotocols_and_one_is_accepted_back(
        locked: RunningServer, key: str) -> None:
    """Deepgram's browser form, ``new WebSocket(url, ["token", key])``: the key is read from the
    subprotocols, and ``token`` is accepted back (a browser drops a connection whose server
    picks none of the subprotocols it offered)."""
    url = f"ws://127.0.0.1:{locked.port}/v1/listen?encoding=linear16&sample_rate=16000"
    speech = np.concatenate([load_pcm("ps_goforward"), silence(1.0)])
    with trio.fail_after(TIMEOUT_S):
        async with open_websocket_url(url, subprotocols=["token", key]) as ws:
            assert ws.subprotocol == "token"
            if key == "nope":
                messages, code = await receive_until_close(ws)
                assert code == 1008 and "unauthorized" in json.dumps(messages)
                return
            await send_pcm(ws, speech)
            await ws.send_message(json.dumps({"type": "CloseStream"}))
            messages, code = await receive_until_close(ws)
    assert code == 1000
    said = " ".join(m["channel"]["alternatives"][0]["transcript"] for m in messages
                    if m.get("type") == "Results" and m["is_final"])
    assert said.strip() == reference_texts()["ps_goforward"]


async def test_metrics_needs_its_token_when_one_is_set(locked: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=locked.http_url, timeout=TIMEOUT_S) as client:
        bare = await client.get("/metrics")
        with_api_key = await client.get("/metrics", headers=_bearer("k-first"))
        scraped = await client.get("/metrics", headers=_bearer("m-token"))
    assert [bare.status_code, with_api_key.status_code] == [401, 401]
    assert bare.headers["www-authenticate"] == "Bearer"
    assert scraped.status_code == 200
    assert 'sttd_errors_total{code="unauthorized"} 2.0' in scraped.text


async def test_without_keys_everything_is_open(server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=server.http_url, timeout=TIMEOUT_S) as client:
        upload = await client.post(TRANSCRIBE, files=_upload())
        metrics = await client.get("/metrics")
    assert upload.status_code == 200
    assert metrics.status_code == 200
    # A stray ?token= does not upset the session's parameters.
    with trio.fail_after(TIMEOUT_S):
        async with open_websocket_url(server.ws_url("call_id=a&sample_rate=16000&token=x")) as ws:
            ready = await receive_type(ws, "ready")
    assert ready["call_id"] == "a"


def test_key_file_takes_keys_and_skips_comments_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# the team's keys\n\n  k-file-1  \n#k-commented\nk-file-2\n")
    access = Access.from_settings(Settings(api_keys="k-env", api_keys_file=str(path)))
    assert access.api_keys == (b"k-env", b"k-file-1", b"k-file-2")
    assert access.allows_api("Bearer k-file-2")
    assert not access.allows_api("Bearer k-commented")
    assert "k-env" not in repr(access)


@pytest.mark.parametrize(("content", "message"), [
    (None, "STT_API_KEYS_FILE must name a readable file of keys"),
    ("# only a comment\n\n", "STT_API_KEYS_FILE must hold at least one key"),
    ("good\nbad key\n", "STT_API_KEYS_FILE keys must be printable ASCII without spaces; line 2"),
], ids=["missing", "no-keys", "space-in-key"])
async def test_bad_key_file_stops_startup_naming_the_variable(
        tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "keys"
    if content is not None:
        path.write_text(content)
    settings = Settings(backend="mock", host="127.0.0.1", port=0, api_keys_file=str(path))
    with trio.fail_after(TIMEOUT_S), pytest.raises(ConfigError) as raised:
        await serve(settings)
    assert message in str(raised.value)
    assert "bad key" not in str(raised.value)


def test_every_key_is_compared_even_after_a_match(monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[bytes] = []
    compare_digest = hmac.compare_digest

    def recording(presented: bytes, key: bytes) -> bool:
        compared.append(key)
        return compare_digest(presented, key)

    monkeypatch.setattr("sttd.admission._auth.hmac.compare_digest", recording)
    access = Access(api_keys=(b"a", b"b", b"c"))
    assert access.allows_api("Bearer a")
    assert not access.allows_api("Bearer z")
    assert compared == [b"a", b"b", b"c"] * 2


CORS_CASES = [
    pytest.param("", "https://app.example", False, id="unset"),
    pytest.param("https://app.example, https://other.example", "https://app.example", True,
                 id="listed"),
    pytest.param("https://app.example", "https://evil.example", False, id="not-listed"),
    pytest.param("*", "https://any.example", True, id="any"),
]


@pytest.mark.parametrize(("origins", "origin", "allowed"), CORS_CASES)
async def test_cors_answers_allowed_origins_only(
        nursery: trio.Nursery, origins: str, origin: str, allowed: bool) -> None:
    server = await start_server(nursery, cors_origins=origins, api_keys="k-first")
    async with httpx.AsyncClient(base_url=server.http_url, timeout=TIMEOUT_S) as client:
        preflight = await client.options(TRANSCRIBE, headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization"})
        refused = await client.post(TRANSCRIBE, files=_upload(), headers={"Origin": origin})
        accepted = await client.post(TRANSCRIBE, files=_upload(),
                                     headers={"Origin": origin, **_bearer("k-first")})
        health = await client.get("/health", headers={"Origin": origin})
    assert preflight.status_code == 204  # preflights carry no credentials
    assert [refused.status_code, accepted.status_code] == [401, 200]
    for response in (preflight, refused, accepted, health):
        cors = {k: v for k, v in response.headers.items() if k.startswith("access-control-")}
        if allowed:
            assert cors.pop("access-control-allow-origin") == origin
            assert response.headers["vary"] == "Origin"
        if allowed and response is preflight:
            assert cors == {"access-control-allow-methods": "GET, POST, OPTIONS",
                            "access-control-allow-headers": "Authorization, Content-Type",
                            "access-control-max-age": "600"}
        else:
            assert cors == {}
    if not origins:
        assert "vary" not in health.headers


async def test_cli_stops_on_an_unreadable_key_file_naming_the_variable(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-keys"
    with trio.fail_after(TIMEOUT_S):
        result = await trio.run_process(
            [sys.executable, "-m", "sttd.cli", "serve"], capture_stderr=True, check=False,
            env=_env(STT_BACKEND="mock", STT_HOST="127.0.0.1", STT_PORT="0",
                     STT_API_KEYS_FILE=str(missing)))
    assert result.returncode == 2
    assert (f"sttd: STT_API_KEYS_FILE must name a readable file of keys, got '{missing}' "
            "(No such file or directory)") in result.stderr.decode()
