"""Where a whisper server's CPU goes, thread by thread, under N real-time sentence streams.

It starts ``sttd serve`` (the defaults, admission off so that all N are served), streams the
sentences stream (`_common.sentences`: 22 short sentences, 1.2 s pauses, about 100 s) over N
sessions started together, and reads each of the server's threads' CPU time from
``/proc/<pid>/task/*/stat`` before and after. Threads are grouped by what they are:

* ``event_loop``: the main thread (trio's loop: the sessions, the serving stack);
* ``trio_workers``: trio's worker threads (`trio.to_thread`: Silero's batched runs, each
  decode's Python, the log-mel features);
* the rest by their OS name: native threads that Python's profilers do not see, such as
  CTranslate2's decode threads (named after the thread that loaded the model) and numpy's
  OpenBLAS threads (named ``python``, as the main thread is).

Each ``--variant NAME:KEY=VALUE,...`` runs the server with those environment variables (the
variants alternate, ``--runs`` times each), so that a setting is compared with the same tree in
one command. The first variant is the defaults unless given.

    uv run --group bench python benchmarks/thread_cpu.py -n 1 4 --runs 2 \\
        --variant blas_one_thread: --variant blas_per_core:OPENBLAS_NUM_THREADS=2 \\
        --out benchmarks/results/thread_cpu_blas.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    RESULTS, percentile, sentences, stream_file, sttd_server, wer, write_result)

_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def _thread_cpu_s(pid: int) -> dict[tuple[int, str], float]:
    """CPU seconds (user + system) of each thread of `pid`, by (thread id, OS name)."""
    seconds = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
        except OSError:
            continue  # the thread ended
        fields = stat.rsplit(")", 1)[1].split()  # the name may hold spaces; it ends at ')'
        seconds[(int(tid), name)] = (int(fields[11]) + int(fields[12])) / _TICKS_PER_S
    return seconds


def _group(pid: int, tid: int, name: str) -> str:
    if tid == pid:
        return "event_loop"
    if name.startswith("Trio thread"):
        return "trio_workers"
    return name


async def _one_run(n: int, env: dict[str, str]) -> dict[str, Any]:
    stream = sentences()
    async with sttd_server(**{"STT_MAX_LOAD": "0", **env}) as server:
        pid = server.process.pid
        before = _thread_cpu_s(pid)
        started = time.perf_counter()
        outcomes: list[Any] = []

        async def one() -> None:
            outcomes.append(await stream_file(server.ws_url("sample_rate=16000"), stream.audio,
                                              speech_ends=stream.speech_ends,
                                              speech_starts=stream.speech_starts))

        async with trio.open_nursery() as nursery:
            for _ in range(n):
                nursery.start_soon(one)
        wall_s = time.perf_counter() - started
        after = _thread_cpu_s(pid)
    groups: dict[str, float] = {}
    threads = []
    for (tid, name), cpu_s in sorted(after.items()):
        used = cpu_s - before.get((tid, name), 0.0)
        group = _group(pid, tid, name)
        groups[group] = groups.get(group, 0.0) + used
        threads.append({"thread": tid - pid, "name": name, "group": group,
                        "cpu_percent": round(100 * used / wall_s, 1)})
    latencies = [lat for outcome in outcomes for lat in outcome.latencies_s]
    return {
        "n": n, "wall_s": round(wall_s, 1),
        "server_cpu_percent": round(100 * sum(groups.values()) / wall_s, 1),
        "groups_cpu_percent": {g: round(100 * s / wall_s, 1)
                               for g, s in sorted(groups.items(), key=lambda kv: -kv[1])},
        "threads": threads,
        "final_latency_p50_s": _rounded(percentile(latencies, 50)),
        "final_latency_p95_s": _rounded(percentile(latencies, 95)),
        "wer": round(wer([stream.reference] * len(outcomes),
                         [" ".join(f["text"] for f in o.finals) for o in outcomes]), 4),
    }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, assignments = text.partition(":")
    env = dict(item.split("=", 1) for item in assignments.split(",") if item)
    return name, env


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    variants = [_variant(v) for v in (args.variant or ["defaults:"])]
    points = []
    for n in args.n:
        for run in range(args.runs):
            for name, env in variants:
                point = {"variant": name, "env": env, "run": run, **await _one_run(n, env)}
                points.append(point)
                print(f"N={n} run={run} {name}: server {point['server_cpu_percent']}% of a core "
                      f"{point['groups_cpu_percent']} p50/p95 {point['final_latency_p50_s']}"
                      f"/{point['final_latency_p95_s']} s WER {point['wer']:.3f}", flush=True)
    return {"points": points}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--variant", action="append", metavar="NAME:KEY=VALUE,...")
    parser.add_argument("--out", type=Path, default=RESULTS / "thread_cpu.json")
    args = parser.parse_args()
    payload = trio.run(main_async, args)
    write_result(args.out, "uv run --group bench python " + " ".join(sys.argv), payload)


if __name__ == "__main__":
    main()
