"""What a final's word timings cost with the whisper backend: finals decoded with and without.

Whisper's word times come from a pass of their own after the decode (cross-attention alignment
over the encoder's output, `WhisperModel.find_alignment`). A client that asks for no word
timings (the native protocol's ``words=false``; the Realtime route unless it asks for logprobs)
gets finals without that pass. This measures what the pass costs a final, one idea at a time as
issue 14 asks: the same finals decoded both ways, alternating, in one process.

The finals are those of ``load.py``'s sentences stream (22 short sentences, 1.2 s pauses),
clean and with white noise at ``--line-noise-dbfs``, cut by sttd's own session core (the
server's tracker, Silero endpointer and defaults; partials not decoded). Each final is decoded
alone (one session ending a sentence) and in batches of four (sessions ending theirs at once),
``--passes`` times each way, the order of the two ways swapped every pass. Reported: the median
seconds per final each way and their ratio, and whether the text was the same both ways (the
alignment never changes the text; a difference would be a bug).

    uv run --group bench python benchmarks/word_timings.py \\
        --out benchmarks/results/word_timings.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import attrs

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import write_result  # noqa: E402
from benchmarks.load import _stream  # noqa: E402
from sttd.api import SessionOptions  # noqa: E402
from sttd.api._params import default_partial_ms  # noqa: E402
from sttd.audio import float32_to_pcm16  # noqa: E402
from sttd.backends import Request, Result, whisper  # noqa: E402
from sttd.session import AudioFrame, Decode, SessionCore, UtteranceTracker  # noqa: E402
from sttd.settings import Settings  # noqa: E402
from sttd.vad import make_endpointer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
_FRAME_SAMPLES = 320  # 20 ms at 16 kHz
_BATCH = 4


def final_requests(audio: Any, settings: Settings) -> list[Request]:
    """The requests of the finals sttd's session core asks for over `audio`."""
    endpointer = make_endpointer("silero", threshold_rms=settings.vad_threshold,
                                 silence_ms=settings.vad_silence_ms)
    partial_ms = default_partial_ms(settings)
    tracker = UtteranceTracker(endpointer, partial_ms=partial_ms,
                               max_utterance_s=settings.max_utterance_s)
    core = SessionCore(tracker, SessionOptions(partial_ms=partial_ms, partials=False,
                                               language="en"))
    pcm = float32_to_pcm16(audio)
    requests = []
    for start in range(0, pcm.size, _FRAME_SAMPLES):
        for output in core.feed(AudioFrame(pcm[start : start + _FRAME_SAMPLES], start / 16000)):
            if isinstance(output, Decode):
                requests.append(output.request)
                core.decoded(output, Result(""))
    return requests


def measure(backend: whisper.WhisperBackend, requests: list[Request], passes: int
            ) -> dict[str, Any]:
    per_final: dict[str, dict[bool, list[float]]] = {"alone": {True: [], False: []},
                                                     f"batch of {_BATCH}": {True: [], False: []}}
    texts: dict[bool, list[str]] = {True: [], False: []}
    for n in range(passes):
        for wanted in ((True, False) if n % 2 == 0 else (False, True)):
            asked = [attrs.evolve(r, word_timings=wanted) for r in requests]
            for request in asked:
                began = time.perf_counter()
                [result] = backend.transcribe([request])
                per_final["alone"][wanted].append(time.perf_counter() - began)
                if n == 0:
                    texts[wanted].append(result.text)
            for start in range(0, len(asked) - _BATCH + 1, _BATCH):
                began = time.perf_counter()
                backend.transcribe(asked[start : start + _BATCH])
                per_final[f"batch of {_BATCH}"][wanted].append(
                    (time.perf_counter() - began) / _BATCH)
    shapes = {}
    for shape, times in per_final.items():
        with_s, without_s = statistics.median(times[True]), statistics.median(times[False])
        shapes[shape] = {"s_per_final_with_words_median": round(with_s, 4),
                         "s_per_final_without_words_median": round(without_s, 4),
                         "without_over_with": round(without_s / with_s, 3)}
    return {"finals": len(requests), "passes": passes, "shapes": shapes,
            "same_text": sum(a == b for a, b in zip(texts[True], texts[False], strict=True))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--line-noise-dbfs", type=float, default=-50.0)
    parser.add_argument("--passes", type=int, default=4)
    parser.add_argument("--out", type=Path, default=RESULTS / "word_timings.json")
    args = parser.parse_args()
    settings = Settings.from_env({"STT_BACKEND": "whisper"})
    backend = whisper.WhisperBackend.load(whisper.WhisperOptions.from_settings(settings))
    streams = {"clean": None, f"white {args.line_noise_dbfs:g} dBFS": args.line_noise_dbfs}
    results = {}
    for name, noise in streams.items():
        requests = final_requests(_stream("sentences", noise).audio, settings)
        results[name] = measure(backend, requests, args.passes)
        print(name, results[name], flush=True)
    write_result(args.out, " ".join(["uv run --group bench python", *sys.argv]),
                 {"settings": {"backend": backend.name, "vad": "silero",
                               "beam_size": settings.whisper_beam_size},
                  "streams": results})


if __name__ == "__main__":
    main()
