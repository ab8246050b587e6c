"""Peak server memory while transcribing long files: it must not grow with the file's length.

Each round of a case starts a fresh ``sttd serve`` child process (mock backend, default VAD),
warms it up with a 20 s upload in the case's format, then streams one generated WAV file from
disk to ``POST /v1/stt/transcribe``. A thread samples the server's RSS with psutil every 10 ms;
a round's result is the peak RSS during the request minus the RSS just before it, overall and
split at the moment the client has sent the whole body (receiving / transcribing). Cases report
the median and the maximum over the rounds: the peak varies by some MiB from round to round
with how much of the body the web framework buffers while the upload is written to disk. The
files repeat the references/ fixtures with pauses, 20 s at a time, so every response is checked
exactly (segment count and duration).

    uv run --group bench python benchmarks/file_memory.py --out benchmarks/results/file_memory.json

``--baseline REV`` also runs every case against the server of git revision REV (exported to a
temporary directory), for a before/after comparison.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shlex
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import numpy as np
import psutil
import soxr
import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import RESULTS, sttd_server, write_result  # noqa: E402
from sttd.audio import decode_wav, encode_wav  # noqa: E402

NAMES = ["ps_librivox_0880", "ps_cards_001", "ps_goforward", "ps_librivox_0930"]
UNIT_S = 20  # a pause, then the four fixtures each followed by a pause of at least 1 s
SAMPLE_INTERVAL_S = 0.01
MIB = 1024 * 1024


@attrs.frozen
class Case:
    name: str
    rate_hz: int
    sample_format: str
    channels: int
    minutes: int


CASES = [
    Case("16k-pcm16-mono-1min", 16000, "pcm16", 1, 1),
    Case("16k-pcm16-mono-10min", 16000, "pcm16", 1, 10),
    Case("16k-pcm16-mono-60min", 16000, "pcm16", 1, 60),
    Case("48k-float32-stereo-10min", 48000, "float32", 2, 10),
]


def _unit(rate_hz: int) -> np.ndarray:
    """UNIT_S seconds of the fixtures with pauses, as float32 at `rate_hz`."""
    parts = [np.zeros(16000, np.float32)]
    for name in NAMES:
        parts += [decode_wav((ROOT / "references" / f"{name}.wav").read_bytes()), np.zeros(16000, np.float32)]
    speech = np.concatenate(parts)
    unit = np.concatenate((speech, np.zeros(UNIT_S * 16000 - speech.size, np.float32)))
    if rate_hz != 16000:
        unit = soxr.resample(unit, 16000, rate_hz, quality="HQ").astype(np.float32)
    assert unit.size == UNIT_S * rate_hz
    return unit


def _encode(samples: np.ndarray, case: Case) -> bytes:
    return encode_wav(samples, case.rate_hz, sample_format=case.sample_format, channels=case.channels)


def write_wav(path: Path, case: Case, seconds: int) -> None:
    """Write `seconds` of the case's audio to `path`, one unit at a time."""
    unit = _unit(case.rate_hz)
    # encode_wav writes the canonical 44-byte header and the payload; the header's sizes are
    # then set for the whole file.
    payload = _encode(unit, case)[44:]
    header = bytearray(_encode(unit[:0], case))
    repeats = seconds // UNIT_S
    data_bytes = repeats * len(payload)
    struct.pack_into("<I", header, 4, 36 + data_bytes)
    struct.pack_into("<I", header, 40, data_bytes)
    with path.open("wb") as out:
        out.write(header)
        for _ in range(repeats):
            out.write(payload)


class RssSampler:
    """Samples a process's RSS every SAMPLE_INTERVAL_S in a thread, with the time of each sample."""

    def __init__(self, pid: int) -> None:
        self._process = psutil.Process(pid)
        self._stop = threading.Event()
        self.before = self._process.memory_info().rss
        self.samples: list[tuple[float, int]] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), self._process.memory_info().rss))
            self._stop.wait(SAMPLE_INTERVAL_S)

    @contextlib.contextmanager
    def running(self) -> Iterator[RssSampler]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join()
            self.samples.append((time.perf_counter(), self._process.memory_info().rss))

    def peak_growth_mib(self, start: float = 0.0, end: float = float("inf")) -> float:
        """Peak RSS over [start, end) minus the RSS before the request, in MiB."""
        peak = max((rss for at, rss in self.samples if start <= at < end), default=self.before)
        return (peak - self.before) / MIB


class _WatchedFile(io.FileIO):
    """A file that notes when it was read to its end: the client has sent the whole body."""

    eof_at = float("inf")

    def read(self, size: int = -1, /) -> bytes:
        data = super().read(size)
        if not data:
            self.eof_at = min(self.eof_at, time.perf_counter())
        return data


async def _post(client: httpx.AsyncClient, audio: io.RawIOBase, name: str) -> dict[str, Any]:
    response = await client.post("/v1/stt/transcribe", files={"file": (name, audio, "audio/wav")})
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    return body


@attrs.frozen
class Round:
    # Peak RSS growth while the body arrives (until the client has sent it all), after that
    # (decoding, VAD, inference), and overall.
    upload_mib: float
    transcribe_mib: float
    total_mib: float
    wall_s: float


