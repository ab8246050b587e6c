"""Translation into English (Whisper's second task): the native WebSocket and file routes
(`task=translate`) and OpenAI's `/v1/audio/translations` with the real `openai` SDK.

The mock backend's English fixtures translate into themselves, so the plumbing is checked with
exact text; the bundled tiny.en model is English-only and refuses the task with `unsupported`.
German speech translated by Whisper base is in tests/test_packaged_models.py (it needs the
multilingual extra).
"""

from __future__ import annotations

import json
from functools import partial
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import trio
from trio_websocket import open_websocket_url

from sttd.api import TranscriptionForm
from sttd.audio import encode_wav, pcm16_to_float32
from sttd.backends.base import Request
from sttd.backends.whisper import WhisperBackend, WhisperOptions
from sttd.errors import InvalidParam, Unsupported
from sttd.api import parse_task
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

NAME = "ps_goforward"


def _wav() -> bytes:
    return encode_wav(pcm16_to_float32(np.concatenate([silence(0.3), load_pcm(NAME),
                                                       silence(0.5)])))


def _client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="unused", max_retries=0,
                         timeout=60)


async def _translate(server: RunningServer, **kwargs: Any) -> Any:
    kwargs.setdefault("file", ("call.wav", _wav(), "audio/wav"))
    kwargs.setdefault("model", "whisper-1")
    return await trio.to_thread.run_sync(partial(_client(server).audio.translations.create,
                                                 **kwargs))


def test_the_task_parameter() -> None:
    assert (parse_task(""), parse_task("Translate"), parse_task("transcribe")) == (
        "transcribe", "translate", "transcribe")
    with pytest.raises(InvalidParam, match="task must be transcribe or translate, got 'summarize'"):
        parse_task("summarize")
    form = TranscriptionForm.parse({"model": "m"}, task="translate")
    assert form.task == "translate"


async def test_openai_translations_through_the_sdk(nursery: trio.Nursery) -> None:
    server = await start_server(nursery)
    text = await _translate(server)
    assert text.text.lower().rstrip(".") == reference_texts()[NAME].lower()
    verbose = await _translate(server, response_format="verbose_json")
    assert verbose.task == "translate"  # type: ignore[attr-defined]
    assert verbose.text == text.text
    srt = await _translate(server, response_format="srt")
    assert "-->" in srt


async def test_native_routes_take_task_translate(nursery: trio.Nursery) -> None:
    server = await start_server(nursery)
    async with httpx.AsyncClient() as client:
        answer = await client.post(f"{server.http_url}/v1/stt/transcribe?task=translate",
                                   files={"file": ("call.wav", _wav(), "audio/wav")})
        assert answer.status_code == 200
        assert answer.json()["text"].lower().rstrip(".") == reference_texts()[NAME].lower()
        wrong = await client.post(f"{server.http_url}/v1/stt/transcribe?task=dub",
                                  files={"file": ("call.wav", _wav(), "audio/wav")})
        assert (wrong.status_code, wrong.json()["error"]["code"]) == (400, "invalid_param")
    async with open_websocket_url(server.ws_url(
            "call_id=t&sample_rate=16000&task=translate")) as ws:
        assert json.loads(await ws.get_message())["type"] == "ready"
        await send_pcm(ws, np.concatenate([load_pcm(NAME), silence(1.0)]))
        await ws.send_message(json.dumps({"type": "end"}))
        messages, code = await receive_until_close(ws)
    [final] = [m for m in messages if m["type"] == "final"]
    assert (final["text"].lower().rstrip("."), code) == (reference_texts()[NAME].lower(), 1000)


async def test_an_english_only_model_refuses_translation_everywhere(
        nursery: trio.Nursery) -> None:
    server = await start_server(nursery, backend="whisper", load_timeout_s=60)
    with pytest.raises(openai.BadRequestError) as caught:
        await _translate(server)
    assert caught.value.body["code"] == "unsupported"  # type: ignore[index]
    assert "English-only" in caught.value.body["message"]  # type: ignore[index]
    async with open_websocket_url(server.ws_url(
            "call_id=t&sample_rate=16000&task=translate")) as ws:
        messages, code = await receive_until_close(ws)
    assert (messages[0]["type"], messages[0]["code"], code) == ("error", "unsupported", 1008)
    assert "English-only" in messages[0]["message"]


def test_whisper_refuses_the_task_on_an_english_only_model() -> None:
    backend = WhisperBackend.load(WhisperOptions.from_settings(Settings()))
    backend.check_task("transcribe")
    with pytest.raises(Unsupported, match="STT_WHISPER_MODEL=base"):
        backend.check_task("translate")
    with pytest.raises(Unsupported):
        backend.transcribe([Request(np.zeros(16000, np.float32), task="translate")])
