"""What the routes share: settings, metrics, the engine once loaded, and what is in flight.

`AppState` is built once per server. The sessions live now (`SessionRegistry`) and the uploads
being read or transcribed are counted here, so that /health can report them, a drain can reach
every session, and the server can wait for both to finish.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import attrs
import trio

from sttd.audio import SAMPLE_RATE_HZ
from sttd.engine import Engine, VadBatcher
from sttd.metrics import Metrics, QueueDepths
from sttd.nursery import Session
from sttd.settings import Settings

__all__ = ["AppState", "SessionRegistry"]


@attrs.define
class SessionRegistry:
    """The live sessions of one server, for drain, /health and queue metrics."""

    _live: set[Session] = attrs.field(factory=set)
    _changed: trio.lowlevel.ParkingLot = attrs.field(factory=trio.lowlevel.ParkingLot)
    _draining: bool = False

    def __len__(self) -> int:
        return len(self._live)

    @property
    def draining(self) -> bool:
        return self._draining

    def begin_drain(self) -> None:
        """Tell every live session (and any added later) to finalize and close 1001."""
        self._draining = True
        for session in self._live:
            session.drain()

    @contextlib.contextmanager
    def registered(self, session: Session) -> Iterator[None]:
        """Count `session` as live while the block runs."""
        self._live.add(session)
        if self._draining:
            session.drain()
        self._changed.unpark_all()
        try:
            yield
        finally:
            self._live.discard(session)
            self._changed.unpark_all()

    async def wait_count(self, count: int) -> None:
        """Wait until exactly `count` sessions are live."""
        while len(self._live) != count:
            await self._changed.park()

    def queue_depths(self) -> QueueDepths:
        audio = output = 0
        backlog = 0.0
        for session in self._live:
            stats = session.statistics()
            if stats is not None:
                audio += stats.audio.frames_buffered
                output += stats.output.messages_buffered
                backlog = max(backlog, stats.audio.samples_buffered / SAMPLE_RATE_HZ)
        return QueueDepths(audio_frames=audio, output_messages=output, max_backlog_s=backlog)


@attrs.define
class AppState:
    """What the routes share: settings, metrics, live sessions, uploads, and the engine."""

    settings: Settings
    metrics: Metrics
    sessions: SessionRegistry = attrs.field(factory=SessionRegistry)
    engine: Engine | None = None
    engine_loaded: trio.Event = attrs.field(factory=trio.Event)
    # The Silero VAD's shared batcher, once its model is loaded (None with the energy VAD).
    vad: VadBatcher | None = None
    # Uploads being read or transcribed now, and a lot parked on their count.
    uploads: int = 0
    _uploads_changed: trio.lowlevel.ParkingLot = attrs.field(
        factory=trio.lowlevel.ParkingLot, repr=False)

    @property
    def draining(self) -> bool:
        return self.sessions.draining

    def begin_drain(self) -> None:
        """Refuse new sessions and uploads; tell every live session to finalize and close 1001."""
        self.sessions.begin_drain()

    async def wait_drained(self) -> None:
        """Wait until no session is live and no upload is in flight (call after `begin_drain`)."""
        await self.sessions.wait_count(0)
        await self.wait_uploads(0)

    async def wait_uploads(self, count: int) -> None:
        """Wait until exactly `count` uploads are in flight."""
        while self.uploads != count:
            await self._uploads_changed.park()

    @contextlib.contextmanager
    def upload_in_flight(self) -> Iterator[None]:
        """Count an upload as in flight (for `wait_drained` and STT_MAX_UPLOADS) while the
        block runs."""
        self.uploads += 1
        self._uploads_changed.unpark_all()
        try:
            yield
        finally:
            self.uploads -= 1
            self._uploads_changed.unpark_all()
