"""What the GPU tests share: the rule that turns their skips into failures, and one real
``sttd serve`` per backend for the whole run (a vLLM engine starts once, not once per test).

Where the GPU stack is missing (CI: no vLLM, no CUDA), each GPU test is skipped, and such a
skip is never counted as coverage. With ``STTD_REQUIRE_GPU=1`` (benchmarks/gpu/run.sh sets it)
the same condition fails the test instead, so a GPU machine whose CUDA, driver or libraries
are broken cannot pass by skipping everything.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import attrs
import pytest

DATA = Path(__file__).resolve().parents[2] / "benchmarks" / "data"


def gpu_required() -> bool:
    return os.environ.get("STTD_REQUIRE_GPU", "") not in ("", "0")


def unavailable(reason: str) -> NoReturn:
    """Skip the test for `reason`, or fail it under STTD_REQUIRE_GPU=1."""
    if gpu_required():
        pytest.fail(f"STTD_REQUIRE_GPU=1, and {reason}", pytrace=False)
    pytest.skip(reason)


def require_vllm_on_cuda() -> None:
    try:
        import torch
        import vllm  # noqa: F401
    except ImportError as exc:
        unavailable(f"the qwen3 extra is not installed (`uv sync --extra qwen3`): {exc}")
    if not torch.cuda.is_available():
        unavailable(f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA GPU; "
                    "is the driver new enough for that CUDA version?")


def require_ctranslate2_on_cuda() -> None:
    import ctranslate2

    if ctranslate2.get_cuda_device_count() < 1:
        unavailable("CTranslate2 sees no CUDA GPU")


@attrs.define
class ServedBackend:
    """An ``sttd serve`` process on loopback, and every line it logged."""

    process: subprocess.Popen[bytes]
    port: int
    lines: list[dict[str, Any]]

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ws_url(self, query: str) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/stt/ws?{query}"

    def logged(self, event: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if line.get("event") == event]


def _serve(env: dict[str, str], ready_timeout_s: float) -> Iterator[ServedBackend]:
    """Start ``sttd serve`` with `env`, wait until its engine is ready, stop it after."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("STT_")}
    full.update(STT_HOST="127.0.0.1", STT_PORT="0", STT_LOG_FORMAT="json", **env)
    process = subprocess.Popen([sys.executable, "-m", "sttd.cli", "serve"], env=full,
                               stderr=subprocess.PIPE)
    assert process.stderr is not None
    arrived: queue.Queue[dict[str, Any] | None] = queue.Queue()
    lines: list[dict[str, Any]] = []

    def read() -> None:
        assert process.stderr is not None
        for raw in process.stderr:
            text = raw.decode(errors="replace").strip()
            try:
                line = json.loads(text)
            except ValueError:
                line = {"event": "stderr", "text": text}  # vLLM's own logging, a traceback
            lines.append(line)
            arrived.put(line)
        arrived.put(None)

    threading.Thread(target=read, daemon=True).start()
    port = 0
    deadline = time.monotonic() + ready_timeout_s
    try:
        while True:
            try:
                line = arrived.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                pytest.fail(f"sttd serve not ready within {ready_timeout_s:g} s")
            if line is None:
                tail = "\n".join(str(item) for item in lines[-30:])
                pytest.fail(f"sttd serve exited ({process.wait()}) before it was ready:\n{tail}")
            if line.get("event") == "server.listening":
                port = int(line["port"])
            if line.get("event") == "engine.ready":
                break
        yield ServedBackend(process, port, lines)
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def qwen3_server() -> Iterator[ServedBackend]:
    """Qwen3-ASR in vLLM (STT_VLLM_MODEL: a hub id in the cache, or a local folder)."""
    require_vllm_on_cuda()
    model = os.environ.get("STT_VLLM_MODEL", "Qwen/Qwen3-ASR-1.7B")
    yield from _serve({"STT_BACKEND": "qwen3", "STT_VLLM_MODEL": model}, ready_timeout_s=900)


@pytest.fixture(scope="session")
def whisper_cuda_server() -> Iterator[ServedBackend]:
    """The bundled tiny.en on CUDA in float16: no hub weights needed."""
    require_ctranslate2_on_cuda()
    yield from _serve({"STT_BACKEND": "whisper", "STT_WHISPER_DEVICE": "cuda",
                       "STT_WHISPER_COMPUTE_TYPE": "float16"}, ready_timeout_s=300)


def refs() -> dict[str, str]:
    rows = (line.split("\t", 1) for line in (DATA / "refs.tsv").read_text().splitlines() if line)
    return {name.removesuffix(".wav"): text for name, text in rows}


async def stream_file(server: ServedBackend, name: str, query: str = "") -> list[dict[str, Any]]:
    """Stream benchmarks/data/`name`.wav in 20 ms frames as fast as the socket takes them, then
    a second of silence and ``end``; every message until the close, which must be normal."""
    import numpy as np
    from trio_websocket import ConnectionClosed, open_websocket_url

    from sttd.audio import decode_wav, float32_to_pcm16

    pcm = float32_to_pcm16(decode_wav((DATA / f"{name}.wav").read_bytes()))
    data = np.concatenate([pcm, np.zeros(16000, np.int16)]).tobytes()
    url = server.ws_url(f"call_id={name}&sample_rate=16000" + (f"&{query}" if query else ""))
    messages: list[dict[str, Any]] = []
    async with open_websocket_url(url) as ws:
        await ws.get_message()  # ready
        for offset in range(0, len(data), 640):
            await ws.send_message(data[offset : offset + 640])
        await ws.send_message(json.dumps({"type": "end"}))
        while True:
            try:
                messages.append(json.loads(await ws.get_message()))
            except ConnectionClosed as closed:
                assert closed.reason.code == 1000, closed.reason
                return messages


def clip_names() -> list[str]:
    return [name for name in refs() if name != "long_dev"]
