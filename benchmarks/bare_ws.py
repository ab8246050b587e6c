"""The serving stack's floor: a quart-trio WebSocket route under hypercorn that does nothing.

It accepts ``/v1/stt/ws``, sends ``{"type": "ready"}``, reads and discards every message, and
returns on ``end``: what any server on this stack pays per message before doing any work. The
idle benchmark runs its clients against it too, as the baseline for sttd's own cost. It logs
``"server.listening"`` with its port and ``"engine.ready"`` like ``sttd serve``, so the same
harness starts it.

    uv run python benchmarks/bare_ws.py   # STT_PORT (default 0: any free port)
"""

from __future__ import annotations

import json
import os
import sys

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from quart import websocket
from quart_trio import QuartTrio

app = QuartTrio(__name__)


@app.websocket("/v1/stt/ws")
async def discard() -> None:
    await websocket.accept()
    await websocket.send(json.dumps({"type": "ready"}))
    while True:
        message = await websocket.receive()
        if isinstance(message, str) and json.loads(message).get("type") == "end":
            return


async def main() -> None:
    config = Config()
    config.bind = [f"127.0.0.1:{os.environ.get('STT_PORT', '0')}"]
    config.accesslog = None
    async with trio.open_nursery() as nursery:
        ports: list[int] = []

        async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            binds = await nursery.start(serve, app, config)
            ports.extend(int(bind.rsplit(":", 1)[1]) for bind in binds)
            task_status.started()

        await nursery.start(run)
        print(json.dumps({"event": "server.listening", "port": str(ports[0])}),
              '"engine.ready"', file=sys.stderr, flush=True)


if __name__ == "__main__":
    trio.run(main)
