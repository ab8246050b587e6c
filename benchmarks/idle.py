"""Idle cost: N connected sessions streaming silence in real time; the server's CPU and calls.

Sessions that send only silence must cost no inference and little CPU. This opens ``-n``
sessions (default 200) to a ``sttd serve`` child (whisper backend, Silero VAD: the defaults),
each sending digital silence in real time in ``--frame-ms`` frames, and for ``--seconds``
measures the server's CPU (psutil, % of one core) and the scheduler requests it ran (from
/metrics: must be 0). A second pass does the same with sessions that send only a
``{"type": "keepalive"}`` every 5 s, the cheapest way to hold a session open. Each pass measures
the steady state, from 5 s after the last session connected.

The same three passes then run against ``bare_ws.py``: a quart-trio WebSocket route under
hypercorn that reads and discards messages. That is the floor of the serving stack itself, and
each sttd point reports its ratio to it. With ``--baseline COMMIT`` sttd at that commit runs
too (from ``git archive``), first in each run, and each point reports its ratio to it as well.
With ``--together`` the servers of a run are measured at once instead, each with its own ``-n``
sessions from the one client, over the same seconds: each ratio is then to the bare route of the
same sitting, and what the machine did meanwhile falls on both (``inference_requests`` is not
counted there).

    uv run --group bench python benchmarks/idle.py -n 200 --out benchmarks/results/idle.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import trio
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import open_websocket_url

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import RESULTS, source_tree, sttd_server, write_result  # noqa: E402


async def requests_run(base_url: str) -> float:
    async with httpx.AsyncClient(timeout=60) as client:
        text = (await client.get(f"{base_url}/metrics")).text
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples if sample.name == "sttd_scheduler_requests_total")


# A line's own noise, not digital zeros: white noise at -50 dBFS (RMS 104 of 32768), what a
# quiet room or a phone line sends between words. Its RMS is above the VAD's floor.
_NOISE_RMS = 104


def _frame(mode: str, frame_ms: int, rng: np.random.Generator) -> bytes:
    if mode == "noise":
        return (rng.normal(0, _NOISE_RMS, 16 * frame_ms).clip(-32768, 32767)
                .astype("<i2").tobytes())
    return bytes(32 * frame_ms)  # 16 kHz PCM16 zeros


async def hold(url: str, mode: str, frame_ms: int, stop: trio.Event, ready: list[int]) -> None:
    rng = np.random.default_rng(len(ready))
    frames = [_frame(mode, frame_ms, rng) for _ in range(8)]
    async with open_websocket_url(url) as ws:
        await ws.get_message()
        ready.append(1)
        start = trio.current_time()
        sent = 0
        while not stop.is_set():
            if mode in ("silence", "noise"):
                sent += 1
                await trio.sleep_until(start + sent * frame_ms / 1000)
                await ws.send_message(frames[sent % len(frames)])
            else:
                with trio.move_on_after(5):
                    await stop.wait()
                await ws.send_message(json.dumps({"type": "keepalive"}))
        await ws.send_message(json.dumps({"type": "end"}))


async def measure(server: Any, n: int, mode: str, frame_ms: int, seconds: float, *,
                  settle_s: float = 5.0, count_requests: bool = True) -> dict[str, Any]:
    url = server.ws_url("call_id=idle&sample_rate=16000")
    process = psutil.Process(server.process.pid)
    stop = trio.Event()
    ready: list[int] = []
    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(hold, url, mode, frame_ms, stop, ready)
        with trio.fail_after(120):
            while len(ready) < n:
                await trio.sleep(0.1)
        await trio.sleep(settle_s)  # past the connection burst: the steady state only
        before = await requests_run(server.base_url) if count_requests else 0.0
        process.cpu_percent(None)
        samples = []
        for _ in range(int(seconds)):
            await trio.sleep(1)
            samples.append(process.cpu_percent(None))
        after = await requests_run(server.base_url) if count_requests else 0.0
        rss_mib = process.memory_info().rss / 2**20
        stop.set()
    return {"sessions": n, "mode": mode, "frame_ms": frame_ms if mode != "keepalive" else None,
            "seconds": seconds, "server_cpu_percent_of_one_core": {
                "mean": statistics.fmean(samples), "max": max(samples)},
            "inference_requests": after - before if count_requests else None,
            "server_rss_mib": round(rss_mib, 1)}


async def measure_together(servers: list[tuple[str, Any]], n: int, mode: str, frame_ms: int,
                           seconds: float, *, settle_s: float = 5.0) -> list[dict[str, Any]]:
    """`measure` on every server of `servers` at once: `n` sessions each, from this one client
    loop, every server's CPU sampled over the same seconds.

    Two servers measured one after the other on a shared 2-core machine see different
    neighbours, clock speeds and cache states: the bare route alone moved by a factor of 1.5
    between runs. Measured together, whatever the machine does falls on both, so their ratio
    holds still where their levels do not.
    """
    processes = [psutil.Process(server.process.pid) for _, server in servers]
    stop = trio.Event()
    ready: list[int] = []
    async with trio.open_nursery() as nursery:
        for _ in range(n):  # interleaved, so that both servers' sessions start alike
            for _, server in servers:
                nursery.start_soon(hold, server.ws_url("call_id=idle&sample_rate=16000"), mode,
                                   frame_ms, stop, ready)
        with trio.fail_after(120):
            while len(ready) < n * len(servers):
                await trio.sleep(0.1)
        await trio.sleep(settle_s)
        for process in processes:
            process.cpu_percent(None)
        samples: list[list[float]] = [[] for _ in servers]
        for _ in range(int(seconds)):
            await trio.sleep(1)
            for process, taken in zip(processes, samples, strict=True):
                taken.append(process.cpu_percent(None))
        rss_mib = [process.memory_info().rss / 2**20 for process in processes]
        stop.set()
    return [{"sessions": n, "mode": mode, "frame_ms": frame_ms if mode != "keepalive" else None,
             "seconds": seconds, "together": True, "server": name,
             "server_cpu_percent_of_one_core": {"mean": statistics.fmean(taken),
                                                "max": max(taken)},
             "server_rss_mib": round(rss, 1)}
            for (name, _), taken, rss in zip(servers, samples, rss_mib, strict=True)]


# What each server name runs: sttd, the bare quart-trio route (the floor each sttd point is
# compared with) and the bare raw ASGI app (the floor without the framework).
SERVERS = {"sttd": ("-m", "sttd.cli", "serve"),
           "bare_stack": (str(Path(__file__).with_name("bare_ws.py")),),
           "bare_asgi": (str(Path(__file__).with_name("bare_asgi.py")),)}
MODES = (("silence", 20), ("silence", 100), ("keepalive", 0))
# Silence as a line sends it: digital zeros and -50 dBFS noise, in 200 ms frames.
QUIET_MODES = (("silence", 200), ("noise", 200))


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    modes = QUIET_MODES if args.quiet else MODES
    if args.frame_ms:
        modes = tuple((mode, ms) for mode, ms in modes if ms in (args.frame_ms, 0))
    points = []
    with contextlib.ExitStack() as stack:
        servers: list[tuple[str, tuple[str, ...], Path | None]] = [
            (name, SERVERS[name], None) for name in args.servers]
        if args.baseline:
            commit, tree = stack.enter_context(source_tree(args.baseline))
            servers.insert(0, (f"sttd@{commit}", SERVERS["sttd"], tree))
        # Run by run, every server in turn (each started afresh), so that the machine's drift
        # over the command falls on all of them alike.
        for run in range(args.runs):
            if args.together:
                async with contextlib.AsyncExitStack() as running:
                    started = [(name, await running.enter_async_context(sttd_server(
                        argv=argv, tree=source, STT_BACKEND=args.backend, STT_MAX_LOAD="0")))
                        for name, argv, source in servers]
                    for mode, frame_ms in modes:
                        together = await measure_together(started, args.n, mode, frame_ms,
                                                          args.seconds)
                        for point in together:
                            point["run"] = run
                            print(point, flush=True)
                        _pair_ratios(together, servers[0][0] if args.baseline else None)
                        points += together
                continue
            for server_name, argv, source in servers:
                # Every session is admitted: the measured capacity counts a caller as one who
                # will speak, and these never do.
                async with sttd_server(argv=argv, tree=source, STT_BACKEND=args.backend,
                                       STT_MAX_LOAD="0") as server:
                    for mode, frame_ms in modes:
                        point = await measure(server, args.n, mode, frame_ms, args.seconds,
                                              count_requests=server_name.startswith("sttd"))
                        point["server"] = server_name
                        point["run"] = run
                        print(point, flush=True)
                        points.append(point)
    baseline = servers[0][0] if args.baseline else None
    for point in points:
        if point.get("together"):
            continue  # each against the others of its own sitting (`_pair_ratios`)
        # Each server against the bare quart-trio stack's mean over its runs of the same mode;
        # this tree's sttd against the baseline commit's too.
        floors = {"ratio_to_bare_stack": "bare_stack"} if point["server"] != "bare_stack" else {}
        if baseline is not None and point["server"] == "sttd":
            floors["ratio_to_baseline"] = baseline
        for key, floor_name in floors.items():
            means = [p["server_cpu_percent_of_one_core"]["mean"] for p in points
                     if p["server"] == floor_name
                     and (p["mode"], p["frame_ms"]) == (point["mode"], point["frame_ms"])]
            if means:
                point[key] = (point["server_cpu_percent_of_one_core"]["mean"]
                              / max(statistics.fmean(means), 0.1))
    return {"settings": {"n": args.n, "backend": args.backend, "quiet": args.quiet,
                         "runs": args.runs, "together": args.together, "frame_ms": args.frame_ms or None,
                         "servers": [name for name, _, _ in servers]},
            "points": points}


def _pair_ratios(together: list[dict[str, Any]], baseline: str | None) -> None:
    """Each sttd point of one joint sitting against the bare quart route (and the baseline
    commit) measured over the same seconds."""
    cpu = {p["server"]: p["server_cpu_percent_of_one_core"]["mean"] for p in together}
    for point in together:
        if point["server"] != "bare_stack" and "bare_stack" in cpu:
            point["ratio_to_bare_stack"] = (point["server_cpu_percent_of_one_core"]["mean"]
                                            / max(cpu["bare_stack"], 0.1))
        if baseline is not None and point["server"] == "sttd":
            point["ratio_to_baseline"] = (point["server_cpu_percent_of_one_core"]["mean"]
                                          / max(cpu[baseline], 0.1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--backend", default="whisper")
    parser.add_argument("--quiet", action="store_true",
                        help="silence as a line sends it, in 200 ms frames: digital zeros, then "
                             "-50 dBFS noise (instead of zeros in 20 and 100 ms, and keepalives)")
    parser.add_argument("--runs", type=int, default=1, help="passes of every mode per server")
    parser.add_argument("--frame-ms", type=int, default=0,
                        help="only the modes with frames of this length (and keepalives)")
    parser.add_argument("--servers", nargs="+", choices=sorted(SERVERS),
                        default=["sttd", "bare_stack"],
                        help="which servers to measure (bare_stack is the ratios' floor)")
    parser.add_argument("--baseline", metavar="COMMIT",
                        help="also run sttd at this commit (a baseline for the ratios)")
    parser.add_argument("--together", action="store_true",
                        help="measure every server at once, over the same seconds, each with "
                             "its own -n sessions (their ratios then share the machine's drift)")
    parser.add_argument("--out", type=Path, default=RESULTS / "idle.json")
    args = parser.parse_args()
    write_result(args.out, "uv run --group bench python " + " ".join(sys.argv),
                 trio.run(main_async, args))


if __name__ == "__main__":
    main()
