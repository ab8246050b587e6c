"""Where a streaming session's per-message cost goes: py-spy samples of a server holding N
sessions that stream digital silence in real time (20 ms frames), grouped by stage.

It starts ``sttd serve`` (mock backend, so no inference; the VAD as ``--vad`` says), connects
``-n`` sessions, waits for the steady state, and records the server with py-spy (sampling
blocks the process briefly, so the absolute CPU it shows is inflated; the shares are what
count). Each sample is put in the first stage its stack reaches, innermost first:

* ``vad``: the endpointer and its classifier (`sttd/vad.py`);
* ``session_core``: the rest of the sans-I/O core (`sttd/session/`);
* ``channels``: sttd's bounded channels (`sttd/channels.py`) and trio's memory channels;
* ``audio_convert``: the one audio converter (`sttd/audio/`);
* ``nursery_tasks``: what is left in the session's tasks (`sttd/nursery.py`), trio's
  scheduling included;
* ``websocket_stack``: hypercorn, wsproto, h11 and quart: the serving stack, which the bare
  route (benchmarks/bare_ws.py) also pays;
* ``other``: the rest (metrics, the event loop's own bookkeeping).

    pip install py-spy   # it needs ptrace; run as root, or with kernel.yama.ptrace_scope=0
    uv run --group bench python benchmarks/profile_idle.py -n 200 \\
        --out benchmarks/results/profile_idle.json
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import trio
from trio_websocket import open_websocket_url

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import RESULTS, sttd_server, write_result  # noqa: E402

# Innermost match wins: a frame of sttd/vad.py under the nursery counts as vad.
_STAGES = (
    ("vad", ("sttd/vad.py",)),
    ("audio_convert", ("sttd/audio/",)),
    ("session_core", ("sttd/session/",)),
    ("channels", ("sttd/channels.py", "trio/_channel.py")),
    ("websocket_stack", ("hypercorn/", "wsproto/", "h11/", "quart/", "quart_trio/")),
    ("nursery_tasks", ("sttd/nursery.py", "sttd/admission/_transport.py")),
)


def stage_of(stack: list[str]) -> str:
    for frame in reversed(stack):
        for stage, paths in _STAGES:
            if any(path in frame for path in paths):
                return stage
    return "other"


async def _session(port: int, index: int, seconds: float) -> None:
    frame = np.zeros(320, np.int16).tobytes()
    url = f"ws://127.0.0.1:{port}/v1/stt/ws?call_id=p{index}&sample_rate=16000"
    async with open_websocket_url(url) as ws:
        await ws.get_message()
        start = trio.current_time()
        sent = 0
        while trio.current_time() - start < seconds:
            await ws.send_message(frame)
            sent += 1
            await trio.sleep_until(start + sent * 0.02)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        raise SystemExit("py-spy is not installed: pip install py-spy")
    connect_s = args.n * 0.01
    hold_s = connect_s + args.warmup_s + args.seconds + 5
    async with sttd_server(STT_BACKEND="mock", STT_VAD=args.vad, STT_MAX_LOAD="0") as server:
        with tempfile.TemporaryDirectory() as tmp:
            raw = Path(tmp) / "samples.txt"
            async with trio.open_nursery() as nursery:
                for index in range(args.n):
                    nursery.start_soon(_session, server.port, index, hold_s)
                    await trio.sleep(0.01)
                await trio.sleep(args.warmup_s)
                await trio.run_process(
                    [py_spy, "record", "-p", str(server.process.pid), "-d", str(int(args.seconds)),
                     "-r", "100", "-f", "raw", "-o", str(raw)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            counts: collections.Counter[str] = collections.Counter()
            for line in raw.read_text().splitlines():
                stack, _, count = line.rpartition(" ")
                counts[stage_of(stack.split(";"))] += int(count)
    total = sum(counts.values())
    shares = {stage: round(counts[stage] / total, 3)
              for stage in [name for name, _ in _STAGES] + ["other"]}
    print(json.dumps(shares, indent=2))
    return {"sessions": args.n, "vad": args.vad, "frame_ms": 20, "samples": total,
            "share_by_stage": shares}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=200)
    parser.add_argument("--vad", default="silero")
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--warmup-s", type=float, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS / "profile_idle.json")
    args = parser.parse_args()
    result = trio.run(main_async, args)
    write_result(args.out, "uv run --group bench python " + " ".join(sys.argv), result)


if __name__ == "__main__":
    main()
