"""The remote backend against a vLLM-shaped upstream on loopback (tests/fake_vllm.py: its status
codes, error bodies and prompts copied from vLLM's source), and against another sttd server.

An sttd front door (mock VAD, remote backend) takes live streams and files over its real wire
APIs; what reaches the upstream's model, and what /health says, is checked on both sides.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np
import pytest
import trio
from trio_websocket import open_websocket_url

from sttd.backends.base import Request
from sttd.backends.mock import MockBackend
from sttd.backends.remote import RemoteBackend
from tests.conftest import (
    RunningServer,
    load_pcm,
    receive_until_close,
    reference_texts,
    send_pcm,
    silence,
    start_server,
)
from tests.fake_vllm import MODEL, FakeVllm, start_fake_vllm

TIMEOUT_S = 60
NAMES = ("ps_cards_001", "ps_librivox_0880", "ps_goforward")


async def _stream(front: RunningServer, query: str,
                  names: tuple[str, ...] = NAMES) -> tuple[list[dict[str, Any]], int]:
    """Stream each fixture then a second of silence, end, and every message until the close."""
    async with open_websocket_url(front.ws_url(f"call_id=t&sample_rate=16000&{query}")) as ws:
        await ws.get_message()  # ready
        for name in names:
            # 20 ms frames: partials come between them as they would live.
            await send_pcm(ws, np.concatenate([load_pcm(name), silence(1.0)]), chunk_bytes=640)
        await ws.send_message(json.dumps({"type": "end"}))
        return await receive_until_close(ws)


async def _health(front: RunningServer) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=10) as client:
        return (await client.get(f"{front.http_url}/health")).json()  # type: ignore[no-any-return]


async def _stream_paced(front: RunningServer, fake: FakeVllm, query: str, chunk_s: float = 0.25
                        ) -> tuple[list[dict[str, Any]], int]:
    """As `_stream`, one chunk at a time, each after the upstream's model got a prompt for the
    one before (a partial; at most a second's wait where none comes, in a pause): so every
    partial the session asks for is decoded, as on a live line, whatever this machine's speed."""
    chunk = int(chunk_s * 16000)
    async with open_websocket_url(front.ws_url(f"call_id=t&sample_rate=16000&{query}")) as ws:
        await ws.get_message()  # ready
        for name in NAMES:
            pcm = np.concatenate([load_pcm(name), silence(1.0)])
            for start in range(0, pcm.size, chunk):
                await send_pcm(ws, pcm[start : start + chunk], chunk_bytes=640)
                with trio.move_on_after(1.0):
                    await fake.next_prompt()
        await ws.send_message(json.dumps({"type": "end"}))
        return await receive_until_close(ws)


def _finals(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in messages if m["type"] == "final" and m["text"]]


async def test_transcriptions_route_falls_back_to_json_once_and_carries_hotwords_and_language(
        nursery: trio.Nursery) -> None:
    refs = reference_texts()
    with trio.fail_after(TIMEOUT_S):
        fake = await start_fake_vllm(nursery)
        front = await start_server(nursery, backend="remote", vad="energy",
                                   remote_urls=fake.url)
        # The front's start-up calibration sent its built-in clip (no hotwords, no language).
        calibration = len(fake.prompts)
        messages, code = await _stream(front, "language=en&hotwords=" + quote("Acme,Zyx Corp"))
        health = await _health(front)
    assert code == 1000
    assert [m for m in messages if m["type"] == "error"] == []
    assert [m["text"] for m in _finals(messages)] == [refs[name] for name in NAMES]
    # vLLM refused verbose_json once (Qwen3-ASR has no segment timestamps); from then on the
    # upstream is asked for json, which it serves.
    assert calibration > 0 and fake.formats[0] == "verbose_json"
    assert fake.formats.count("verbose_json") == 1 and set(fake.formats[1:]) == {"json"}
    # Every prompt the model saw holds the hotwords as its context and forces the language.
    assert fake.prompts[calibration:] and all(
        p.startswith("<|im_start|>system\nAcme, Zyx Corp<|im_end|>\n")
        and p.endswith("<|im_start|>assistant\nlanguage English<asr_text>")
        for p in fake.prompts[calibration:])
    assert health["status"] == "ok"


async def test_chat_route_gives_the_model_qwens_own_prompt_and_reports_the_language(
        nursery: trio.Nursery) -> None:
    from sttd.backends.qwen3 import build_prompt

    refs = reference_texts()
    with trio.fail_after(TIMEOUT_S):
        fake = await start_fake_vllm(nursery)
        front = await start_server(nursery, backend="remote", vad="energy", remote_api="chat",
                                   remote_urls=fake.url, remote_model=MODEL)
        calibration = len(fake.prompts)
        # Language auto; a partial every 250 ms of speech.
        messages, code = await _stream_paced(front, fake, "hotwords=Acme&partial_ms=250")
        health = await _health(front)
    assert code == 1000 and [m for m in messages if m["type"] == "error"] == []
    finals = _finals(messages)
    assert [m["text"] for m in finals] == [refs[name] for name in NAMES]
    assert {m["language"] for m in finals} == {"en"}  # detected by the model, sent back
    audio = np.zeros(1, np.float32)
    detect = build_prompt(Request(audio, hotwords=("Acme",)))
    assert detect in fake.prompts[calibration:]  # exactly the embedded qwen3 backend's prompt
    # Partials whose words were already stable force them, after the language the earlier
    # partials detected: the stable prefix works with auto-language over the fleet too.
    forced = [p for p in fake.prompts[calibration:] if p != detect]
    assert forced and all(p.startswith(detect + "language English<asr_text>") for p in forced)
    assert health["status"] == "ok"


async def test_a_request_the_upstream_refuses_is_not_healthy_and_shows_on_health(
        nursery: trio.Nursery) -> None:
    with trio.fail_after(TIMEOUT_S):
        fake = await start_fake_vllm(nursery)
        front = await start_server(nursery, backend="remote", vad="energy",
                                   remote_urls=fake.url,
                                   streaming_chunk_size_sec=60.0)
        calibration = len(fake.formats)
        # Xhosa is a language vLLM's Qwen3-ASR refuses, 400 for every utterance.
        names = NAMES + NAMES
        messages, code = await _stream(front, "language=xh", names)
        health = await _health(front)
    errors = [m for m in messages if m["type"] == "error"]
    assert code == 1000 and len(errors) == len(names)
    assert all("Unsupported language: 'xh'" in m["message"] for m in errors)
    assert health["status"] == "degraded"
    assert "the last 6 requests" in health["reason"] and "Unsupported language" in health["reason"]
    assert front.state.engine is not None
    backend = front.state.engine.backend
    assert isinstance(backend, RemoteBackend)
    # The upstream itself is fine: it answered. It is not ejected, and one request per
    # utterance was sent, never a retry.
    assert not backend.pool.all_ejected()
    assert len(fake.formats) - calibration == len(names)


async def test_an_unknown_model_ejects_the_upstream_and_the_other_serves(
        nursery: trio.Nursery) -> None:
    refs = reference_texts()
    with trio.fail_after(TIMEOUT_S):
        right = await start_fake_vllm(nursery)
        wrong = await start_fake_vllm(nursery, served="Qwen/Qwen3-ASR-0.6B")
        front = await start_server(nursery, backend="remote", vad="energy",
                                   remote_urls=f"{wrong.url},{right.url}", remote_model=MODEL,
                                   remote_eject_s=30.0, streaming_chunk_size_sec=60.0)
        messages, code = await _stream(front, "")
        health = await _health(front)
    assert code == 1000 and [m for m in messages if m["type"] == "error"] == []
    assert [m["text"] for m in _finals(messages)] == [refs[name] for name in NAMES]
    assert front.state.engine is not None
    backend = front.state.engine.backend
    assert isinstance(backend, RemoteBackend)
    ejected = next(u for u in backend.pool.upstreams if u.url == wrong.url)
    assert ejected.failures >= 1 and wrong.prompts == []  # 404, then left out
    assert health["status"] == "ok"


async def test_every_request_failing_shows_as_degraded(nursery: trio.Nursery) -> None:
    with trio.fail_after(TIMEOUT_S):
        fake = await start_fake_vllm(nursery, served="other-model")
        front = await start_server(nursery, backend="remote", vad="energy",
                                   remote_urls=fake.url, remote_model=MODEL,
                                   streaming_chunk_size_sec=60.0)
        messages, code = await _stream(front, "", NAMES[:1])
        health = await _health(front)
    [error] = [m for m in messages if m["type"] == "error"]
    assert "does not exist" in error["message"] and "HTTP 404" in error["message"]
    assert code == 1000
    assert (health["status"], health["reason"]) == ("degraded", "every remote upstream is failing")


async def test_openai_file_route_through_vllm_and_through_another_sttd(
        nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch) -> None:
    """The front's OpenAI route (verbose_json asked by the client) over each kind of upstream;
    the sttd upstream gets the hotwords and language as the front's own requests."""
    import openai

    from sttd.audio import encode_wav, pcm16_to_float32

    refs = reference_texts()
    audio = np.concatenate([silence(0.3), load_pcm("ps_cards_001"), silence(1.0),
                            load_pcm("ps_goforward"), silence(0.3)])
    wav = encode_wav(pcm16_to_float32(audio))
    expected = f"{refs['ps_cards_001']} {refs['ps_goforward']}"
    with trio.fail_after(TIMEOUT_S):
        fake = await start_fake_vllm(nursery)
        upstream = await start_server(nursery, vad="energy")  # sttd, mock backend
        seen: list[Request] = []
        original = MockBackend.transcribe

        def recording(self: MockBackend, requests: Any) -> Any:
            seen.extend(requests)
            return original(self, requests)

        monkeypatch.setattr(MockBackend, "transcribe", recording)
        results, calibration = {}, 0
        for name, url in (("vllm", fake.url), ("sttd", f"{upstream.http_url}/v1")):
            front = await start_server(nursery, backend="remote", vad="energy", remote_urls=url)
            if name == "vllm":
                calibration = len(fake.prompts)
            client = openai.OpenAI(base_url=f"{front.http_url}/v1", api_key="x", max_retries=0)
            results[name] = await trio.to_thread.run_sync(
                lambda: client.audio.transcriptions.create(
                    model="whisper-1", file=("a.wav", wav), response_format="verbose_json",
                    language="en", prompt="Acme, Zyx"))
    assert results["vllm"].text == results["sttd"].text == expected
    assert results["sttd"].language == "english"
    asked = fake.prompts[calibration:]  # the calibration of the sttd front went elsewhere
    assert asked and all(p.startswith("<|im_start|>system\nAcme, Zyx<|im_end|>") and
                         p.endswith("language English<asr_text>") for p in asked)
    # The sttd upstream transcribed each piece with the front's hotwords and language (the
    # fake vLLM's model and the fronts' calibrations asked for neither).
    carried = [r for r in seen if r.hotwords or r.language]
    assert carried and all((r.hotwords, r.language) == (("Acme", "Zyx"), "en") for r in carried)
