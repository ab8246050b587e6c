"""Speech the VAD misses in noise, and how often a noisy line asks the net: no decoding.

Replays every dev recording *and* ``long_dev`` (94.5 s: five short-clip talkers, then a reader
12 dB quieter than them) through sttd's own utterance tracker and Silero endpointer with the
server's settings (`benchmarks.noise.vad_spans`), clean and mixed with white noise, babble and
hum at 20 / 10 / 5 dB SNR exactly as ``noise.py`` mixes them (SNR over the whole recording's
active speech, so in ``long_dev`` the quiet reader sits about 12 dB lower). Per condition:

* ``missed_s``: seconds of the clean recording's active 10 ms frames outside every utterance
  the VAD found (the dev set summed, and ``long_dev`` alone); speech the VAD misses is lost;
* ``net_fraction``: the share of 32 ms windows that asked the Silero net (the rest were under
  the RMS floor).

Then 60 s of steady noise without speech (white at -50 and -40 dBFS, 50 Hz hum at -40 dBFS):
the net's share there is what a noisy idle line costs, and no utterance may come out of it.

    uv run --group bench python benchmarks/vad_missed.py --out benchmarks/results/vad_missed.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import noise  # noqa: E402
from benchmarks._common import load, references, write_result  # noqa: E402
from sttd import vad  # noqa: E402
from sttd.audio import SAMPLE_RATE_HZ, float32_to_pcm16  # noqa: E402
from sttd.settings import Settings  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
_WINDOW = 512


class _CountingNet:
    """A Silero stream that counts the windows it is asked about."""

    def __init__(self, stream: vad.SpeechNet, counter: list[int]) -> None:
        self._stream = stream
        self._counter = counter

    def process(self, data: memoryview) -> float:
        self._counter[0] += 1
        return self._stream.process(data)

    def reset(self) -> None:
        self._stream.reset()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=RESULTS / "vad_missed.json")
    args = parser.parse_args()
    settings = Settings.from_env({"STT_BACKEND": "whisper"})
    asked = [0]
    make = vad.make_endpointer

    def counting(kind: str, **kwargs: Any) -> vad.Endpointer:
        return make(kind, net=_CountingNet(vad.silero_model().stream(), asked), **kwargs)

    vad.make_endpointer = counting  # type: ignore[assignment]  # what vad_spans builds
    refs = references()
    pool = {name: load(name) for name in refs}
    rows: list[dict[str, Any]] = []
    conditions = [noise.Condition()] + [noise.Condition(kind, snr) for kind in
                                        ("white", "babble", "hum") for snr in (20.0, 10.0, 5.0)]
    for condition in conditions:
        missed = {"dev": 0.0, "long_dev": 0.0}
        asked[0] = windows = 0
        for name in sorted(refs):
            pcm = noise.mixture(name, condition, pool)[0]
            spans = noise.vad_spans(pcm, settings)
            out = noise._outside_s(noise._active(pool[name]),
                                   [(s.start_ms, s.end_ms) for s in spans])
            missed["long_dev" if name == noise.LONG else "dev"] += out
            windows += pcm.size // _WINDOW
        rows.append({"condition": condition.name,
                     "missed_s": {k: round(v, 2) for k, v in missed.items()},
                     "net_fraction": round(asked[0] / windows, 3)})
        print(rows[-1], flush=True)
    rng = np.random.default_rng(20261207)
    seconds = 60
    t = np.arange(seconds * SAMPLE_RATE_HZ) / SAMPLE_RATE_HZ
    lines = {
        "white -50 dBFS": rng.normal(0, 10 ** (-50 / 20), t.size),
        "white -40 dBFS": rng.normal(0, 10 ** (-40 / 20), t.size),
        "hum -40 dBFS": 10 ** (-40 / 20) * np.sqrt(2) * np.sin(2 * np.pi * 50 * t)
        + rng.normal(0, 10 ** (-60 / 20), t.size),
    }
    for label, line in lines.items():
        pcm = float32_to_pcm16(line.astype(np.float32))
        asked[0] = 0
        spans = noise.vad_spans(pcm, settings)
        rows.append({"line": label, "utterances": len(spans),
                     "net_fraction": round(asked[0] / (pcm.size // _WINDOW), 3)})
        print(rows[-1], flush=True)
    write_result(args.out, " ".join(["uv run --group bench python", *sys.argv]),
                 {"settings": {"vad": settings.vad, "vad_silence_ms": settings.vad_silence_ms},
                  "rows": rows})


if __name__ == "__main__":
    main()
