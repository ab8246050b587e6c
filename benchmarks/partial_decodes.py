"""What a session's partial decodes give and cost, clean and on a noisy line: no server.

Replays a stream through sttd's own session core (`SessionCore` with the server's tracker,
Silero endpointer and default ``partial_ms``) in the client's 20 ms frames, and decodes every
partial it asks for with the whisper backend at once, one at a time (as if the engine were
idle: this measures what partials say and what each costs, not the cadence under load, which
``load.py`` measures). Finals are not decoded (answered empty, so the core goes on). Per
stream:

* ``first_partials``: utterances, and how many of their first partials (half a ``partial_ms``
  of speech) showed nothing (the core then asks for the next one sooner);
* ``partials``: partial decodes, how many of them looped (their first greedy decode failed the
  backend's loop test) and how many took more than one decode (a retry), and the decode
  seconds, all and looping ones (median, total).

Streams: ``load.py``'s sentences stream (22 short sentences, 1.2 s pauses), clean and with
white noise at ``--line-noise-dbfs`` over all of it, as ``load.py --line-noise-dbfs`` makes it.

    uv run --group bench python benchmarks/partial_decodes.py \\
        --out benchmarks/results/partial_decodes.json
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

from benchmarks._common import write_result  # noqa: E402
from benchmarks.load import _stream  # noqa: E402
from sttd.api import SessionOptions  # noqa: E402
from sttd.api._params import default_partial_ms  # noqa: E402
from sttd.audio import float32_to_pcm16  # noqa: E402
from sttd.backends import Result  # noqa: E402
from sttd.backends import whisper  # noqa: E402
from sttd.session import AudioFrame, Decode, SessionCore, UtteranceTracker  # noqa: E402
from sttd.settings import Settings  # noqa: E402
from sttd.vad import make_endpointer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
_FRAME_SAMPLES = 320  # 20 ms at 16 kHz


class _Counted:
    """Wraps the backend's decode call to count decodes and keep each call's first output."""

    def __init__(self, backend: whisper.WhisperBackend) -> None:
        self.calls: list[list[Any]] = []
        self._generate = backend._generate
        backend._generate = self  # type: ignore[method-assign]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        outputs = self._generate(*args, **kwargs)
        self.calls.append(list(outputs))  # a copy: the backend edits its list in place
        return outputs


def replay(backend: whisper.WhisperBackend, counted: _Counted, audio: np.ndarray,
           settings: Settings) -> dict[str, Any]:
    endpointer = make_endpointer("silero", threshold_rms=settings.vad_threshold,
                                 silence_ms=settings.vad_silence_ms)
    partial_ms = default_partial_ms(settings)
    tracker = UtteranceTracker(endpointer, partial_ms=partial_ms,
                               max_utterance_s=settings.max_utterance_s)
    core = SessionCore(tracker, SessionOptions(partial_ms=partial_ms, language="en"))
    pcm = float32_to_pcm16(audio)
    seconds: list[float] = []
    looped_s: list[float] = []
    retried = 0
    firsts: dict[int, bool] = {}  # utterance id -> its first partial showed something
    for start in range(0, pcm.size, _FRAME_SAMPLES):
        for output in core.feed(AudioFrame(pcm[start : start + _FRAME_SAMPLES],
                                           start / 16000)):
            if isinstance(output, Decode):  # a final: not what this measures
                core.decoded(output, Result(""))
        decode = core.take_partial()
        if decode is None:
            continue
        counted.calls.clear()
        began = time.perf_counter()
        [result] = backend.transcribe([decode.request])
        took = time.perf_counter() - began
        seconds.append(took)
        first = counted.calls[0][0] if counted.calls else None
        if first is not None and whisper._looks_repetitive(first, recurring=True):
            looped_s.append(took)
        retried += len(counted.calls) > 1
        shown = bool(core.decoded(decode, result))
        firsts.setdefault(decode.utterance.utterance_id, shown)
    return {
        "first_partials": {"utterances": len(firsts),
                           "showed_nothing": sum(not shown for shown in firsts.values())},
        "partials": {"count": len(seconds), "looped": len(looped_s), "retried": retried,
                     "decode_s_median": statistics.median(seconds) if seconds else None,
                     "decode_s_total": sum(seconds),
                     "looped_decode_s_median": (statistics.median(looped_s) if looped_s
                                                else None),
                     "looped_decode_s_total": sum(looped_s)},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--line-noise-dbfs", type=float, default=-50.0)
    parser.add_argument("--out", type=Path, default=RESULTS / "partial_decodes.json")
    args = parser.parse_args()
    settings = Settings.from_env({"STT_BACKEND": "whisper"})
    backend = whisper.WhisperBackend.load(whisper.WhisperOptions.from_settings(settings))
    counted = _Counted(backend)
    streams = {"clean": None, f"white {args.line_noise_dbfs:g} dBFS": args.line_noise_dbfs}
    results = {}
    for name, noise in streams.items():
        results[name] = replay(backend, counted, _stream("sentences", noise).audio, settings)
        print(name, results[name], flush=True)
    write_result(args.out, " ".join(["python", *sys.argv]),
                 {"settings": {"partial_ms": default_partial_ms(settings), "vad": "silero",
                               "backend": backend.name}, "streams": results})


if __name__ == "__main__":
    main()
