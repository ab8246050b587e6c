"""What the Whisper encoder and decoder cost on this machine, and what batching and threads buy.

Measures, with the bundled tiny.en int8 model through CTranslate2 (the calls sttd's whisper
backend makes), medians of 5 timed calls after a warm-up:

* encoder: time per clip against the padded input length (3, 5, 7, 10, 15, 30 s) and the batch
  size (1, 4, 8): does a shorter input or a batch make a clip cheaper?
* decoder: greedy and beam-5 generate per clip against batch size, on the encoder output of
  3 s clips padded to 10 s;
* threads: a stream of single-clip partial decodes with 1 or 2 CTranslate2 threads, one caller,
  and with 1 thread from 2 concurrent callers.

    uv run --group bench python benchmarks/encoder.py --out benchmarks/results/encoder.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import ctranslate2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import RESULTS, load, write_result  # noqa: E402
from sttd.backends.base import Request  # noqa: E402
from sttd.backends.whisper import WhisperBackend, WhisperOptions  # noqa: E402
from sttd.settings import Settings  # noqa: E402


def median_ms(call: Callable[[], object], repeats: int = 5) -> float:
    call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=RESULTS / "encoder.json")
    args = parser.parse_args()
    audio = load("long_dev.wav")
    clips = [audio[16000 * 3 * i : 16000 * 3 * (i + 1)] for i in range(8)]
    backend = WhisperBackend.load(WhisperOptions.from_settings(Settings()))
    model = backend._model.model
    encoder = []
    for seconds in (3, 5, 7, 10, 15, 30):
        for batch in (1, 4, 8):
            features = ctranslate2.StorageView.from_array(
                backend._features(clips[:batch], seconds * 100))
            ms = median_ms(lambda: model.encode(features, to_cpu=False))
            encoder.append({"padded_s": seconds, "batch": batch, "ms_per_clip": ms / batch})
            print(encoder[-1], flush=True)
    tok = backend._tokenizer("en")
    decoder = []
    for batch in (1, 2, 4, 8):
        features = ctranslate2.StorageView.from_array(backend._features(clips[:batch], 1000))
        encoded = model.encode(features, to_cpu=False)
        prompts = [tok.sot_sequence + [tok.no_timestamps]] * batch
        for beam in (1, 5):
            ms = median_ms(lambda: backend._generate(encoded, prompts, [40] * batch, beam,
                                                     [tok] * batch))
            decoder.append({"batch": batch, "beam": beam, "ms_per_clip": ms / batch})
            print(decoder[-1], flush=True)
    requests = [Request(audio=clip, kind="partial") for clip in clips * 3]
    threads = []
    for cpu_threads, callers in ((2, 1), (1, 1), (1, 2)):
        one = WhisperBackend.load(WhisperOptions.from_settings(Settings(whisper_cpu_threads=cpu_threads)))
        one.transcribe(requests[:1])

        def work(part: list[Request], backend: WhisperBackend = one) -> None:
            for request in part:
                backend.transcribe([request])

        started = time.perf_counter()
        workers = [threading.Thread(target=work, args=(requests[k::callers],))
                   for k in range(callers)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        ms = (time.perf_counter() - started) / len(requests) * 1000
        threads.append({"cpu_threads": cpu_threads, "callers": callers, "ms_per_partial": ms})
        print(threads[-1], flush=True)
    result: dict[str, Any] = {"encoder": encoder, "decoder": decoder, "threads": threads}
    write_result(args.out, "uv run --group bench python " + " ".join(sys.argv), result)


if __name__ == "__main__":
    main()
