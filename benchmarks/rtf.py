"""Real-time factor of the whisper backend alone and of the server's file API, same file.

backend: in this process, the file API's own work without HTTP: decode long_dev.wav, cut it at
pauses with the same VAD and transcribe the pieces with `WhisperBackend` in batches, one step
after the other (the model calls alone are timed too). server: ``POST
/v1/stt/transcribe`` of the same WAV to a ``sttd serve`` child process, timed by the client
(upload, decoding, VAD, inference, response). Rounds alternate the two; medians are reported.

    uv run --group bench python benchmarks/rtf.py --out benchmarks/results/rtf.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import DATA, RATE_HZ, RESULTS, sttd_server, write_result  # noqa: E402

COMMAND = "uv run --group bench python benchmarks/rtf.py --out benchmarks/results/rtf.json"
FILE = "long_dev.wav"


def backend_once(backend: object, data: bytes) -> tuple[float, float]:
    """Seconds for the whole file path in-process, and for the model calls alone."""
    from sttd.audio import decode_wav, float32_to_pcm16, pcm16_to_float32
    from sttd.backends.base import Request
    from sttd.engine import split_at_pauses
    from sttd.settings import Settings

    settings = Settings(backend="whisper")
    started = time.perf_counter()
    jobs = split_at_pauses(float32_to_pcm16(decode_wav(data)), settings)
    size = settings.max_inference_batch_size
    model_s = 0.0
    for first in range(0, len(jobs), size):
        requests = [Request(pcm16_to_float32(j.audio)) for j in jobs[first:first + size]]
        model_started = time.perf_counter()
        backend.transcribe(requests)  # type: ignore[attr-defined]
        model_s += time.perf_counter() - model_started
    return time.perf_counter() - started, model_s


async def server_rounds(data: bytes, rounds: int, backend: object
                        ) -> tuple[list[float], list[float], list[float]]:
    server_s: list[float] = []
    backend_s: list[float] = []
    model_s: list[float] = []
    async with sttd_server(STT_BACKEND="whisper") as server:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=600) as client:
            await client.post("/v1/stt/transcribe", files={"file": (FILE, data)})  # warm-up
            for _ in range(rounds):
                whole, model = await trio.to_thread.run_sync(backend_once, backend, data)
                backend_s.append(whole)
                model_s.append(model)
                started = time.perf_counter()
                response = await client.post("/v1/stt/transcribe", files={"file": (FILE, data)})
                response.raise_for_status()
                server_s.append(time.perf_counter() - started)
    return backend_s, server_s, model_s


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=RESULTS / "rtf.json")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    from sttd.backends.whisper import WhisperBackend, WhisperOptions
    from sttd.settings import Settings

    backend = WhisperBackend.load(WhisperOptions.from_settings(Settings()))
    data = (DATA / FILE).read_bytes()
    backend_once(backend, data)  # warm-up
    backend_s, server_s, model_s = trio.run(server_rounds, data, args.rounds, backend)
    audio_s = (len(data) - 44) / 2 / RATE_HZ
    b, s = statistics.median(backend_s), statistics.median(server_s)
    result = {
        "file": FILE, "audio_seconds": round(audio_s, 2), "rounds": args.rounds,
        "backend_seconds": backend_s, "server_seconds": server_s,
        "backend_rtf_median": b / audio_s, "server_rtf_median": s / audio_s,
        "server_overhead_ratio": s / b,
        "model_only_seconds": model_s,
        "model_only_rtf_median": statistics.median(model_s) / audio_s,
        "server_vs_model_only_ratio": s / statistics.median(model_s),
    }
    print(f"backend RTF {b / audio_s:.4f}  server RTF {s / audio_s:.4f}  ratio {s / b:.3f}  "
          f"model-only RTF {result['model_only_rtf_median']:.4f}")
    write_result(args.out, COMMAND, result)


if __name__ == "__main__":
    main()
