"""Capacity of the server with each backend, side by side in one command: whisper tiny.en
against a NeMo streaming FastConformer through the nemo backend.

No real NeMo weights can be fetched here, so the NeMo model is the cost stand-in that
references/nemo/make_tiny_nemo.py builds with the 114M cache-aware streaming FastConformer's
dimensions (random weights: its text is meaningless, so its WER is too; it is the same at every
N, so capacity is still read from latency, finals and skipped audio). Both servers run the
short-sentence stream with every session started together (`load.py --together`), admission
off (`STT_MAX_LOAD=0`) so every session of N is served, one server at a time, the load generator
on the same cores. Capacity is `load.capacity`: the largest N whose every run had p95 final
latency <= 1.5 s, every final, nothing skipped (and WER within 2 points of N=1).

    python references/nemo/make_tiny_nemo.py --kind online-transducer \\
        --size fastconformer-114m --chunk-ms 480 --out /tmp/nemo-fc114m
    uv run --group bench python benchmarks/backends.py --nemo-model /tmp/nemo-fc114m \\
        -n 1 4 8 12 16 --out benchmarks/results/backends.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import RESULTS, sentences, sttd_server, write_result  # noqa: E402
from benchmarks.load import capacity, run_point  # noqa: E402


async def _sweep(name: str, settings: dict[str, str], ns: list[int], runs: int
                 ) -> dict[str, Any]:
    stream = sentences()
    points = []
    async with sttd_server(**{"STT_IN_QUEUE_MAX_DROPS": str(10**9), "STT_MAX_LOAD": "0",
                              **settings}) as server:
        url = server.ws_url("call_id=backends&sample_rate=16000")
        for n in ns:
            for run in range(runs):
                point = await run_point(url, server.base_url, server.process.pid, n, stream,
                                        0.1, seed=run)
                point["run"] = run
                points.append(point)
                latency = point["final_latency_s"]
                print(f"{name} N={n} run={run} p50={latency['p50']} p95={latency['p95']} "
                      f"ok={point['sessions_ok']} finals={point['finals_per_session']} "
                      f"skipped={point['audio_skipped_s']} "
                      f"cpu={point['server_cpu_percent']['mean']}", flush=True)
    return {"backend": name, "settings": settings, "points": points,
            "capacity": capacity(points)}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    results = [await _sweep("whisper", {"STT_BACKEND": "whisper"}, args.n, args.runs)]
    results.append(await _sweep("nemo", {"STT_BACKEND": "nemo",
                                         "STT_NEMO_MODEL": str(args.nemo_model)},
                                args.n, args.runs))
    return {"stream": "sentences, started together", "backends": results}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nemo-model", type=Path, required=True,
                        help="a NeMo streaming model folder (see the module docstring)")
    parser.add_argument("-n", type=int, nargs="+", default=[1, 4, 8, 12, 16])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "backends.json")
    args = parser.parse_args()
    payload = trio.run(main_async, args)
    for result in payload["backends"]:
        print(f"{result['backend']}: capacity {result['capacity']}")
    write_result(args.out, " ".join(["uv run --group bench python", *sys.argv]), payload)


if __name__ == "__main__":
    main()
