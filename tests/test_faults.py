"""Isolation on a real server: a backend that raises on one utterance, or hangs on one, and
per-session settings that must reach that session's requests only.

The mock backend is wrapped in `FaultyBackend`, which recognises its victims by the text the mock
gives them (and records every request), so the rest of the server (scheduler, sessions, sockets)
is the real one.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import attrs
import numpy as np
import httpx
import pytest
import trio
from trio_websocket import open_websocket_url

import sttd.server._serve
from sttd.backends.base import ASRBackend, Request, Result
from sttd.errors import BackendError
from sttd.settings import Settings
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


@attrs.define
class FaultyBackend(ASRBackend):
    """The mock, except that it raises on `poison` and blocks on `hang` until released."""

    inner: ASRBackend
    poison: str
    hang: str
    release: threading.Event = attrs.field(factory=threading.Event)
    hung: threading.Event = attrs.field(factory=threading.Event)
    # (mock text, kind, hotwords, language) of every request
    seen: list[tuple[str, str, tuple[str, ...], str | None]] = attrs.field(factory=list)

    @property
    def name(self) -> str:
        return "faulty-mock"

    def check_language(self, language: str | None) -> None:
        self.inner.check_language(language)

    def transcribe(self, requests: Sequence[Request]) -> list[Result]:
        results = self.inner.transcribe(requests)
        self.seen.extend((result.text, request.kind, request.hotwords, request.language)
                         for request, result in zip(requests, results, strict=True))
        texts = {r.text for r in results}
        if self.poison in texts:
            raise BackendError("the model choked on this utterance")
        if self.hang in texts:
            self.hung.set()
            self.release.wait(timeout=TIMEOUT_S)
        return results


@pytest.fixture
def faulty(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[FaultyBackend]]:
    """The backend the server loads, once it has (a list, filled at load time)."""
    refs = reference_texts()
    holder: list[FaultyBackend] = []

    def load(settings: Settings) -> ASRBackend:
        from sttd.backends.registry import load_backend

        holder.append(FaultyBackend(load_backend(settings), refs["ps_cards_001"],
                                    refs["ps_goforward"]))
        return holder[0]

    monkeypatch.setattr(sttd.server._serve, "load_backend", load)
    yield holder
    for backend in holder:
        backend.release.set()  # never leave a worker thread blocked


async def _stream(server: RunningServer, names: list[str], query: str = "",
                  pace_s: float = 0.0) -> tuple[list[dict[str, Any]], int]:
    """Stream the fixtures, each followed by 1 s of silence, in 100 ms frames `pace_s` apart."""
    audio = [part for name in names for part in (load_pcm(name), silence(1.0))]
    async with open_websocket_url(server.ws_url() + query) as ws:
        await ws.get_message()
        for part in audio:
            for offset in range(0, part.size, 1600):
                await send_pcm(ws, part[offset : offset + 1600])
                await trio.sleep(pace_s)
        await ws.send_message(json.dumps({"type": "end"}))
        return await receive_until_close(ws)


def _finals(messages: list[dict[str, Any]]) -> list[str]:
    return [m["text"] for m in messages if m["type"] == "final"]


async def test_a_backend_error_fails_only_that_utterance_and_the_sessions_go_on(
        nursery: trio.Nursery, faulty: list[FaultyBackend]) -> None:
    refs = reference_texts()
    server = await start_server(nursery)
    outcomes: dict[str, tuple[list[dict[str, Any]], int]] = {}

    async def run(key: str, names: list[str]) -> None:
        outcomes[key] = await _stream(server, names)

    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as clients:
            clients.start_soon(run, "victim", ["ps_librivox_0880", "ps_cards_001", "ps_librivox_0930"])
            clients.start_soon(run, "bystander", ["ps_librivox_0930", "ps_librivox_0880"])
    victim, code = outcomes["victim"]
    assert code == 1000
    assert _finals(victim) == [refs["ps_librivox_0880"], refs["ps_librivox_0930"]]
    errors = [m for m in victim if m["type"] == "error"]
    assert [e["code"] for e in errors] == ["inference_failed"]
    assert "utterance 1" in errors[0]["message"]
    bystander, code = outcomes["bystander"]
    assert (code, _finals(bystander)) == (1000, [refs["ps_librivox_0930"], refs["ps_librivox_0880"]])
    assert not [m for m in bystander if m["type"] == "error"]
    assert server.state.metrics.errors_total.labels("inference_failed")._value.get() == 1


async def test_a_hung_inference_times_out_to_its_session_and_health_shows_degraded(
        nursery: trio.Nursery, faulty: list[FaultyBackend]) -> None:
    refs = reference_texts()
    server = await start_server(nursery, inference_timeout_s=1.0)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as http:
        with trio.fail_after(TIMEOUT_S):
            async with open_websocket_url(server.ws_url()) as ws:
                await ws.get_message()
                await send_pcm(ws, load_pcm("ps_goforward"))
                await send_pcm(ws, silence(1.0))
                message = json.loads(await ws.get_message())
                while message["type"] == "partial":
                    message = json.loads(await ws.get_message())
                assert (message["type"], message["code"]) == ("error", "inference_timeout")
                health = await http.get("/health")
                assert health.status_code == 200
                assert health.json()["status"] == "degraded"
                assert "STT_INFERENCE_TIMEOUT_S=1" in health.json()["reason"]
                faulty[0].release.set()  # the stuck call returns; the engine recovers
                # The session went on: its next utterance is transcribed.
                await send_pcm(ws, load_pcm("ps_librivox_0880"))
                await send_pcm(ws, silence(1.0))
                await ws.send_message(json.dumps({"type": "end"}))
                messages, code = await receive_until_close(ws)
        assert code == 1000
        assert _finals(messages) == [refs["ps_librivox_0880"]]
        health = await http.get("/health")
        assert (health.status_code, health.json()["status"]) == (200, "ok")
    assert server.state.metrics.errors_total.labels("inference_timeout")._value.get() == 1


async def test_per_session_settings_reach_only_their_own_session(
        nursery: trio.Nursery, faulty: list[FaultyBackend]) -> None:
    refs = reference_texts()
    server = await start_server(nursery)
    outcomes: dict[str, tuple[list[dict[str, Any]], int]] = {}

    async def run(key: str, names: list[str], query: str) -> None:
        outcomes[key] = await _stream(server, names, query, pace_s=0.05)  # twice real time

    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as clients:  # at the same time, on one engine
            clients.start_soon(run, "a", ["ps_librivox_0880"] * 2,
                               "&hotwords=Dashwood,Norland&language=en-US&partial_ms=100")
            clients.start_soon(run, "b", ["ps_librivox_0930"] * 2, "&partial_ms=2000")
    seen = faulty[0].seen

    def settings_of(prefix: str) -> set[tuple[tuple[str, ...], str | None]]:
        return {(hot, lang) for text, _, hot, lang in seen if text.startswith(prefix)}

    a = settings_of("he was")  # ps_librivox_0880 (a lone "he" could be either)
    b = settings_of("he might")  # ps_librivox_0930
    assert a == {(("Dashwood", "Norland"), "en-US")}
    assert b == {((), None)}
    partials = {key: sum(m["type"] == "partial" for m in messages)
                for key, (messages, _) in outcomes.items()}
    assert partials["a"] > partials["b"]  # each session kept its own partial interval
    for key, name in (("a", "ps_librivox_0880"), ("b", "ps_librivox_0930")):
        messages, code = outcomes[key]
        assert (code, _finals(messages)) == (1000, [refs[name]] * 2)


async def test_a_backend_error_on_a_file_is_a_502_not_an_internal_error(
        nursery: trio.Nursery, faulty: list[FaultyBackend]) -> None:
    import httpx

    from sttd.audio import encode_wav, pcm16_to_float32

    server = await start_server(nursery)
    wav = encode_wav(pcm16_to_float32(np.concatenate(
        [silence(0.5), load_pcm("ps_cards_001"), silence(0.5)])))  # the poisoned fixture
    async with httpx.AsyncClient(base_url=server.http_url, timeout=TIMEOUT_S) as client:
        ours = await client.post("/v1/stt/transcribe", files={"file": ("a.wav", wav)})
        openai = await client.post("/v1/audio/transcriptions", data={"model": "m"},
                                   files={"file": ("a.wav", wav)})
    for response in (ours, openai):
        assert response.status_code == 502
        assert response.json()["error"]["code"] == "inference_failed"
        assert "choked" in response.json()["error"]["message"]
    registry = server.state.metrics.registry
    assert registry.get_sample_value("sttd_errors_total", {"code": "inference_failed"}) == 2
    assert registry.get_sample_value("sttd_errors_total", {"code": "internal"}) is None
