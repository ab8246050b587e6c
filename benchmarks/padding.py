"""What the whisper backend's decode window and loop retries cost and buy, clip by clip.

For each clip (the 11 short dev recordings, trimmed, and 30 synthetic sentences from espeak-ng
that no threshold was tuned on), with 300 ms of silence before and 200 ms after as a session's
utterance has, through `WhisperBackend.transcribe` one clip at a time on one thread:

* finals padded to 5, 7 and 10 s, and partials (no forced prefix) padded to 3, 4, 5 and 7 s:
  corpus WER after Whisper's English normalizer, and ms per clip;
* with the backend's defaults: how many finals looped (repeated themselves) and how each retry
  went, and what the old retry, a full 30 s window, costs on the same clips.

    uv run --group bench python benchmarks/padding.py --out benchmarks/results/padding.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _synth  # noqa: E402
from benchmarks._common import (  # noqa: E402
    _SENTENCE_FILES,
    RESULTS,
    _trimmed,
    load,
    references,
    wer,
    write_result,
)
from sttd.backends import whisper  # noqa: E402
from sttd.backends.base import Request  # noqa: E402
from sttd.settings import Settings  # noqa: E402


def _padded(clip: np.ndarray) -> np.ndarray:
    return np.concatenate([np.zeros(4800, np.float32), clip, np.zeros(3200, np.float32)])


def _sets() -> dict[str, list[tuple[np.ndarray, str]]]:
    refs = references()
    sets = {"dev": [(_padded(_trimmed(load(name))), refs[name]) for name in _SENTENCE_FILES]}
    if _synth.available():
        sets["synthetic"] = [(_padded(c.audio), c.text) for c in _synth.english()]
    return sets


def _run(backend: whisper.WhisperBackend, clips: list[tuple[np.ndarray, str]], kind: str
         ) -> tuple[float, float]:
    hypotheses, times = [], []
    for audio, _ in clips:
        started = time.perf_counter()
        [result] = backend.transcribe([Request(audio, kind=kind)])  # type: ignore[arg-type]
        times.append(time.perf_counter() - started)
        hypotheses.append(result.text)
    return wer([text for _, text in clips], hypotheses), statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=RESULTS / "padding.json")
    args = parser.parse_args()
    backend = whisper.WhisperBackend.load(whisper.WhisperOptions.from_settings(Settings()))
    defaults = whisper._MIN_FRAMES, whisper._MIN_PARTIAL_FRAMES
    rows: list[dict[str, Any]] = []
    for name, clips in _sets().items():
        for kind, paddings in (("final", (5, 7, 10)), ("partial", (3, 4, 5, 7))):
            for padded_s in paddings:
                whisper._MIN_FRAMES = whisper._MIN_PARTIAL_FRAMES = padded_s * 100
                error, ms = _run(backend, clips, kind)
                rows.append({"set": name, "kind": kind, "padded_s": padded_s,
                             "wer": round(error, 4), "median_ms_per_clip": round(ms, 1)})
                print(rows[-1], flush=True)
        whisper._MIN_FRAMES, whisper._MIN_PARTIAL_FRAMES = defaults
        rows.append({"set": name, "loops": _loops(backend, clips)})
        print(rows[-1], flush=True)
    write_result(args.out, " ".join(["uv run --group bench python", *sys.argv]), {"rows": rows})


def _loops(backend: whisper.WhisperBackend, clips: list[tuple[np.ndarray, str]]
           ) -> dict[str, Any]:
    """Finals whose first decode looped, and what each retry took for them."""
    looped = timed_ms = 0
    full_ms: list[float] = []
    timed_fixed = 0
    tok = backend._tokenizer("en")
    for audio, _ in clips:
        frames = max(whisper._MIN_FRAMES, audio.size // whisper._HOP_SAMPLES)
        features = backend._features([audio], frames)
        encoded = backend._encode(features)
        prompt = tok.sot_sequence + [tok.no_timestamps]
        cap = whisper._new_token_cap(audio.size / 16000)
        [first] = backend._generate(encoded, [prompt], [cap], 1, [tok])
        if not whisper._looks_repetitive(first, recurring=True):
            continue
        looped += 1
        started = time.perf_counter()
        [again] = backend._generate(encoded, [tok.sot_sequence], [cap], 1, [tok],
                                    durations_s=[audio.size / 16000])
        timed_ms += (time.perf_counter() - started) * 1000
        timed_fixed += not whisper._looks_repetitive(again, suspect_doubles=False)
        started = time.perf_counter()
        backend._retry_window(Request(audio), prompt, cap, tok)
        full_ms.append((time.perf_counter() - started) * 1000)
    return {"clips": len(clips), "looped": looped, "fixed_by_timestamps": timed_fixed,
            "timestamp_retry_ms_mean": round(timed_ms / looped, 1) if looped else None,
            "full_window_retry_ms_mean": round(statistics.fmean(full_ms), 1) if full_ms else None}


if __name__ == "__main__":
    main()
