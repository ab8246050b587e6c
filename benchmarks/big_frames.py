"""Real-time sessions beside a client that sends its audio in the biggest frames allowed.

Silero's windows of every session are scored together in batched runs (`sttd.engine.VadBatcher`),
and a run answers its calls only at its end. A client that sends a file over the WebSocket in
frames of 32 s (under the default 1 MiB STT_MAX_MESSAGE_BYTES), as fast as the server takes
them, asks the net for a thousand windows at once. This measures what that does to the other
sessions: ``-n`` sessions stream the sentences stream (`_common.sentences`) in 20 ms frames in
real time while one more streams long_dev in ``--frame-s`` frames without pacing, over and over,
until they are done. The mock backend answers at once, so a final's latency (from the true end
of speech) is the VAD's and the session's, not the decoder's. This tree and ``--baseline`` (a
commit, from ``git archive``) alternate, ``--runs`` times each.

    uv run --group bench python benchmarks/big_frames.py --baseline 7fc8b46 --runs 2 \\
        --out benchmarks/results/big_frames.json
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (  # noqa: E402
    RESULTS, load, percentile, sentences, source_tree, stream_file, sttd_server, write_result)


async def _one_run(tree: Path | None, n: int, frame_s: float) -> dict[str, Any]:
    stream = sentences()
    bulk = load("long_dev.wav")
    bulk_audio_s = 0.0
    async with sttd_server(tree=tree, STT_BACKEND="mock", STT_VAD="silero",
                           STT_MAX_LOAD="0") as server:
        url = server.ws_url("sample_rate=16000")
        latencies: list[float] = []

        async def live() -> None:
            outcome = await stream_file(url, stream.audio, speech_ends=stream.speech_ends,
                                        speech_starts=stream.speech_starts)
            latencies.extend(outcome.latencies_s)

        async def flood() -> None:
            nonlocal bulk_audio_s
            while True:
                await stream_file(url, bulk, realtime=False, frame_ms=round(frame_s * 1000))
                bulk_audio_s += bulk.size / 16000

        async with trio.open_nursery() as outer:
            if frame_s > 0:
                outer.start_soon(flood)
            async with trio.open_nursery() as sessions:
                for _ in range(n):
                    sessions.start_soon(live)
            outer.cancel_scope.cancel()
    return {"final_latency_s": {"p50": statistics.median(latencies),
                                "p95": percentile(latencies, 95),
                                "max": max(latencies), "count": len(latencies)},
            "bulk_audio_s": round(bulk_audio_s, 1)}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    points = []
    with contextlib.ExitStack() as stack:
        trees: list[tuple[str, Path | None]] = [("this tree", None)]
        if args.baseline:
            commit, folder = stack.enter_context(source_tree(args.baseline))
            trees.insert(0, (f"sttd@{commit}", folder))
        for run in range(args.runs):
            for name, tree in trees:
                point = {"tree": name, "run": run, "n": args.n, "frame_s": args.frame_s,
                         **await _one_run(tree, args.n, args.frame_s)}
                points.append(point)
                latency = point["final_latency_s"]
                print(f"run={run} {name}: final p50 / p95 / max {latency['p50']:.3f} / "
                      f"{latency['p95']:.3f} / {latency['max']:.3f} s, bulk client "
                      f"{point['bulk_audio_s']} s of audio", flush=True)
    return {"points": points}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=4, help="real-time sessions")
    parser.add_argument("--frame-s", type=float, default=32.0,
                        help="the bulk client's frame, s (0: no bulk client)")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--baseline", default="")
    parser.add_argument("--out", type=Path, default=RESULTS / "big_frames.json")
    args = parser.parse_args()
    payload = trio.run(main_async, args)
    write_result(args.out, "uv run --group bench python " + " ".join(sys.argv), payload)


if __name__ == "__main__":
    main()
