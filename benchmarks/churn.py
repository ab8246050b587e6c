"""Churn: many short sessions and uploads, one after another; the server's memory and descriptors.

A server in front of a call centre sees connections come and go all day. This runs ``-n``
short requests against one ``sttd serve`` child (the mock backend by default, so the engine
costs nothing and the serving path is what is measured), four at a time: four in five are
WebSocket sessions that stream ``ps_goforward`` as fast as the socket takes it, of which one in
three leaves without ``end`` (the client just closes), the rest end and read until the close;
one in five is an upload to ``/v1/stt/transcribe`` from a new HTTP client each time, which
closes its kept-alive connection after the answer. Every ``--every`` requests it records the
server's RSS, open file descriptors and threads (psutil), and after the last, the server's
TCP sockets by state (``ss``) for 10 s: none should be left in CLOSE-WAIT, and descriptors and
memory should not grow with the count. With ``--baseline COMMIT`` the same runs against sttd
at that commit first.

    uv run --group bench python benchmarks/churn.py -n 2000 --out benchmarks/results/churn.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import RESULTS, load, source_tree, sttd_server, write_result  # noqa: E402

_AT_ONCE = 4
_CLIP = "ps_goforward.wav"


def _socket_states(port: int) -> dict[str, int]:
    """The server's TCP sockets on `port`, counted by state."""
    out = subprocess.run(["ss", "-tanH", f"sport = :{port}"], capture_output=True, text=True,
                         check=False).stdout
    states: dict[str, int] = {}
    for line in out.splitlines():
        if line.strip():
            states[line.split()[0]] = states.get(line.split()[0], 0) + 1
    return states


async def _one(server: Any, k: int, pcm: bytes, wav: bytes) -> None:
    if k % 5 == 0:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:
            response = await client.post("/v1/stt/transcribe", files={"file": ("a.wav", wav)})
            response.raise_for_status()
        return
    async with open_websocket_url(server.ws_url(f"call_id=c{k}&sample_rate=16000")) as ws:
        await ws.get_message()
        for offset in range(0, len(pcm), 3200):
            await ws.send_message(pcm[offset : offset + 3200])
        if k % 3 == 0:
            return  # the client leaves without `end`
        await ws.send_message(json.dumps({"type": "end"}))
        with contextlib.suppress(ConnectionClosed):
            while True:
                await ws.get_message()


async def churn(server: Any, n: int, every: int) -> dict[str, Any]:
    from sttd.audio import encode_wav, float32_to_pcm16

    clip = load(_CLIP)
    pcm, wav = float32_to_pcm16(clip).tobytes(), encode_wav(clip)
    process = psutil.Process(server.process.pid)
    samples = []
    started = time.perf_counter()
    for first in range(0, n, _AT_ONCE):
        async with trio.open_nursery() as nursery:
            for k in range(first, min(first + _AT_ONCE, n)):
                nursery.start_soon(_one, server, k, pcm, wav)
        if first % every == 0 or first + _AT_ONCE >= n:
            samples.append({"requests": min(first + _AT_ONCE, n),
                            "seconds": round(time.perf_counter() - started, 1),
                            "rss_mib": round(process.memory_info().rss / 2**20, 1),
                            "fds": process.num_fds(), "threads": process.num_threads()})
            print(samples[-1], flush=True)
    after: list[dict[str, Any]] = []
    for wait_s in (1, 3, 10):
        await trio.sleep(wait_s - (after[-1]["after_s"] if after else 0))
        after.append({"after_s": wait_s, "fds": process.num_fds(),
                      "sockets": _socket_states(server.port)})
        print(after[-1], flush=True)
    return {"samples": samples, "after": after}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    runs = []
    with contextlib.ExitStack() as stack:
        trees: list[tuple[str, Path | None]] = [("sttd", None)]
        if args.baseline:
            commit, baseline = stack.enter_context(source_tree(args.baseline))
            trees.insert(0, (f"sttd@{commit}", baseline))
        for name, tree in trees:
            async with sttd_server(tree=tree, STT_BACKEND=args.backend, STT_MAX_LOAD="0") as server:
                runs.append({"server": name, **await churn(server, args.n, args.every)})
    return {"settings": {"n": args.n, "backend": args.backend, "at_once": _AT_ONCE},
            "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=2000, help="requests in all")
    parser.add_argument("--every", type=int, default=200, help="requests between samples")
    parser.add_argument("--backend", default="mock")
    parser.add_argument("--baseline", metavar="COMMIT", help="also run sttd at this commit, first")
    parser.add_argument("--out", type=Path, default=RESULTS / "churn.json")
    args = parser.parse_args()
    write_result(args.out, "uv run --group bench python " + " ".join(sys.argv),
                 trio.run(main_async, args))


if __name__ == "__main__":
    main()
