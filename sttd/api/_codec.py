"""The shape every wire protocol takes: one codec object per connection, sans I/O."""

from __future__ import annotations

from typing import Protocol

from werkzeug.datastructures import MultiDict

from sttd.api._events import ClientCommand, Configure, SessionEvent, SessionRequest
from sttd.settings import Settings

__all__ = ["Codec"]


class Codec(Protocol):
    """One connection's wire protocol: the query, client messages in, session events out.

    The nursery feeds it everything and does all the I/O; a codec keeps only what its protocol
    needs between messages (the options its query set, what a closing summary reports).
    """

    def accept(self, query: MultiDict[str, str], settings: Settings) -> SessionRequest:
        """Validate the connection's query (without ``token``); raises `InvalidParam`."""
        ...

    def decode(self, message: bytes | str, received_at: float) -> ClientCommand:
        """The command a client message carries; raises `InvalidMessage` for one it refuses.

        `received_at` is the trio clock time the message arrived.
        """
        ...

    def withdraw(self, command: Configure) -> None:
        """Forget `command`, the last one `decode` returned, which the session refused (the
        engine cannot serve its options): the connection goes on as if it never came."""
        ...

    def encode(self, event: SessionEvent) -> list[str]:
        """The text messages that say `event` to the client: none, one, or more.

        For `Close`, what goes out before the close frame.
        """
        ...
