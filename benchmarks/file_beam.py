"""An uploaded file's pieces decoded greedily or with the beam: the time and the WER.

The file API cuts a file at its pauses and decodes the pieces in batches. An engine with time to
spare (no other file in flight, the live streams' load low) now decodes them `thorough`
(whisper: ``STT_WHISPER_BEAM_SIZE``, 5); before, file pieces were always greedy. Two
measurements, on the 12 dev recordings and long_dev (one file each):

* **backend**: the same pieces (cut as the file API cuts them) through `WhisperBackend` in
  batches of ``max_inference_batch_size``, greedy and thorough, ``--rounds`` times each,
  alternating; the median seconds and the WER each way.
* **server**: each file posted to ``/v1/stt/transcribe`` of an idle ``sttd serve`` child, this
  tree and ``--baseline`` (a commit, from ``git archive``) in turn; the seconds the client waited
  in all and the WER.

    uv run --group bench python benchmarks/file_beam.py --baseline 08669f9 \\
        --out benchmarks/results/file_beam.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (  # noqa: E402
    DATA, RESULTS, load, references, source_tree, sttd_server, wer, write_result)
from sttd.audio import float32_to_pcm16, pcm16_to_float32  # noqa: E402
from sttd.backends.base import Request  # noqa: E402
from sttd.backends.whisper import WhisperBackend, WhisperOptions  # noqa: E402
from sttd.engine import split_at_pauses  # noqa: E402
from sttd.settings import Settings  # noqa: E402


def backend_pass(backend: WhisperBackend, pieces: dict[str, list[Any]], thorough: bool,
                 batch: int) -> tuple[float, dict[str, str]]:
    """Seconds for every file's pieces, and each file's text."""
    texts: dict[str, str] = {}
    started = time.perf_counter()
    for name, jobs in pieces.items():
        parts: list[str] = []
        for first in range(0, len(jobs), batch):
            requests = [Request(pcm16_to_float32(job.audio), "final", origin="file",
                                thorough=thorough, word_timings=False)
                        for job in jobs[first : first + batch]]
            parts += [result.text for result in backend.transcribe(requests)]
        texts[name] = " ".join(parts)
    return time.perf_counter() - started, texts


async def server_pass(names: list[str], tree: Path | None) -> tuple[float, dict[str, str]]:
    """Seconds the client waited for every file, and each file's text, from a fresh server."""
    texts: dict[str, str] = {}
    async with sttd_server(tree=tree, STT_BACKEND="whisper") as server:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=600) as client:
            waited = 0.0
            for name in names:
                data = (DATA / name).read_bytes()
                started = time.perf_counter()
                response = await client.post("/v1/stt/transcribe", files={"file": (name, data)})
                waited += time.perf_counter() - started
                response.raise_for_status()
                texts[name] = response.json()["text"]
    return waited, texts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", default="HEAD", help="the commit the server pass compares")
    parser.add_argument("--out", type=Path, default=RESULTS / "file_beam.json")
    args = parser.parse_args()
    refs = references()
    names = sorted(refs)
    settings = Settings(backend="whisper")
    audio_s = sum(load(name).size for name in names) / 16000
    pieces = {name: split_at_pauses(float32_to_pcm16(load(name)), settings) for name in names}
    backend = WhisperBackend.load(WhisperOptions.from_settings(settings))
    batch = settings.max_inference_batch_size

    def score(texts: dict[str, str]) -> float:
        return round(100 * wer([refs[n] for n in names], [texts[n] for n in names]), 2)

    backend_pass(backend, pieces, False, batch)  # warm-up
    seconds: dict[str, list[float]] = {"greedy": [], "thorough": []}
    wers: dict[str, float] = {}
    for run in range(args.rounds):
        order = [("greedy", False), ("thorough", True)]
        for name, thorough in order if run % 2 == 0 else order[::-1]:
            took, texts = backend_pass(backend, pieces, thorough, batch)
            seconds[name].append(round(took, 2))
            wers[name] = score(texts)
            print(name, seconds[name][-1], wers[name], flush=True)
    backend_result = {
        way: {"seconds": seconds[way], "rtf_median": round(statistics.median(seconds[way])
                                                           / audio_s, 4),
              "wer_percent": wers[way]} for way in seconds}
    backend_result["time_ratio"] = round(statistics.median(seconds["thorough"])
                                         / statistics.median(seconds["greedy"]), 3)
    del backend

    server_result: dict[str, Any] = {}
    with source_tree(args.baseline) as (commit, tree):
        for label, source in ((f"sttd@{commit}", tree), ("sttd", None)):
            waited, texts = trio.run(server_pass, names, source)
            server_result[label] = {"seconds": round(waited, 2),
                                    "rtf": round(waited / audio_s, 4),
                                    "wer_percent": score(texts)}
            print(label, server_result[label], flush=True)
    write_result(args.out, "uv run --group bench python " + " ".join(sys.argv),
                 {"files": names, "audio_seconds": round(audio_s, 1),
                  "batch": batch, "backend": backend_result, "server": server_result})


if __name__ == "__main__":
    main()
