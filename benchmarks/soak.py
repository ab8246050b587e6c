"""Soak: thousands of sessions churned around 50 steady ones; nothing may leak, no final lost.

A ``sttd serve`` child (mock backend, so the model costs nothing and only sttd's own state is
measured) takes 50 steady sessions that stream the reference fixtures in real time, each
followed by 1 s of silence, for the whole run. Around them, ``--sessions`` short sessions are
opened and ended in one of these ways, at random (seeded):

* ``reset``: mid-utterance, the TCP connection is reset (SO_LINGER 0; no close handshake);
* ``vanish``: mid-utterance, the socket is closed without a close frame;
* ``close``: mid-utterance, a normal close frame (1000) without ``end``;
* ``commit``: a commit mid-utterance, wait for its final, then a close frame (a cut that fell
  in a pause the VAD had already closed gets no final, as documented: the session is then
  ended, and counted as ``commit_in_silence``);
* ``end``: ``end`` mid-utterance, wait for the final and the server's close;
* ``instant``: connect and leave at once, before reading ``ready``.

The same shape runs twice: a warm-up (``--warmup`` churned sessions, default 500), after which,
with no session open, the baseline is read: the server's RSS and open file descriptors (psutil)
and its live trio tasks (``sttd_tasks_live``); then the measured run. When its sessions have all
ended, the three are read every second for up to 60 s until all are within 5% of the baseline.
The warm-up is there because allocators keep what a process once used at its peak concurrency
(Python's arenas, glibc's per-thread arenas, ONNX Runtime's): memory that a second run reuses
is not a leak, memory that grows with the number of sessions is. Each steady session must get
exactly one final with the reference text for every fixture it sent.

    uv run --group bench python benchmarks/soak.py --sessions 10000 \\
        --out benchmarks/results/soak.json
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import struct
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import trio
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import ConnectionClosed, open_websocket_url

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import RESULTS, sttd_server, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ACTIONS = ("reset", "vanish", "close", "commit", "end", "instant")
GROWTH_LIMIT = 0.05
FRAME_SAMPLES = 320  # 20 ms


def fixtures() -> list[tuple[str, np.ndarray]]:
    """(reference text, PCM16 samples) of each fixture in references/."""
    from sttd.audio import decode_wav, float32_to_pcm16

    rows = [line.split("\t", 1) for line in (ROOT / "references" / "refs.tsv").read_text()
            .splitlines() if line]
    return [(text, float32_to_pcm16(decode_wav((ROOT / "references" / name).read_bytes())))
            for name, text in rows]


# One client, one kept-alive connection, for every scrape: a connection per scrape would itself
# show as open descriptors and tasks on the server until its keep-alive timeout.
_scraper: list[httpx.AsyncClient] = []


async def metric(base_url: str, name: str) -> float:
    if not _scraper:
        _scraper.append(httpx.AsyncClient(timeout=60))
    text = (await _scraper[0].get(f"{base_url}/metrics")).text
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples if sample.name == name)


async def footprint(base_url: str, pid: int) -> dict[str, float]:
    process = psutil.Process(pid)
    return {"rss_mib": process.memory_info().rss / 2**20, "fds": process.num_fds(),
            "tasks": await metric(base_url, "sttd_tasks_live")}


async def wait_sessions(base_url: str, count: int, timeout_s: float = 120) -> None:
    with trio.fail_after(timeout_s):
        while await metric(base_url, "sttd_sessions_active") != count:
            await trio.sleep(0.2)


async def steady(url: str, clips: list[tuple[str, np.ndarray]], stop: trio.Event,
                 index: int, report: dict[str, Any]) -> None:
    """Stream fixtures in real time until `stop`; count finals against what was sent."""
    silence = np.zeros(16000, np.int16)
    sent: list[str] = []
    finals: list[str] = []
    warnings: list[str] = []  # a `lagging` skip explains a final that lost words
    rng = random.Random(index)
    async with open_websocket_url(url) as ws:
        await ws.get_message()

        async def receive() -> None:
            try:
                while True:
                    message = json.loads(await ws.get_message())
                    if message["type"] == "final":
                        finals.append(message["text"])
                    elif message["type"] in ("warning", "error"):
                        warnings.append(message["code"])
            except ConnectionClosed:
                pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            start = trio.current_time()
            frames = 0
            await trio.sleep(rng.uniform(0, 2))
            while not stop.is_set():
                text, pcm = rng.choice(clips)
                data = np.concatenate([pcm, silence]).tobytes()
                for offset in range(0, len(data), 2 * FRAME_SAMPLES):
                    frames += 1
                    await trio.sleep_until(start + frames * FRAME_SAMPLES / 16000)
                    await ws.send_message(data[offset : offset + 2 * FRAME_SAMPLES])
                sent.append(text)
            await ws.send_message(json.dumps({"type": "end"}))
    report[f"steady{index}"] = {"sent": len(sent), "finals": len(finals),
                                "lost": sum(1 for a, b in zip(sent, finals) if a != b)
                                + abs(len(sent) - len(finals)), "close": ws.closed.code
                                if ws.closed else None, "warnings": warnings,
                                "mismatches": [[a, b] for a, b in zip(sent, finals) if a != b][:3]}


async def churn_one(url: str, action: str, pcm: np.ndarray, rng: random.Random,
                    counts: dict[str, int]) -> None:
    with trio.fail_after(60):
        async with open_websocket_url(url) as ws:
            if action == "instant":
                await ws._stream.aclose()  # gone before reading anything
                return
            await ws.get_message()
            data = pcm[: rng.randint(pcm.size // 4, pcm.size - 1)].tobytes()
            for offset in range(0, len(data), 3200):  # faster than real time
                await ws.send_message(data[offset : offset + 3200])
            if action == "reset":
                ws._stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                             struct.pack("ii", 1, 0))
                await ws._stream.aclose()
            elif action == "vanish":
                await ws._stream.aclose()
            elif action == "close":
                await ws.aclose()
            elif action in ("commit", "end"):
                await ws.send_message(json.dumps({"type": action}))
                try:
                    if action == "commit":
                        with trio.move_on_after(10) as waited:
                            while json.loads(await ws.get_message())["type"] != "final":
                                pass
                        if waited.cancelled_caught:
                            # Cut in a pause the VAD had already ended: a commit with no open
                            # speech is documented to do nothing. The session must still be
                            # alive: `end` must close it (else fail_after calls it stuck).
                            counts["commit_in_silence"] = counts.get("commit_in_silence", 0) + 1
                            await ws.send_message(json.dumps({"type": "end"}))
                            while True:
                                await ws.get_message()
                    else:
                        while json.loads(await ws.get_message())["type"] != "final":
                            pass
                        while True:
                            await ws.get_message()
                except ConnectionClosed:
                    pass


async def churn(url: str, total: int, concurrency: int, clips: list[tuple[str, np.ndarray]],
                seed: int, counts: dict[str, int],
                checkpoint: Callable[[int], Awaitable[None]] | None = None) -> None:
    rng = random.Random(seed)
    limiter = trio.CapacityLimiter(concurrency)

    async def one(action: str, pcm: np.ndarray, child_rng: random.Random) -> None:
        async with limiter:
            try:
                await churn_one(url, action, pcm, child_rng, counts)
            except (ConnectionClosed, OSError, trio.BrokenResourceError):
                counts["client_side_errors"] = counts.get("client_side_errors", 0) + 1
            except trio.TooSlowError:  # no answer within 60 s: a stuck session, a finding
                key = f"stuck_{action}"
                counts[key] = counts.get(key, 0) + 1

    async with trio.open_nursery() as nursery:
        for n in range(total):
            action = rng.choice(ACTIONS)
            counts[action] = counts.get(action, 0) + 1
            await limiter.acquire()  # keep the nursery from holding 10,000 tasks at once
            limiter.release()
            nursery.start_soon(one, action, rng.choice(clips)[1], random.Random(rng.random()))
            if n % 1000 == 999:
                print(f"churned {n + 1}", flush=True)
                if checkpoint is not None:
                    await checkpoint(n + 1)


async def phase(server: Any, url: str, args: argparse.Namespace, clips: list[Any],
                sessions: int, seed: int, trajectory: list[dict[str, float]]
                ) -> tuple[dict[str, Any], dict[str, int], dict[str, float]]:
    """Steady sessions plus `sessions` churned ones; returns the steady report, the action
    counts and the footprint at the end of the churn. The footprint after every 1000 churned
    sessions goes to `trajectory`: a leak climbs steadily, an allocator's high-water mark
    levels off."""
    stop = trio.Event()
    report: dict[str, Any] = {}
    counts: dict[str, int] = {}

    async def checkpoint(churned: int) -> None:
        trajectory.append({"churned": churned,
                           **await footprint(server.base_url, server.process.pid)})
    async with trio.open_nursery() as nursery:
        for index in range(args.steady):
            nursery.start_soon(steady, url, clips, stop, index, report)
        await wait_sessions(server.base_url, args.steady)
        await churn(url, sessions, args.concurrency, clips, seed=seed, counts=counts,
                    checkpoint=checkpoint)
        peak = await footprint(server.base_url, server.process.pid)
        stop.set()
    await wait_sessions(server.base_url, 0)
    return report, counts, peak


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    clips = fixtures()
    settings = {"STT_BACKEND": "mock", "STT_VAD": args.vad}
    async with sttd_server(**settings) as server:
        url = server.ws_url("call_id=soak&sample_rate=16000")
        pid = server.process.pid
        warm_report, _, _ = await phase(server, url, args, clips, args.warmup, seed=args.seed + 1,
                                        trajectory=[])
        await trio.sleep(1)
        baseline = await footprint(server.base_url, pid)
        print("baseline", baseline, flush=True)
        started = time.perf_counter()
        trajectory: list[dict[str, float]] = []
        report, counts, peak = await phase(server, url, args, clips, args.sessions, args.seed,
                                           trajectory)
        churn_s = time.perf_counter() - started
        settle_s = 0.0
        while True:
            after = await footprint(server.base_url, pid)
            if all(after[k] <= baseline[k] * (1 + GROWTH_LIMIT) for k in baseline) or settle_s >= 60:
                break
            await trio.sleep(1)
            settle_s += 1
        print("after", after, f"settled in {settle_s:.0f} s", flush=True)
        outcomes = {}
        text = (await _scraper[0].get(f"{server.base_url}/metrics")).text
        await _scraper.pop().aclose()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "sttd_sessions_total":
                    outcomes[sample.labels["outcome"]] = sample.value
    growth = {key: (after[key] - baseline[key]) / baseline[key] for key in baseline}
    steady_lost = sum(item["lost"] for item in report.values())
    return {
        "settings": {"sessions": args.sessions, "warmup": args.warmup, "steady": args.steady,
                     "concurrency": args.concurrency, "seed": args.seed, "vad": args.vad},
        "churn_s": round(churn_s, 1),
        "settle_s": settle_s,
        "warmup_finals_lost": sum(item["lost"] for item in warm_report.values()),
        "actions": counts,
        "server_session_outcomes": outcomes,
        "baseline": baseline, "during_churn": peak, "after": after,
        "trajectory": trajectory,
        "growth": growth,
        "steady_sessions": report,
        "steady_fixtures_sent": sum(item["sent"] for item in report.values()),
        "steady_finals_lost": steady_lost,
        "passed": steady_lost == 0 and all(g < GROWTH_LIMIT for g in growth.values())
        and all(item["close"] == 1000 for item in report.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=10000)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--steady", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vad", default="silero")
    parser.add_argument("--out", type=Path, default=RESULTS / "soak.json")
    args = parser.parse_args()
    result = trio.run(main_async, args)
    print(json.dumps({k: result[k] for k in ("churn_s", "settle_s", "actions", "baseline", "after", "growth",
                                             "steady_fixtures_sent", "steady_finals_lost",
                                             "passed")}, indent=1))
    write_result(args.out, "uv run --group bench python " + " ".join(sys.argv), result)


if __name__ == "__main__":
    main()
