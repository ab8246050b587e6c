"""Helpers shared by the benchmarks: the data set, scoring, a server process, machine facts."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import trio

DATA = Path(__file__).resolve().parent / "data"
RESULTS = Path(__file__).resolve().parent / "results"
RATE_HZ = 16000


def references() -> dict[str, str]:
    """File name -> reference transcript, from benchmarks/data/refs.tsv."""
    rows = (line.split("\t", 1) for line in (DATA / "refs.tsv").read_text().splitlines() if line)
    return {name: text for name, text in rows}


def load(name: str) -> np.ndarray:
    """A data file as 16 kHz float32 samples."""
    from sttd.audio import decode_wav

    return decode_wav((DATA / name).read_bytes())


def wer(refs: list[str], hyps: list[str]) -> float:
    """Corpus WER after Whisper's English normalizer, as a fraction."""
    import jiwer
    from whisper_normalizer.english import EnglishTextNormalizer

    normalize = EnglishTextNormalizer()
    r = [normalize(x) or "<empty>" for x in refs]
    h = [normalize(x) for x in hyps]
    return float(jiwer.wer(r, h))


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "cpu_model": model}


def write_result(path: Path, command: str, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"command": command, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "machine": machine(), **payload}
    path.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {path}")


@attrs.frozen
class ServerProcess:
    process: trio.Process
    port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ws_url(self, query: str) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/stt/ws?{query}"


@asynccontextmanager
async def sttd_server(*, argv: tuple[str, ...] = ("-m", "sttd.cli", "serve"),
                      **settings: str) -> AsyncIterator[ServerProcess]:
    """Run ``sttd serve`` (or `argv` under this Python, which must log like it) as a child
    process on a free loopback port until the block exits."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STT_")}
    env.update({"STT_HOST": "127.0.0.1", "STT_PORT": "0", "STT_LOG_FORMAT": "json", **settings})
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(
            lambda task_status: trio.run_process(
                [sys.executable, *argv], env=env, stderr=subprocess.PIPE,
                check=False, task_status=task_status))
        assert process.stderr is not None
        buffer = b""
        port = None
        ready = False
        with trio.fail_after(120):
            while not ready:
                chunk = await process.stderr.receive_some()
                if not chunk:
                    raise RuntimeError(f"sttd exited early: {buffer.decode()[-2000:]}")
                buffer += chunk
                for line in buffer.decode(errors="replace").splitlines():
                    if '"server.listening"' in line:
                        port = int(re.search(r'"port": "(\d+)"', line).group(1))  # type: ignore[union-attr]
                    ready = ready or '"engine.ready"' in line
        nursery.start_soon(_drain, process.stderr)
        try:
            assert port is not None
            yield ServerProcess(process, port)
        finally:
            process.terminate()
            with trio.move_on_after(30):
                await process.wait()
            nursery.cancel_scope.cancel()


async def _drain(stream: trio.abc.ReceiveStream) -> None:
    while await stream.receive_some():
        pass


@attrs.frozen
class StreamOutcome:
    finals: list[dict[str, Any]]
    partials: int
    # Seconds from sending the audio at a final's speech end to receiving the final.
    latencies_s: list[float]
    close_code: int
    # Finals that start with the last stable prefix shown for their utterance, of those with one.
    stable_kept: int = 0
    stable_shown: int = 0
    # How late each frame left the client against its real-time schedule (send returned), in s.
    send_lag_s: np.ndarray = attrs.field(factory=lambda: np.zeros(0))


async def stream_file(url: str, audio: np.ndarray, *, realtime: bool = True, frame_ms: int = 20,
                      tail_ms: int = 200) -> StreamOutcome:
    """Stream float32 `audio` over one session in real time and collect what comes back.

    A final's speech end is ``end_ms - tail_ms`` (the server keeps ``tail_ms`` of audio after the
    last speech frame); its latency is counted from the moment that audio was sent.
    """
    from trio_websocket import ConnectionClosed, open_websocket_url

    from sttd.audio import float32_to_pcm16

    pcm = float32_to_pcm16(audio).tobytes()
    frame_bytes = RATE_HZ * frame_ms // 1000 * 2
    sent_at: list[float] = []  # send time of each frame
    finals: list[dict[str, Any]] = []
    latencies: list[float] = []
    partials = 0
    code = 0
    last_stable: dict[int, str] = {}
    kept = shown = 0
    lags: list[float] = []
    async with open_websocket_url(url, max_message_size=2**22) as ws:
        json.loads(await ws.get_message())

        async def receive() -> None:
            nonlocal partials, code, kept, shown
            try:
                while True:
                    message = json.loads(await ws.get_message())
                    now = trio.current_time()
                    if message["type"] == "final":
                        finals.append(message)
                        stable = _plain(last_stable.pop(message["utterance_id"], ""))
                        if stable:
                            shown += 1
                            kept += _plain(message["text"]).startswith(stable)
                        frame = max(message["end_ms"] - tail_ms, 0) // frame_ms
                        if frame < len(sent_at):
                            latencies.append(now - sent_at[frame])
                    elif message["type"] == "partial":
                        partials += 1
                        last_stable[message["utterance_id"]] = message.get("stable", "")
            except ConnectionClosed as closed:
                code = closed.reason.code

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            start = trio.current_time()
            for index, offset in enumerate(range(0, len(pcm), frame_bytes)):
                due = start + index * frame_ms / 1000
                if realtime:
                    await trio.sleep_until(due)
                sent_at.append(trio.current_time())
                await ws.send_message(pcm[offset : offset + frame_bytes])
                if realtime:
                    lags.append(trio.current_time() - due)
            await ws.send_message(json.dumps({"type": "end"}))
    return StreamOutcome(finals, partials, latencies, code, kept, shown,
                         np.asarray(lags, np.float32))


def _plain(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s']", " ", text.lower()).split())


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None
