"""The accepted WebSocket as a session sees it (`sttd.nursery.Transport`), within its limits."""

from __future__ import annotations

import logging
from typing import Any

from hypercorn.utils import UnexpectedMessageError

from sttd.errors import PayloadTooLarge

__all__ = ["QuartTransport"]

log = logging.getLogger(__name__)


class QuartTransport:
    """Adapts quart's websocket object to the session's `Transport`, within a message limit.

    A message over `max_message_bytes` raises `PayloadTooLarge` from `receive`: the session then
    sends the finals of what it heard, the ``payload_too_large`` error and closes 1009.
    (`sttd.server` makes hypercorn hand such a message over cut to one byte past the limit,
    instead of closing the socket behind the session.)
    """

    def __init__(self, ws: Any, *, max_message_bytes: int) -> None:
        self._ws = ws
        self._max_message_bytes = max_message_bytes

    async def receive(self) -> bytes | str:
        data: bytes | str | None = await self._ws.receive()
        if data is None:  # an empty binary frame
            return b""
        size = len(data.encode("utf-8", "replace") if isinstance(data, str) else data)
        if size > self._max_message_bytes:
            log.info("session.message_too_large limit_bytes=%d", self._max_message_bytes)
            raise PayloadTooLarge(
                f"a WebSocket message must be at most {self._max_message_bytes} bytes "
                "(STT_MAX_MESSAGE_BYTES); send audio in smaller frames")
        return data

    async def send(self, text: str) -> bool:
        try:
            await self._ws.send(text)
        except UnexpectedMessageError:
            # The client's close frame came in first: it is gone, and hypercorn's disconnect
            # event is about to cancel the session. Nothing can be delivered now.
            log.debug("session.send_after_client_close")
            return False
        return True

    async def close(self, code: int, reason: str) -> None:
        try:
            await self._ws.close(code, reason)
        except UnexpectedMessageError:
            log.debug("session.close_after_client_close")
