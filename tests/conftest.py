"""Shared fixtures: a real sttd server on loopback, and audio from references/."""

from __future__ import annotations

import json
import re
from functools import partial
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import numpy.typing as npt
import pytest
import trio
from prometheus_client import CollectorRegistry
from trio_websocket import ConnectionClosed, WebSocketConnection

from sttd.audio import decode_wav, float32_to_pcm16
from sttd.admission import AppState
from sttd.backends import Request, Result
from sttd.backends.mock import MockBackend
from sttd.metrics import Metrics
from sttd.server import serve
from sttd.settings import Settings

REFERENCES = Path(__file__).resolve().parents[1] / "references"


def reference_texts() -> dict[str, str]:
    rows = (line.split("\t", 1) for line in (REFERENCES / "refs.tsv").read_text().splitlines())
    return {name.removesuffix(".wav"): text for name, text in rows}


def load_pcm(name: str) -> npt.NDArray[np.int16]:
    """A references/ fixture as 16 kHz int16 samples."""
    return float32_to_pcm16(decode_wav((REFERENCES / f"{name}.wav").read_bytes()))


def silence(seconds: float) -> npt.NDArray[np.int16]:
    return np.zeros(int(seconds * 16000), np.int16)


@attrs.frozen
class RunningServer:
    port: int
    state: AppState

    def ws_url(self, query: str = "call_id=test&sample_rate=16000") -> str:
        return f"ws://127.0.0.1:{self.port}/v1/stt/ws?{query}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def start_server(nursery: trio.Nursery, *, load_timeout_s: float = 10,
                       **overrides: Any) -> RunningServer:
    settings = Settings(**{"backend": "mock", "host": "127.0.0.1", "port": 0, **overrides})
    state = AppState(settings, Metrics.create(CollectorRegistry()))
    port = await nursery.start(partial(serve, settings, state=state))
    with trio.fail_after(load_timeout_s):
        await state.engine_loaded.wait()
    return RunningServer(port, state)


@pytest.fixture
def mock_requests(monkeypatch: pytest.MonkeyPatch) -> list[Request]:
    """Every request the mock backend is given from now on (the engine's start-up measurement
    included), in order."""
    seen: list[Request] = []
    transcribe = MockBackend.transcribe

    def recorded(self: MockBackend, requests: Sequence[Request]) -> list[Result]:
        seen.extend(requests)
        return transcribe(self, requests)

    monkeypatch.setattr(MockBackend, "transcribe", recorded)
    return seen


@pytest.fixture
async def server(nursery: trio.Nursery) -> AsyncIterator[RunningServer]:
    yield await start_server(nursery)


async def send_pcm(ws: WebSocketConnection, pcm: npt.NDArray[np.int16], chunk_bytes: int = 3200) -> None:
    """Send `pcm` as binary frames of `chunk_bytes`, as fast as the socket takes them."""
    data = pcm.tobytes()
    for offset in range(0, len(data), chunk_bytes):
        await ws.send_message(data[offset : offset + chunk_bytes])


async def receive_until_close(ws: WebSocketConnection) -> tuple[list[dict[str, Any]], int]:
    """Every message until the server closes; returns them and the close code."""
    messages = []
    while True:
        try:
            messages.append(json.loads(await ws.get_message()))
        except ConnectionClosed as closed:
            return messages, closed.reason.code


async def receive_type(ws: WebSocketConnection, kind: str) -> dict[str, Any]:
    """The next message of type `kind`, skipping others (partials, say)."""
    while True:
        message = json.loads(await ws.get_message())
        if message["type"] == kind:
            return message


def wer(ref: str, hyp: str) -> float:
    """Word error rate of `hyp` against `ref`, lower-cased, punctuation dropped."""

    def words(text: str) -> list[str]:
        return re.sub(r"[^a-z0-9' ]", " ", text.lower()).split()

    r, h = words(ref), words(hyp)
    d = list(range(len(h) + 1))
    for i, rw in enumerate(r, 1):
        prev, d[0] = d[0], i
        for j, hw in enumerate(h, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (rw != hw))
    return d[len(h)] / max(len(r), 1)
