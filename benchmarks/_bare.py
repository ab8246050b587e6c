"""Serve a bare benchmark app (`bare_ws.py`, `bare_asgi.py`) under hypercorn's trio worker on
loopback, announcing its port as ``sttd serve`` does, so the same harness starts it.

Imports nothing but trio and hypercorn: the bare servers' memory is part of what they measure.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

__all__ = ["run"]


def run(app: Any) -> None:
    """Serve `app` on 127.0.0.1:$STT_PORT (default 0: any free port) until killed; logs
    ``"server.listening"`` with the port and ``"engine.ready"`` on stderr."""
    trio.run(_main, app)


async def _main(app: Any) -> None:
    config = Config()
    config.bind = [f"127.0.0.1:{os.environ.get('STT_PORT', '0')}"]
    config.accesslog = None
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(serve, app, config)
        port = int(binds[0].rsplit(":", 1)[1])
        print(json.dumps({"event": "server.listening", "port": str(port)}),
              '"engine.ready"', file=sys.stderr, flush=True)
