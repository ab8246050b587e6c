"""The accepted WebSocket as a session sees it (`sttd.nursery.Transport`), within its limits."""

from __future__ import annotations

import logging
from typing import NoReturn

import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable
from hypercorn.utils import UnexpectedMessageError

from sttd.errors import PayloadTooLarge

# How long `AsgiTransport.finish` waits for the client's close reply, seconds.
_FINISH_TIMEOUT_S = 5.0

__all__ = ["AsgiTransport"]

log = logging.getLogger(__name__)


class AsgiTransport:
    """An accepted WebSocket read and written through its ASGI `receive` and `send` themselves.

    The session's receive task calls `receive` directly, with no task between it and hypercorn
    (`sttd.http` serves the streaming routes on ASGI rather than through quart, which passes
    every message from a task of its own through a queue).

    A client that goes away: hypercorn's ``websocket.disconnect`` cancels `gone`, the scope the
    connection's session runs in, so that the session's nursery ends from outside as it would for
    any framework that cancels its handler. The session sees it at its next read; while it is
    not reading (holding a client that sends faster than real time, or after the client's end,
    waiting for its last finals) it finishes that bounded work first, and its sends meanwhile
    return False.

    A message over `max_message_bytes` raises `PayloadTooLarge` from `receive`: the session then
    sends the finals of what it heard, the ``payload_too_large`` error and closes 1009.
    (`sttd.server` makes hypercorn hand such a message over cut to one byte past the limit,
    instead of closing the socket behind the session.)
    """

    def __init__(self, receive: ASGIReceiveCallable, send: ASGISendCallable, *,
                 gone: trio.CancelScope, max_message_bytes: int) -> None:
        self._receive = receive
        self._send = send
        self._gone = gone
        self._max_message_bytes = max_message_bytes

    async def receive(self) -> bytes | str:
        message = await self._receive()
        if message["type"] != "websocket.receive":  # websocket.disconnect: the client left
            await self._left()
        data: bytes | str | None = message.get("bytes")
        if data is None:
            data = message.get("text") or ""
        size = len(data.encode("utf-8", "replace") if isinstance(data, str) else data)
        if size > self._max_message_bytes:
            log.info("session.message_too_large limit_bytes=%d", self._max_message_bytes)
            raise PayloadTooLarge(
                f"a WebSocket message must be at most {self._max_message_bytes} bytes "
                "(STT_MAX_MESSAGE_BYTES); send audio in smaller frames")
        return data

    async def send(self, text: str) -> bool:
        try:
            await self._send({"type": "websocket.send", "bytes": None, "text": text})
        except UnexpectedMessageError:
            # The client's close frame came in first: it is gone, and nothing can be delivered
            # now (its disconnect cancels the session at the session's next read).
            log.debug("session.send_after_client_close")
            return False
        return True

    async def close(self, code: int, reason: str) -> None:
        try:
            await self._send({"type": "websocket.close", "code": code, "reason": reason})
        except UnexpectedMessageError:
            log.debug("session.close_after_client_close")

    async def finish(self) -> None:
        """After the session closed the connection: read (and drop) what the client still
        sends until its close reply, for at most `_FINISH_TIMEOUT_S`.

        hypercorn hands the app at most 10 messages at a time and reads nothing from the socket
        while they wait, so a client that sent more after the server's close frame (a
        microphone task still running; any real-time stream when a drain closes it) would
        never have its close reply read: the connection stayed open, and the client hung in
        its closing handshake.
        """
        if self._gone.cancel_called:
            return  # hypercorn said the client left: nothing more will come
        with trio.move_on_after(_FINISH_TIMEOUT_S):
            while (await self._receive())["type"] != "websocket.disconnect":
                pass

    async def _left(self) -> NoReturn:
        self._gone.cancel()
        await trio.sleep_forever()  # cancelled at once: `gone` encloses this task
