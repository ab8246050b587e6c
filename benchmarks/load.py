"""Load generator: N concurrent sessions streaming real speech in real time against sttd.

Each session streams ``--file`` (default long_dev.wav: 94.5 s with pauses) in 20 ms frames at
real-time pace, starting at a random offset within the first ``--stagger-s`` seconds, and then
sends ``end``. Per session it measures final latency (the audio at a final's speech end sent ->
final received), partial interval, WER of the joined finals and whether it ended with 1000. For the
server process (a ``sttd serve`` child started here) it samples CPU % and RSS with psutil, and
reads dropped frames and partials from /metrics.

With ``--query`` each point is run once per query variant (extra native query parameters,
``-`` for none), the variants alternating within the one server, so that what a parameter
changes is measured against a baseline in the same command; capacities are then given per
variant.

capacity = the largest N with p95 final latency <= 1.5 s, WER within 2 points of N=1, and every
session closed normally with as many finals as at N=1. Where admission refuses some sessions at
connect, that stops at the last N served whole; ``admitted_capacity`` is then the most sessions
served at once within the same targets (the least admitted of an N's runs).

With ``--overhead`` (meant for the mock backend, whose inference costs nothing) it measures the
server's own cost instead: capacity is then the largest N at which the p99 frame-to-processing
lag stays under 100 ms and every session closed normally. That lag is the client's send lag
(how late a frame's send returned against its real-time schedule: the server not reading shows
up here as TCP backpressure) plus the server's ``sttd_frame_lag_seconds`` (from a frame read
off the socket to its session's VAD processing it); both p99s must be under the limit.

    uv run --group bench python benchmarks/load.py -n 1 2 4 8 16 --runs 2 \\
        --out benchmarks/results/load_whisper.json
    # a WhisperLive server already running (see benchmarks/peers/compare.sh):
    uv run --group bench python benchmarks/load.py --target whisperlive \\
        --url ws://127.0.0.1:9090 --pid PID -n 1 2 4 8 --out whisperlive.json
    uv run --group bench python benchmarks/load.py --overhead --backend mock --vad energy \\
        -n 100 250 500 1000 --stagger-s 10 --out benchmarks/results/load_mock.json
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import trio
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (  # noqa: E402
    RATE_HZ,
    RESULTS,
    Stream,
    load,
    percentile,
    references,
    sentences,
    stream_file,
    sttd_server,
    wer,
    write_result,
)

P95_LIMIT_S = 1.5
WER_SLACK = 0.02
LAG_LIMIT_S = 0.1


async def _sample_process(pid: int, samples: list[tuple[float, float]], period_s: float) -> None:
    process = psutil.Process(pid)
    process.cpu_percent(None)
    while True:
        await trio.sleep(period_s)
        try:
            samples.append((process.cpu_percent(None), process.memory_info().rss / 2**20))
        except psutil.NoSuchProcess:
            return


async def _scrape(base_url: str) -> dict[str, float]:
    async with httpx.AsyncClient(timeout=60) as client:
        text = (await client.get(f"{base_url}/metrics")).text
    wanted = {"sttd_frames_dropped_total", "sttd_partials_dropped_total",
              "sttd_audio_skipped_seconds_total",
              "sttd_scheduler_batch_size_sum", "sttd_scheduler_batch_size_count"}
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
            elif sample.name == "sttd_frame_lag_seconds_bucket":
                key = f"lag_le_{sample.labels['le']}"
                values[key] = values.get(key, 0.0) + sample.value
    return values


def _lag_quantile(before: dict[str, float], after: dict[str, float], q: float) -> float | None:
    """Upper bound of the histogram bucket holding quantile `q` of the frames seen between."""
    buckets = sorted(
        (float(key[len("lag_le_"):]), after[key] - before.get(key, 0.0))
        for key in after if key.startswith("lag_le_"))
    total = buckets[-1][1] if buckets else 0.0
    if not total:
        return None
    return next(bound for bound, count in buckets if count >= q * total)


async def run_point(server_url: str, base_url: str | None, pid: int, n: int, stream: Stream,
                    stagger_s: float, seed: int, target: str = "sttd") -> dict[str, Any]:
    from sttd import client

    audio, reference = stream.audio, stream.reference
    rng = random.Random(seed)
    outcomes: list[Any] = [None] * n
    before = await _scrape(base_url) if base_url else {}
    samples: list[tuple[float, float]] = []

    async def session(index: int) -> None:
        await trio.sleep(rng.uniform(0, stagger_s))
        try:
            if target == "whisperlive":
                from benchmarks.peers.whisperlive_client import stream_whisperlive

                outcomes[index] = await stream_whisperlive(server_url, audio)
            else:
                outcomes[index] = await stream_file(server_url, audio,
                                                    speech_ends=stream.speech_ends,
                                                    speech_starts=stream.speech_starts)
        except Exception as exc:  # a refused or broken session is a result, not a crash
            outcomes[index] = exc

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_sample_process, pid, samples, 0.5)
        async with trio.open_nursery() as sessions:
            for index in range(n):
                sessions.start_soon(session, index)
        nursery.cancel_scope.cancel()
    wall_s = time.perf_counter() - started
    after = await _scrape(base_url) if base_url else {}
    good = [o for o in outcomes if not isinstance(o, BaseException)]
    refused = [o for o in outcomes
               if isinstance(o, client.SessionRefused) and o.code == "overloaded"]
    gaps = [x for o in good for x in o.partial_gaps_s]
    firsts = [x for o in good for x in o.first_partial_s]
    latencies = [x for o in good for x in o.latencies_s]
    send_lags = np.concatenate([o.send_lag_s for o in good]) if good else np.zeros(0)
    wers = [wer([reference], [" ".join(f["text"] for f in o.finals)]) for o in good]
    batches = after.get("sttd_scheduler_batch_size_count", 0) - before.get(
        "sttd_scheduler_batch_size_count", 0)
    batched = after.get("sttd_scheduler_batch_size_sum", 0) - before.get(
        "sttd_scheduler_batch_size_sum", 0)
    return {
        "n": n,
        "wall_s": round(wall_s, 1),
        "sessions_ok": sum(1 for o in good if o.close_code == 1000),
        "sessions_refused": len(refused),
        "sessions_failed": [repr(o)[:200] for o in outcomes
                            if isinstance(o, BaseException) and o not in refused],
        "finals_per_session": sorted(len(o.finals) for o in good),
        "flushed_finals": sum(1 for o in good for f in o.finals if f.get("flushed")),
        "final_latency_s": {"p50": percentile(latencies, 50), "p95": percentile(latencies, 95),
                            "p99": percentile(latencies, 99), "count": len(latencies)},
        "partials_per_session_mean": statistics.fmean(o.partials for o in good) if good else 0,
        "partial_interval_s": (audio.size / RATE_HZ) / max(
            statistics.fmean(o.partials for o in good), 1) if good else None,
        "wer_mean": statistics.fmean(wers) if wers else None,
        "wer_max": max(wers, default=None),
        "partial_gap_s": {"p50": percentile(gaps, 50), "p95": percentile(gaps, 95),
                          "max": max(gaps, default=None)},
        # The first partial's wait alone, from the speaker's true start of speech.
        "first_partial_s": {"p50": percentile(firsts, 50), "p95": percentile(firsts, 95),
                            "max": max(firsts, default=None)},
        "frames_dropped": after.get("sttd_frames_dropped_total", 0) - before.get(
            "sttd_frames_dropped_total", 0),
        "audio_skipped_s": after.get("sttd_audio_skipped_seconds_total", 0) - before.get(
            "sttd_audio_skipped_seconds_total", 0),
        "partials_dropped": after.get("sttd_partials_dropped_total", 0) - before.get(
            "sttd_partials_dropped_total", 0),
        "mean_batch_size": batched / batches if batches else None,
        "frame_lag_s": {
            "client_send_p50": float(np.percentile(send_lags, 50)) if send_lags.size else None,
            "client_send_p99": float(np.percentile(send_lags, 99)) if send_lags.size else None,
            "client_send_max": float(send_lags.max()) if send_lags.size else None,
            "server_p99_bucket_le": _lag_quantile(before, after, 0.99),
            "server_p50_bucket_le": _lag_quantile(before, after, 0.50),
        },
        "server_cpu_percent": {"mean": statistics.fmean(s[0] for s in samples) if samples else None,
                               "max": max((s[0] for s in samples), default=None)},
        "server_rss_mib": {"max": max((s[1] for s in samples), default=None)},
    }


def overhead_capacity(points: list[dict[str, Any]]) -> int:
    """Largest N whose every run kept both p99 frame lags under LAG_LIMIT_S, all sessions ok."""
    best = 0
    for n in sorted({p["n"] for p in points}):
        runs = [p for p in points if p["n"] == n]
        ok = all(
            p["sessions_ok"] == n
            and p["frame_lag_s"]["client_send_p99"] is not None
            and p["frame_lag_s"]["client_send_p99"] < LAG_LIMIT_S
            and (p["frame_lag_s"]["server_p99_bucket_le"] or 0) <= LAG_LIMIT_S
            for p in runs)
        if not ok:
            break
        best = n
    return best


def capacity(points: list[dict[str, Any]], *, admitted: bool = False) -> int:
    """The largest N whose every run served all N sessions within the targets; with
    `admitted`, the most sessions served at once within them where the server refused the rest
    at connect (the least admitted of an N's runs), up to the first N whose admitted sessions
    missed a target."""
    base = [p for p in points if p["n"] == 1]
    if not base:
        return 0
    base_wer = statistics.fmean(p["wer_mean"] for p in base)
    base_finals = min(min(p["finals_per_session"]) for p in base)
    best = 0
    for n in sorted({p["n"] for p in points}):
        runs = [p for p in points if p["n"] == n]
        ok = all(
            (p["sessions_ok"] > 0 and not p["sessions_failed"] if admitted
             else p["sessions_ok"] == n)
            and p["final_latency_s"]["p95"] is not None
            and p["final_latency_s"]["p95"] <= P95_LIMIT_S
            and p["wer_mean"] <= base_wer + WER_SLACK
            and min(p["finals_per_session"]) >= base_finals
            and not p.get("audio_skipped_s")
            for p in runs)
        if not ok:
            break
        best = max(best, min(p["sessions_ok"] for p in runs)) if admitted else n
    return best


def _stream(name: str, line_noise_dbfs: float | None = None) -> Stream:
    """`name`'s stream with 1 s of silence after it; with `line_noise_dbfs`, seeded white noise
    at that RMS over all of it, pauses included (a line is never digitally silent)."""
    if name == "sentences":
        stream = sentences()
    elif name == "sentences-once":  # one pass: 11 utterances, about 50 s (the GPU script's)
        stream = sentences(repeats=1)
    else:
        stream = Stream(load(name), references()[name])
    audio = np.concatenate([stream.audio, np.zeros(RATE_HZ, np.float32)])
    if line_noise_dbfs is not None:
        noise = np.random.default_rng(20261207).normal(0.0, 10 ** (line_noise_dbfs / 20),
                                                        audio.size)
        audio = np.clip(audio + noise, -1.0, 1.0).astype(np.float32)
    return Stream(audio, stream.reference, stream.speech_ends, stream.speech_starts)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    stream = _stream(args.file, args.line_noise_dbfs)
    stagger_s = 0.1 if args.together else args.stagger_s
    if args.target == "whisperlive":
        return await _whisperlive(args, stream, stagger_s)
    points = []
    settings = {"STT_BACKEND": args.backend, "STT_VAD": args.vad,
                "STT_IN_QUEUE_MAX_DROPS": str(10**9)}
    settings.update(dict(item.split("=", 1) for item in args.set))
    queries = [_query(q) for q in args.query]
    async with sttd_server(**settings) as server:
        for n in args.n:
            for run in range(args.runs):
                # Alternating the order each run, so neither variant always goes first.
                for query in (queries if run % 2 == 0 else queries[::-1]):
                    url = server.ws_url("call_id=load&sample_rate=16000" + query)
                    point = await run_point(url, server.base_url, server.process.pid, n, stream,
                                            stagger_s, seed=run)
                    point["run"] = run
                    if len(queries) > 1:
                        point["query"] = query
                    points.append(point)
                    print(f"N={n:4d} run={run}{query} p50={point['final_latency_s']['p50']} "
                          f"p95={point['final_latency_s']['p95']} wer={point['wer_mean']} "
                          f"ok={point['sessions_ok']} refused={point['sessions_refused']} "
                          f"skipped_s={point['audio_skipped_s']} "
                          f"partial_gap={point['partial_gap_s']} "
                          f"first_partial={point['first_partial_s']} "
                          f"cpu={point['server_cpu_percent']['mean']} "
                          f"batch={point['mean_batch_size']} lag={point['frame_lag_s']}", flush=True)
            if args.until_fail and all(_fell_over(p) for p in points if p["n"] == n):
                break  # far past any use at this N: larger N only takes longer to say so
    result: dict[str, Any] = {
        "settings": {"backend": args.backend, "vad": args.vad, "file": args.file,
                     "stagger_s": stagger_s, "together": args.together, "runs": args.runs,
                     "line_noise_dbfs": args.line_noise_dbfs, "server_env": settings,
                     "overhead": args.overhead, "queries": queries},
        "points": points}
    for query in queries:
        mine = [p for p in points if p.get("query", query) == query]
        summary = {"capacity": overhead_capacity(mine) if args.overhead else capacity(mine),
                   "admitted_capacity": None if args.overhead else capacity(mine, admitted=True)}
        if len(queries) == 1:
            result.update(summary)
        else:
            result.setdefault("by_query", {})[query or "-"] = summary
    return result


def _query(variant: str) -> str:
    """A ``--query`` variant as the text to append to the session URL."""
    return "" if variant in ("", "-") else "&" + variant.lstrip("&")


async def _whisperlive(args: argparse.Namespace, stream: Stream,
                       stagger_s: float) -> dict[str, Any]:
    """The same sweep against a WhisperLive server started outside (see peers/compare.sh)."""
    from benchmarks.peers.whisperlive_client import stream_whisperlive

    # WhisperLive loads its model when the first session connects: warm it up unmeasured.
    await stream_whisperlive(args.url, stream.audio[: 3 * RATE_HZ])
    points = []
    for n in args.n:
        for run in range(args.runs):
            point = await run_point(args.url, None, args.pid, n, stream, stagger_s, seed=run,
                                    target="whisperlive")
            point["run"] = run
            points.append(point)
            print(f"whisperlive N={n:4d} run={run} p50={point['final_latency_s']['p50']} "
                  f"p95={point['final_latency_s']['p95']} wer={point['wer_mean']} "
                  f"flushed={point['flushed_finals']} cpu={point['server_cpu_percent']['mean']}",
                  flush=True)
            if _fell_over(point):
                break
        if points and _fell_over(points[-1]):
            break
    return {"settings": {"target": "whisperlive", "url": args.url, "file": args.file,
                         "stagger_s": stagger_s, "together": args.together, "runs": args.runs},
            "points": points, "capacity": capacity(points)}


def _fell_over(point: dict[str, Any]) -> bool:
    """Far past any use: the sweep stops going up in N."""
    p95 = point["final_latency_s"]["p95"]
    admitted = point["n"] - point.get("sessions_refused", 0)
    return (point["sessions_ok"] < admitted or p95 is None or p95 > 20 * P95_LIMIT_S
            or (point["wer_mean"] or 1.0) > 0.5)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--backend", default="whisper")
    parser.add_argument("--vad", default="silero")
    parser.add_argument("--file", default="long_dev.wav",
                        help="a data file, or 'sentences': 22 short utterances with 1.2 s "
                             "pauses, latency measured from their true speech ends "
                             "('sentences-once': the first 11 of them, about 50 s)")
    parser.add_argument("--stagger-s", type=float, default=2.0,
                        help="sessions start at random within this many seconds")
    parser.add_argument("--together", action="store_true",
                        help="all sessions start within 100 ms (overrides --stagger-s)")
    parser.add_argument("--line-noise-dbfs", type=float, default=None,
                        help="white noise at this RMS over the whole stream, pauses included")
    parser.add_argument("--target", choices=("sttd", "whisperlive"), default="sttd")
    parser.add_argument("--url", default="ws://127.0.0.1:9090", help="whisperlive target only")
    parser.add_argument("--pid", type=int, default=0, help="whisperlive server pid (CPU, RSS)")
    parser.add_argument("--set", action="append", default=[], metavar="STT_KEY=VALUE",
                        help="extra server setting (repeatable)")
    parser.add_argument("--until-fail", action="store_true",
                        help="stop going up in N once every run at an N fell over (p95 > 30 s, "
                             "WER > 50%% or a session failed)")
    parser.add_argument("--overhead", action="store_true",
                        help="capacity by frame lag (for the mock backend), not by final latency")
    parser.add_argument("--query", nargs="+", default=["-"], metavar="QUERY",
                        help="native query parameters added to each session's URL (e.g. "
                             "words=false); several: each point once per variant; - for none")
    parser.add_argument("--out", type=Path, default=RESULTS / "load_whisper.json")
    args = parser.parse_args()
    result = trio.run(main_async, args)
    print("capacity:", result.get("capacity"), "admitted:", result.get("admitted_capacity"),
          result.get("by_query", ""))
    write_result(args.out, "uv run --group bench python " + " ".join(sys.argv), result)


if __name__ == "__main__":
    main()
