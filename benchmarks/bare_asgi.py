"""The serving stack's floor without the web framework: a raw ASGI WebSocket app under hypercorn.

Like ``bare_ws.py`` (accepts ``/v1/stt/ws``, sends ``{"type": "ready"}``, reads and discards
every message, ends when the client closes) but with no quart between hypercorn and the handler: what
the streaming routes would pay per message if they bypassed the framework. The idle benchmark
runs it beside ``bare_ws.py`` (``--servers``).

    uv run python benchmarks/bare_asgi.py   # STT_PORT (default 0: any free port)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._bare import run  # noqa: E402


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "websocket":
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        return
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    await send({"type": "websocket.send", "text": json.dumps({"type": "ready"})})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        text = message.get("text")
        if text is not None:
            json.loads(text)  # read like a command; "end" is followed by the client's close
        # Closing from here as the client's close frame arrives can make hypercorn 0.18 send on
        # the socket from two tasks (trio.BusyResourceError, which ends its whole server): the
        # client closes after "end", and this app leaves the close to it.


if __name__ == "__main__":
    run(app)
