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
import sys
from pathlib import Path

from quart import websocket
from quart_trio import QuartTrio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._bare import run  # noqa: E402

app = QuartTrio(__name__)


@app.websocket("/v1/stt/ws")
async def discard() -> None:
    await websocket.accept()
    await websocket.send(json.dumps({"type": "ready"}))
    while True:
        message = await websocket.receive()
        if isinstance(message, str) and json.loads(message).get("type") == "end":
            return


if __name__ == "__main__":
    run(app)