async def run_round(case: Case, warmup: Path, upload: Path) -> Round:
    upload_bytes = upload.stat().st_size
    async with sttd_server(STT_BACKEND="mock", STT_MAX_UPLOAD_BYTES=str(upload_bytes + MIB)) as server:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=600) as client:
            with _WatchedFile(warmup) as audio:
                await _post(client, audio, warmup.name)
            sampler = RssSampler(server.process.pid)
            started = time.perf_counter()
            with sampler.running(), _WatchedFile(upload) as audio:
                body = await _post(client, audio, upload.name)
            wall_s = time.perf_counter() - started
    assert body["duration_ms"] == case.minutes * 60_000, body["duration_ms"]
    assert len(body["segments"]) == len(NAMES) * case.minutes * 60 // UNIT_S, len(body["segments"])
    return Round(sampler.peak_growth_mib(end=audio.eof_at), sampler.peak_growth_mib(start=audio.eof_at),
                 sampler.peak_growth_mib(), wall_s)


def _summary(values: list[float]) -> dict[str, Any]:
    return {"median": round(statistics.median(values), 1), "max": round(max(values), 1),
            "rounds": [round(v, 1) for v in values]}


async def run_case(case: Case, workdir: Path, rounds: int) -> dict[str, Any]:
    warmup, upload = workdir / f"{case.name}-warmup.wav", workdir / f"{case.name}.wav"
    write_wav(warmup, case, UNIT_S)
    write_wav(upload, case, case.minutes * 60)
    upload_mib = upload.stat().st_size / MIB
    results = [await run_round(case, warmup, upload) for _ in range(rounds)]
    upload.unlink()
    wall_s = statistics.median(r.wall_s for r in results)
    result = {
        "case": case.name,
        "audio_minutes": case.minutes,
        "upload_mib": round(upload_mib, 1),
        "rss_peak_growth_mib": _summary([r.total_mib for r in results]),
        "rss_peak_growth_upload_mib": _summary([r.upload_mib for r in results]),
        "rss_peak_growth_transcribe_mib": _summary([r.transcribe_mib for r in results]),
        "wall_s_median": round(wall_s, 2),
    }
    print(f"{case.name:26} upload {upload_mib:6.1f} MiB  peak RSS growth median/max: "
          f"total {result['rss_peak_growth_mib']['median']:5.1f}/{result['rss_peak_growth_mib']['max']:5.1f}  "
          f"receiving {result['rss_peak_growth_upload_mib']['median']:5.1f}/"
          f"{result['rss_peak_growth_upload_mib']['max']:5.1f}  "
          f"transcribing {result['rss_peak_growth_transcribe_mib']['median']:5.1f}/"
          f"{result['rss_peak_growth_transcribe_mib']['max']:5.1f} MiB  wall {wall_s:6.2f} s", flush=True)
    return result


async def run_all(workdir: Path, rounds: int, cases: list[Case]) -> list[dict[str, Any]]:
    return [await run_case(case, workdir, rounds) for case in cases]


@contextlib.contextmanager
def checkout(revision: str) -> Iterator[Path]:
    """The tree of `revision`, exported to a temporary directory; the server runs from there."""
    with tempfile.TemporaryDirectory(prefix="sttd-baseline-") as directory:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", directory], input=archive.stdout, check=True)
        yield Path(directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "file_memory.json")
    parser.add_argument("--rounds", type=int, default=3, help="fresh servers per case (default 3)")
    parser.add_argument("--case", action="append", choices=[case.name for case in CASES],
                        help="run only this case (repeatable; default all)")
    parser.add_argument("--baseline", metavar="REV", help="also measure the server of git revision REV")
    args = parser.parse_args()
    cases = [case for case in CASES if not args.case or case.name in args.case]
    load_1m = round(os.getloadavg()[0], 2)  # other work on the machine skews the peaks
    with tempfile.TemporaryDirectory(prefix="sttd-file-memory-") as directory:
        workdir = Path(directory)
        print("this checkout:", flush=True)
        results = trio.run(run_all, workdir, args.rounds, cases)
        payload: dict[str, Any] = {
            "sample_interval_s": SAMPLE_INTERVAL_S,
            "rounds": args.rounds,
            "load_average_1m_at_start": load_1m,
            "cases": results,
        }
        if args.baseline:
            revision = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.baseline],
                                      check=True, capture_output=True, text=True).stdout.strip()
            print(f"baseline {revision}:", flush=True)
            with checkout(revision) as tree:
                # `python -m sttd.cli` imports sttd from its working directory first.
                here = os.getcwd()
                os.chdir(tree)
                try:
                    baseline = trio.run(run_all, workdir, args.rounds, cases)
                    payload["baseline"] = {"revision": revision, "cases": baseline}
                finally:
                    os.chdir(here)
    command = shlex.join(["uv", "run", "--group", "bench", "python", "benchmarks/file_memory.py", *sys.argv[1:]])
    write_result(args.out, command, payload)


if __name__ == "__main__":
    main()
