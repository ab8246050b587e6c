"""Qwen3-ASR on a real GPU, end to end: the model loads in the server and transcribes speech.

Skipped where vLLM or CUDA is missing (CI has neither); these are not counted as coverage there.
On a CUDA machine, with the model in the hub cache or STT_VLLM_MODEL naming a local copy:

    uv sync --extra qwen3 && uv run pytest tests/gpu -v

The speech is benchmarks/data (the shared recordings, with refs.tsv). Throughput and latency at
1 and 32 sessions are a benchmark, not a test: see benchmarks/README.md (qwen3).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import trio
from trio_websocket import open_websocket_url

from sttd.audio import decode_wav, float32_to_pcm16
from tests.conftest import receive_until_close, send_pcm, start_server

vllm = pytest.importorskip("vllm", reason="the qwen3 extra is not installed")
torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU", allow_module_level=True)

DATA = Path(__file__).resolve().parents[2] / "benchmarks" / "data"
MAX_WER = 0.15


def _refs() -> dict[str, str]:
    rows = (line.split("\t", 1) for line in (DATA / "refs.tsv").read_text().splitlines() if line)
    return {name.removesuffix(".wav"): text for name, text in rows}


def _wer(ref: str, hyp: str) -> float:
    import re

    def words(text: str) -> list[str]:
        return re.sub(r"[^a-z0-9' ]", " ", text.lower()).split()

    r, h = words(ref), words(hyp)
    d = list(range(len(h) + 1))
    for i, rw in enumerate(r, 1):
        prev, d[0] = d[0], i
        for j, hw in enumerate(h, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (rw != hw))
    return d[len(h)] / max(len(r), 1)


def _model() -> str:
    return os.environ.get("STT_VLLM_MODEL", "Qwen/Qwen3-ASR-1.7B")


async def test_streamed_clips_are_transcribed(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, backend="qwen3", vllm_model=_model(),
                                load_timeout_s=900)
    refs = _refs()
    names = [name for name in refs if name != "long_dev"]
    refs_all, hyps_all = [], []
    for name in names:
        pcm = float32_to_pcm16(decode_wav((DATA / f"{name}.wav").read_bytes()))
        pcm = np.concatenate([pcm, np.zeros(16000, np.int16)])
        async with open_websocket_url(server.ws_url(f"call_id={name}&sample_rate=16000")) as ws:
            await ws.get_message()
            await send_pcm(ws, pcm, chunk_bytes=640)
            await ws.send_message(json.dumps({"type": "end"}))
            messages, code = await receive_until_close(ws)
        finals = [m for m in messages if m["type"] == "final"]
        assert code == 1000 and finals
        assert all(m["language"] == "en" for m in finals if m["text"])
        refs_all.append(refs[name])
        hyps_all.append(" ".join(m["text"] for m in finals))
    assert _wer(" ".join(refs_all), " ".join(hyps_all)) <= MAX_WER


async def test_a_long_file_over_the_openai_api(nursery: trio.Nursery) -> None:
    import httpx

    server = await start_server(nursery, backend="qwen3", vllm_model=_model(),
                                load_timeout_s=900)
    audio = (DATA / "long_dev.wav").read_bytes()
    async with httpx.AsyncClient(timeout=300) as client:
        response = await client.post(f"{server.http_url}/v1/audio/transcriptions",
                                     data={"model": "qwen3", "response_format": "verbose_json"},
                                     files={"file": ("long_dev.wav", audio, "audio/wav")})
    assert response.status_code == 200
    body = response.json()
    assert body["language"] == "english"
    assert _wer(_refs()["long_dev"], body["text"]) <= MAX_WER
