"""A connection's nursery: the trio tasks that move one session's data, and its one close path.

Nothing here keeps protocol or transcript state. The connection's codec (`sttd.api`) turns wire
messages into commands and events into wire messages; the `SessionCore` (`sttd.session`)
decides what to decode and what to say; the tasks below only carry data between them, the
connection and the engine.

Lifetime. `serve_connection` admits the connection or refuses it, then `Session.run` opens one
nursery of four tasks linked by bounded channels (`sttd.channels`):

* ``_recv`` reads the connection. Each message goes through the codec; audio is converted to
  16 kHz mono by the one audio converter (in a worker thread when it resamples)
  and queued as the `LagPolicy` says (queued, or the client held back); commits and the
  end go in band. A frame that comes while ``_infer`` waits on an empty channel, ``_recv``
  feeds to the core itself (`Session._feed_here`), and queues only what the core released,
  or that a partial is due, if anything: most frames then cost no hand-off. It owns the
  audio channel's send end and a clone of the output channel's (for errors about the
  client's own messages and dropped-frame warnings). Its cancel scope
  carries the idle and session time limits, and a drain cancels it; then, or on the client's
  end, an overload or an oversized message, it queues the matching `End` or `Stop` and closes
  its end, so ``_infer`` sees the item, then `EndOfChannel`.
* ``_infer`` owns the audio channel's receive end and the output channel's send end. It feeds
  each round of items to the core and starts each final the core asks for as a task of its own
  (at most `_MAX_FINALS_IN_FLIGHT`), so the VAD keeps up with the audio however slow the engine
  is: a slow decode delays its final, never the listening. It offers the newest partial to
  ``_partials`` through a `LatestSlot`, withdrawing a partial still waiting in the engine that a
  newer one or a final made stale. After the end it waits for its finals, then closes its end.
  Whichever task the core hands events to puts them in one outbox, in the core's order
  (`_emit`), so finals reach the client in utterance order.
* ``_partials`` decodes partials beside ``_infer``, so a final never queues behind its own
  session's partial.
* ``_send`` owns the output channel's receive end: it encodes each event, writes it within
  STT_SEND_TIMEOUT_S, and counts what reached the client. At `Close` it closes the connection
  through `_close` and cancels the nursery, which ends the others.

One close path: a refusal, the session's own end, a client too slow to read and a server bug
all close through `_close` (the events before the close, the codec's closing messages, the close
frame, all within a bounded time). A client that goes away cancels the whole nursery from
outside (its transport cancels the scope the session runs in, `sttd.admission.AsgiTransport`),
so no task outlives the connection.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import secrets
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Protocol, TypeVar

import attrs
import numpy as np
import numpy.typing as npt
import trio

from sttd.api import (
    Clear,
    Close,
    Codec,
    Commit,
    Configure,
    End,
    Error,
    Final,
    KeepAlive,
    Partial,
    Ready,
    SessionEvent,
    SessionRequest,
    Warning,
)
from sttd.audio import SAMPLE_RATE_HZ, StreamConverter
from sttd.backends import Request, Result
from sttd.channels import (
    DROP_REPORT_EVERY,
    AudioChannelStatistics,
    AudioReceiver,
    AudioSender,
    ChannelItem,
    LagAction,
    LagPolicy,
    LatestSlot,
    OutputReceiver,
    OutputSender,
    OutputStatistics,
    Released,
    open_audio_channel,
    open_output_channel,
)
from sttd.errors import BackendError, ClientError, InvalidMessage, PayloadTooLarge
from sttd.metrics import Metrics, SessionOutcome
from sttd.session import AudioFrame, Decode, SessionCore, Stop
from sttd.settings import Settings
from sttd.vad import VadSteps, run_steps

__all__ = ["Admission", "Session", "SessionStatistics", "Transcriber", "Transport", "VadDriver",
           "count_refusal", "refuse", "serve_connection"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

# Upper bound on each cleanup step (last messages, close frame) once the session is ending.
_CLOSE_TIMEOUT_S = 5.0
# How long a draining session still takes audio: what its client sent before the drain and
# is still on its way (see `Session.drain`), seconds.
_DRAIN_TAIL_S = 0.5
_MAX_CLOSE_REASON_CHARS = 120  # a close frame's reason must fit in 123 bytes
# Finals of one session decoding at once. Each holds its utterance's audio (at most
# STT_MAX_UTTERANCE_S); past this many the session stops reading until one is done, and its input
# queue (STT_IN_QUEUE_SIZE) is all that is left before frames drop: the session's memory bound.
_MAX_FINALS_IN_FLIGHT = 8
# How late an idle client may be closed past its idle timeout, seconds: the receive loop moves
# its deadline once this much of it has gone by, not at every message (a deadline change
# reorders trio's timer heap: about 1.5 us, a message's most common cost after the audio's).
_IDLE_SLACK_S = 1.0
# Seconds of audio a session counts in `sttd_audio_received_seconds_total` at a time.
_RECEIVED_COUNT_EVERY_S = 1.0


class Transport(Protocol):
    """The accepted WebSocket, as a session sees it."""

    async def receive(self) -> bytes | str:
        """The next message.

        Raises a `ClientError` for a message the session must refuse (one over the size limit):
        the session sends its finals, that error, and closes with the error's close code.
        """
        ...

    async def send(self, text: str) -> bool:
        """Send `text`; False when the client's close frame came first (it was not delivered)."""
        ...

    async def close(self, code: int, reason: str) -> None: ...


class VadDriver(Protocol):
    """Runs a core's VAD steps, scoring the net calls they suspend at."""

    async def drive(self, steps: VadSteps[_T], *, shielded: bool = False) -> _T:
        """Run `steps` to their end; `shielded`: no cancellation stops them halfway (it takes
        effect at the caller's next checkpoint after)."""
        ...


class _AtOnce:
    """Scores each net call at once, on the event loop (`sttd.vad.run_steps`): for sessions
    without a shared batcher (tests, the energy VAD, which never calls a net)."""

    async def drive(self, steps: VadSteps[_T], *, shielded: bool = False) -> _T:
        return run_steps(steps)  # never waits


class Transcriber(Protocol):
    """What a session needs from the engine."""

    @property
    def backend_name(self) -> str: ...

    def live_stream(self) -> AbstractContextManager[None]:
        """Count a live stream while the block runs."""
        ...

    def check_language(self, language: str | None) -> None:
        """Raise `UnsupportedLanguage` if the backend cannot transcribe `language`."""
        ...

    def check_hotwords(self, hotwords: Sequence[str]) -> None:
        """Raise `Unsupported` if the backend cannot take `hotwords`."""
        ...

    def overloaded(self) -> bool:
        """Whether finals wait too long in the engine's queue."""
        ...

    async def transcribe(self, request: Request, *, started: trio.Event | None = None) -> Result:
        """Transcribe `request`; `started` is set when its batch starts.

        Raises `BackendError` if the backend failed on it. Cancelling withdraws it if it has
        not started.
        """
        ...


@attrs.frozen
class Admission:
    """A connection the server took: the session to run and where it runs."""

    request: SessionRequest
    core: SessionCore
    engine: Transcriber
    # Registers the running session (for drain and /health) while the block runs.
    register: Callable[[Session], AbstractContextManager[None]]
    # What admitting it took (its place among the engine's live streams, counted from the
    # moment it was admitted, so that connections admitted together see each other); the
    # connection closes it when it ends, whether or not its session ran.
    hold: contextlib.ExitStack = attrs.field(factory=contextlib.ExitStack)
    # Who scores the VAD net's calls (the server's shared `VadBatcher`).
    vad: VadDriver = attrs.field(factory=_AtOnce)


@attrs.frozen
class SessionStatistics:
    """A snapshot of one session's queues."""

    audio: AudioChannelStatistics
    output: OutputStatistics


async def serve_connection(transport: Transport, codec: Codec, admitted: Admission | ClientError,
                           *, settings: Settings, metrics: Metrics) -> None:
    """Run an admitted connection's session to its close, or refuse it (then close).

    A `ClientError` refuses the connection with that error and its close code. Closes the
    admission's `hold`.
    """
    if isinstance(admitted, ClientError):
        await refuse(transport, codec, admitted, metrics)
        return
    with admitted.hold:
        session = Session(admitted, settings, metrics)
        with admitted.register(session):
            await session.run(transport, codec)


async def refuse(transport: Transport, codec: Codec, error: ClientError, metrics: Metrics) -> None:
    """Refuse an accepted connection: the error in its protocol, then its close code."""
    count_refusal(error, metrics)
    await _close(transport, codec, Close(error.ws_close_code, error.code), metrics,
                 before=[Error(error.code, str(error))])


def count_refusal(error: ClientError, metrics: Metrics) -> None:
    """Count a connection refused before its session (however it is told)."""
    metrics.sessions_total.labels("rejected").inc()
    log.info("session.rejected code=%s", error.code)


@attrs.define(eq=False)
class Session:
    """One admitted client's stream, from ready to close."""

    admission: Admission
    settings: Settings
    metrics: Metrics
    session_id: str = attrs.field(factory=lambda: secrets.token_hex(6))
    _audio: AudioSender | None = attrs.field(init=False, default=None)
    _output: OutputSender | None = attrs.field(init=False, default=None)
    _partial_in_flight: tuple[trio.CancelScope, trio.Event] | None = attrs.field(
        init=False, default=None)
    # The speculative final being decoded, with its scope and its batch's start.
    _speculation_in_flight: tuple[Decode, trio.CancelScope, trio.Event] | None = attrs.field(
        init=False, default=None)
    # The receive loop's scope: cancelling it ends the session's input (drain).
    _recv_scope: trio.CancelScope | None = attrs.field(init=False, default=None)
    _draining: bool = attrs.field(init=False, default=False)
    _drain_until: float = attrs.field(init=False, default=math.inf)  # trio clock
    _outcome: SessionOutcome | None = attrs.field(init=False, default=None)  # set here
    # Events the core released, in its order, not yet in the output channel (see `_emit`).
    _outbox: collections.deque[SessionEvent] = attrs.field(init=False, factory=collections.deque)
    _draining_outbox: bool = attrs.field(init=False, default=False)
    # The core's speculative finals used and dropped that the metrics have counted so far.
    _speculations_counted: tuple[int, int] = attrs.field(init=False, default=(0, 0))

    @property
    def outcome(self) -> SessionOutcome:
        """How the session ended (or ``client_gone`` while it has not): a metrics label."""
        return self._outcome or self.admission.core.outcome

    @property
    def backlog_s(self) -> float:
        """Audio received but not yet processed (queued while the session waits on the engine)."""
        return 0.0 if self._audio is None else self._audio.samples_buffered / SAMPLE_RATE_HZ

    def drain(self) -> None:
        """Stop taking audio, finalize the open utterance, send its final, close 1001.

        What the client sent before the drain may still be on its way (in the socket's buffer,
        in the serving stack's queue), and is part of that utterance: the receive loop takes
        audio for `_DRAIN_TAIL_S` more, then stops. (Stopping at once cut the last 0.2-0.4 s of
        what real-time clients had sent, and words with it.)
        """
        self._draining = True
        self._drain_until = trio.current_time() + _DRAIN_TAIL_S
        if self._recv_scope is not None:
            self._recv_scope.deadline = min(self._recv_scope.deadline, self._drain_until)

    def statistics(self) -> SessionStatistics | None:
        """Queue statistics, or None before the session's channels exist."""
        if self._audio is None or self._output is None:
            return None
        return SessionStatistics(self._audio.statistics(), self._output.statistics())

    async def run(self, transport: Transport, codec: Codec) -> None:
        """Serve the session until it closes or is cancelled; closes `transport` when it can."""
        request = self.admission.request
        send_audio, recv_audio = open_audio_channel(self.settings.in_queue_size)
        send_out, recv_out = open_output_channel(self.settings.out_queue_size)
        self._audio, self._output = send_audio, send_out
        log.info("session.opened sid=%s call_id=%s", self.session_id, _log_value(request.call_id))
        self.metrics.sessions_active.inc()
        ready = Ready(self.session_id, request.call_id, self.admission.engine.backend_name,
                      request.audio_format.sample_rate_hz)
        try:
            if await self._send_within_timeout(transport, codec, ready) is None:
                return
            slot: LatestSlot[Decode] = LatestSlot()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._recv, transport, codec, send_audio, send_out.clone())
                nursery.start_soon(self._partials, slot, send_out.clone())
                nursery.start_soon(self._infer, recv_audio, send_out, slot)
                nursery.start_soon(self._send, transport, codec, recv_out, nursery.cancel_scope)
        except* Exception:
            self._outcome = "internal_error"
            log.error("session.failed sid=%s", self.session_id, exc_info=True)
            await _close(transport, codec, Close(1011, "internal error"), self.metrics,
                         before=[Error("internal", "the server failed on this session; see "
                                                   "its logs")])
        finally:
            self.metrics.sessions_active.dec()
            self.metrics.sessions_total.labels(self.outcome).inc()
            self._count_speculations()
            log.info("session.closed sid=%s outcome=%s dropped_frames=%d", self.session_id,
                     self.outcome, send_audio.statistics().dropped_frames)

    # -- _recv ------------------------------------------------------------------------------

    async def _recv(self, transport: Transport, codec: Codec, send_audio: AudioSender,
                    send_errors: OutputSender) -> None:
        settings = self.settings
        converter = StreamConverter.for_format(self.admission.request.audio_format)
        policy = LagPolicy(settings.max_lag_s)
        async with send_errors, send_audio:
            started = trio.current_time()
            ends_at = started + settings.max_session_s
            received = 0  # samples
            uncounted = 0  # samples not yet in audio_received_seconds_total
            received_metric = self.metrics.audio_received_seconds_total
            drops_reported = 0
            idle_s = self._idle_timeout_s
            idle_at = started + idle_s  # the idle part of the scope's deadline
            core = self.admission.core
            try:
                with trio.CancelScope(
                        deadline=min(ends_at, idle_at, self._drain_until)) as scope:
                    self._recv_scope = scope
                    while True:
                        try:
                            message = await transport.receive()
                        except ClientError as exc:  # e.g. a message over the size limit
                            if (isinstance(exc, PayloadTooLarge)
                                    and not self.admission.request.oversized_message_closes):
                                # An event protocol: that event is refused, the session goes on.
                                idle_at = trio.current_time() + idle_s
                                scope.deadline = min(ends_at, idle_at, self._drain_until)
                                await send_errors.send(Error(exc.code, str(exc)))
                                continue
                            # Finals for what was heard, then this error, then its close code.
                            await self._flush(converter, send_audio)
                            send_audio.send_nowait(Stop(trio.current_time(), exc.ws_close_code,
                                                        str(exc), "refused", exc.code))
                            return
                        now = trio.current_time()
                        if now + idle_s > idle_at:
                            # Late by at most _IDLE_SLACK_S, never early; moved once a second.
                            idle_at = now + idle_s + min(_IDLE_SLACK_S, idle_s)
                            scope.deadline = min(ends_at, idle_at, self._drain_until)
                        try:
                            command = codec.decode(message, now)
                        except InvalidMessage as exc:
                            refused = message if isinstance(message, str) else None
                            await send_errors.send(Error(exc.code, str(exc), refused=refused,
                                                         param=getattr(exc, "param", None)))
                            continue
                        if isinstance(command, KeepAlive):
                            continue
                        if isinstance(command, Configure):
                            try:
                                self.admission.engine.check_language(command.options.language)
                                self.admission.engine.check_hotwords(command.options.hotwords)
                            except ClientError as exc:
                                codec.withdraw(command)  # as if the update never came
                                refused = message if isinstance(message, str) else None
                                await send_errors.send(Error(
                                    exc.code, str(exc), refused=refused,
                                    param=getattr(exc, "param", None) or "language"))
                                continue
                        if isinstance(command, (Clear, Configure)):
                            send_audio.send_nowait(command)  # in band: after the audio before it
                            continue
                        if isinstance(command, (Commit, End)):
                            if isinstance(command, End):
                                await self._flush(converter, send_audio)
                            send_audio.send_nowait(command)
                            if isinstance(command, End):
                                return
                            continue
                        if (command.audio_format is not None
                                and command.audio_format != converter.format):
                            # The client changed its format (a Realtime session.update): what the
                            # old converter holds back goes first, then the new one takes over.
                            await self._flush(converter, send_audio)
                            converter = StreamConverter.for_format(command.audio_format)
                        if converter.resamples:
                            # Real CPU work: off the event loop (one call at a time per stream). A
                            # copy or a downmix costs less than the thread hop, so those stay here.
                            samples = await trio.to_thread.run_sync(converter.convert_pcm16,
                                                                    command.data)
                        else:
                            samples = converter.convert_pcm16(command.data)
                        if samples.size == 0:
                            continue
                        received += samples.size
                        uncounted += samples.size
                        if uncounted >= _RECEIVED_COUNT_EVERY_S * SAMPLE_RATE_HZ:
                            received_metric.inc(uncounted / SAMPLE_RATE_HZ)
                            uncounted = 0
                        frame = AudioFrame(samples, now)
                        if send_audio.receiver_waiting and not core.ending:
                            # Nothing is queued: no backlog for the lag policy to weigh.
                            await self._feed_here(frame, send_audio)
                            continue
                        action = policy.decide(
                            backlog_samples=send_audio.samples_buffered, full=send_audio.full,
                            received_samples=received, elapsed_s=now - started)
                        if action is LagAction.HOLD:
                            # Ahead of real time (a file sent fast): hold the client back.
                            scope.deadline = self._drain_until  # inf but in a drain
                            await send_audio.wait_for_room(policy.hold_above_samples // 2)
                            idle_at = trio.current_time() + idle_s
                            scope.deadline = min(ends_at, idle_at, self._drain_until)
                            if send_audio.receiver_waiting and not core.ending:
                                await self._feed_here(frame, send_audio)
                                continue
                        lost = send_audio.dropped_samples
                        if send_audio.send_nowait(frame):
                            self.metrics.frames_dropped_total.inc()
                            self.metrics.audio_skipped_seconds_total.inc(
                                (send_audio.dropped_samples - lost) / SAMPLE_RATE_HZ)
                            total = send_audio.statistics().dropped_frames
                            if not drops_reported or total - drops_reported >= DROP_REPORT_EVERY:
                                drops_reported = total
                                await send_errors.send(Warning(
                                    "lagging", f"the session's input queue is full: {total} audio "
                                               "frames dropped so far", frames_dropped=total))
                            if total > settings.in_queue_max_drops:
                                await self._flush(converter, send_audio)
                                send_audio.send_nowait(self._overloaded(total))
                                return
                # The scope ended the loop: a drain, the session's time limit, or an idle client.
                await self._flush(converter, send_audio)
                send_audio.send_nowait(self._input_ended(ends_at))
            finally:
                if uncounted:  # what the last second held
                    received_metric.inc(uncounted / SAMPLE_RATE_HZ)

    async def _feed_here(self, frame: AudioFrame, send_audio: AudioSender) -> None:
        """Feed `frame` to the core here, while the infer task waits on an empty channel; hand
        the infer task what the core released, or the round that must follow, if anything.

        Most frames release nothing and ask for no decode. Handing each to the infer task was
        a channel wake-up and a task switch a frame: about 16 us of sttd's 40 us a 20 ms frame
        of a silent line (`benchmarks/session_cost.py`). Nothing is reordered: the infer task
        has fed the core every earlier item, and it is parked until this task sends it more.
        What it would have done after the frame, it still does, on `Released`: send the events,
        start the decodes, withdraw a speculation that speech made stale, take a partial or a
        speculation that is due. The feed is shielded: a drain or the idle limit cancelling the
        receive loop must not stop the core halfway through a frame (its only wait is the shared
        VAD batcher, which always answers).
        """
        core = self.admission.core
        self.metrics.frame_lag_seconds.observe(0.0)
        dropped = core.speculations_dropped
        # Shielded without a cancel scope, which cost about as much as the hand-off saved.
        outputs = await self.admission.vad.drive(core.feed_steps(frame), shielded=True)
        if outputs or core.decode_due() or core.speculations_dropped != dropped:
            send_audio.send_nowait(Released(tuple(outputs)))

    async def _flush(self, converter: StreamConverter, send_audio: AudioSender) -> None:
        """Queue the converter's held-back tail (the resampler's delay), as the stream ends."""
        if not converter.resamples:
            return  # only the resampler holds anything back
        tail = await trio.to_thread.run_sync(lambda: converter.convert_pcm16(b"", last=True))
        if tail.size:
            send_audio.send_nowait(AudioFrame(tail, trio.current_time()))

    def _input_ended(self, ends_at: float) -> Stop:
        now = trio.current_time()
        if self._draining:
            return Stop(now, 1001, "server shutting down", "drained")
        if now >= ends_at:
            return Stop(now, 1000, f"the session reached STT_MAX_SESSION_S="
                                   f"{self.settings.max_session_s:g} s; open a new one to go on",
                        "session_limit", "session_too_long")
        request = self.admission.request
        return Stop(now, 1000, f"no audio or message for {request.idle_setting}="
                               f"{self._idle_timeout_s:g} s", "idle", "idle_timeout")

    @property
    def _idle_timeout_s(self) -> float:
        """How long the client may send nothing (its protocol's, or STT_IDLE_TIMEOUT_S)."""
        own = self.admission.request.idle_timeout_s
        return self.settings.idle_timeout_s if own is None else own

    def _overloaded(self, dropped_frames: int) -> Stop:
        return Stop(trio.current_time(), 1013,
                    f"session dropped {dropped_frames} audio frames, more than "
                    f"STT_IN_QUEUE_MAX_DROPS={self.settings.in_queue_max_drops}; "
                    "the server cannot keep up with this stream", "overloaded", "overloaded")

    # -- _infer and _partials ---------------------------------------------------------------

    async def _infer(self, recv_audio: AudioReceiver, send_out: OutputSender,
                     slot: LatestSlot[Decode]) -> None:
        core = self.admission.core
        policy = LagPolicy(self.settings.max_lag_s)
        # Finals decode beside the VAD, so a slow engine delays them but never stops the
        # session listening; a session waits here only with this many already in flight.
        room = trio.Semaphore(_MAX_FINALS_IN_FLIGHT)
        with slot:
            async with send_out, recv_audio, trio.open_nursery() as finals:
                while not core.ending:
                    items, backlog = await _receive_round(recv_audio)
                    # How far behind the stream this round starts: past STT_MAX_LAG_S, no partial.
                    lagging = policy.lagging(backlog)
                    for item in items:
                        if isinstance(item, AudioFrame):
                            self.metrics.frame_lag_seconds.observe(
                                trio.current_time() - item.received_at)
                        outputs = (list(item.outputs) if isinstance(item, Released) else
                                   await self.admission.vad.drive(core.feed_steps(item)))
                        # What the core released now goes out before any decode it asked for
                        # can release more (the events come first in its order).
                        await self._emit(send_out, [out for out in outputs
                                                    if not isinstance(out, Decode)])
                        for output in outputs:
                            if isinstance(output, Decode):
                                self._withdraw_partial()  # its final makes it stale
                                await room.acquire()
                                finals.start_soon(self._final, output, send_out, room)
                    self._withdraw_speculation()  # if the round made it stale
                    # A speculation is optional work: never worth a wait that would stop the
                    # session listening, nor a place among real finals when the engine is behind.
                    speculation = (core.take_speculative()
                                   if room.value and core.utterance_open
                                   and not self.admission.engine.overloaded() else None)
                    if speculation is not None:
                        room.acquire_nowait()
                        finals.start_soon(self._speculate, speculation, send_out, room)
                    self._count_speculations()
                    partial = core.take_partial()
                    if partial is not None and not lagging:
                        # The partial task decodes it; a newer one replaces an older still queued.
                        slot.put(partial)
                        self._withdraw_partial()
                # The session is ending: the nursery waits for the finals in flight, the last of
                # which releases the Close (a speculation the end made stale is withdrawn).
                self._withdraw_speculation()

    def _count_speculations(self) -> None:
        """Count the speculative finals the core used or dropped since the last call."""
        core = self.admission.core
        used, dropped = self._speculations_counted
        if (core.speculations_used, core.speculations_dropped) == (used, dropped):
            return
        self.metrics.speculative_finals_total.labels("used").inc(core.speculations_used - used)
        self.metrics.speculative_finals_total.labels("dropped").inc(
            core.speculations_dropped - dropped)
        self._speculations_counted = (core.speculations_used, core.speculations_dropped)

    async def _final(self, decode: Decode, send_out: OutputSender, room: trio.Semaphore
                     ) -> None:
        try:
            await self._emit(send_out, await self._decode(decode))
        finally:
            room.release()

    async def _speculate(self, decode: Decode, send_out: OutputSender, room: trio.Semaphore
                         ) -> None:
        """Decode a speculative final; withdrawn (`_withdraw_speculation`) while it waits in
        the engine if the core drops it."""
        started = trio.Event()
        events: list[SessionEvent] = []
        try:
            with trio.CancelScope() as scope:
                self._speculation_in_flight = (decode, scope, started)
                events = await self._decode(decode, started=started)
        finally:
            if self._speculation_in_flight is not None and self._speculation_in_flight[0] is decode:
                self._speculation_in_flight = None
            room.release()
        await self._emit(send_out, events)

    def _withdraw_speculation(self) -> None:
        """Cancel the speculative final waiting in the engine if the core dropped it."""
        if self._speculation_in_flight is None:
            return
        decode, scope, started = self._speculation_in_flight
        if not started.is_set() and self.admission.core.stale(decode):
            scope.cancel()

    async def _partials(self, slot: LatestSlot[Decode], send_out: OutputSender) -> None:
        """Decode the newest partial, one at a time, beside the infer task."""
        async with send_out:
            while True:
                try:
                    decode = await slot.take()
                except trio.EndOfChannel:
                    return
                if self.admission.core.stale(decode):
                    continue  # its utterance ended while it waited in the slot
                started = trio.Event()
                events: list[SessionEvent] = []
                with trio.CancelScope() as scope:
                    self._partial_in_flight = (scope, started)
                    events = await self._decode(decode, started=started)
                self._partial_in_flight = None
                await self._emit(send_out, events)

    def _withdraw_partial(self) -> None:
        """Cancel the partial being waited for, unless its batch already started."""
        if self._partial_in_flight is not None:
            scope, started = self._partial_in_flight
            if not started.is_set():
                scope.cancel()

    async def _decode(self, decode: Decode, *, started: trio.Event | None = None
                      ) -> list[SessionEvent]:
        """Run `decode` through the engine; the events the core has for its outcome.

        The core's answer must go to `_emit` before anything awaits, so that events reach the
        outbox in the order the core released them.
        """
        core = self.admission.core
        try:
            result = await self.admission.engine.transcribe(decode.request, started=started)
        except BackendError as exc:
            if decode.kind == "partial":  # not the client's concern: its final answers for it
                self.metrics.partials_failed_total.labels(exc.code).inc()
                log.info("session.%s sid=%s kind=partial error=%s", exc.code, self.session_id,
                         exc)
            else:
                log.warning("session.%s sid=%s kind=%s", exc.code, self.session_id,
                            decode.kind, exc_info=True)
            return core.failed(decode, exc)
        return core.decoded(decode, result, backlog_ms=round(self.backlog_s * 1000))

    async def _emit(self, send_out: OutputSender, events: list[SessionEvent]) -> None:
        """Queue `events` for the client, after every event the core released before them.

        Several tasks take events from the core (the infer task, each final, the partials), and
        a send can wait (a full output queue). So events go to one outbox in the order the core
        gave them, and whichever task finds no one draining it drains it, all of it: no event
        overtakes another, and nothing waits on a lock when there is nothing to send.
        """
        self._outbox.extend(events)
        if self._draining_outbox or not self._outbox:
            return
        self._draining_outbox = True
        try:
            while self._outbox:
                if not await send_out.send(self._outbox.popleft()):
                    self.metrics.partials_dropped_total.inc()
        finally:
            self._draining_outbox = False

    # -- _send ------------------------------------------------------------------------------

    async def _send(self, transport: Transport, codec: Codec, recv_out: OutputReceiver,
                    scope: trio.CancelScope) -> None:
        async with recv_out:
            async for event in recv_out:
                if isinstance(event, Close):
                    await _close(transport, codec, event, self.metrics)
                    scope.cancel()
                    return
                if await self._send_within_timeout(transport, codec, event) is None:
                    scope.cancel()
                    return

    async def _send_within_timeout(self, transport: Transport, codec: Codec,
                                   event: SessionEvent) -> bool | None:
        """Send `event` within STT_SEND_TIMEOUT_S: whether it reached the client, or None if
        the client stopped reading (the connection is then closed)."""
        with trio.move_on_after(self.settings.send_timeout_s) as stalled:
            return await _write(transport, codec, event, self.metrics)
        # Its sends would hold the session (and its memory) for as long as the socket lives.
        self._outcome = "slow_client"
        log.info("session.slow_client sid=%s send_timeout_s=%g", self.session_id,
                 self.settings.send_timeout_s)
        await _close(transport, codec, Close(1008, "client not reading"), self.metrics)
        assert stalled.cancelled_caught
        return None


async def _receive_round(recv_audio: AudioReceiver) -> tuple[list[ChannelItem], int]:
    """What the audio channel holds: wait for one item, then take all that are there.

    Also gives the backlog the round starts with: the samples queued behind its first item.
    """
    try:
        items = [await recv_audio.receive()]
    except trio.EndOfChannel:
        # _recv always ends its input with End or Stop; this is the same, should it not.
        return [End(trio.current_time())], 0
    backlog = recv_audio.samples_buffered
    while True:
        try:
            items.append(recv_audio.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            return items, backlog


async def _close(transport: Transport, codec: Codec, close: Close, metrics: Metrics, *,
                 before: list[SessionEvent] | tuple[()] = ()) -> None:
    """The one way a connection closes: `before`, the codec's closing messages, the close frame.

    Each step is bounded and shielded: a client that stopped reading cannot hold it.
    """
    with trio.move_on_after(_CLOSE_TIMEOUT_S, shield=True):
        for event in [*before, close]:
            await _write(transport, codec, event, metrics)
    with trio.move_on_after(_CLOSE_TIMEOUT_S, shield=True):
        await transport.close(close.code, close.reason[:_MAX_CLOSE_REASON_CHARS])


async def _write(transport: Transport, codec: Codec, event: SessionEvent,
                 metrics: Metrics) -> bool:
    """Send `event` as its protocol says and count it; False if the client had gone first.

    Errors and warnings count as reported whether or not the client took them (an operator
    wants every refusal counted, and a warning the protocol has no message for, such as a
    lagging warning on Deepgram's, still happened); partials and finals count only once sent.
    """
    delivered = True
    for text in codec.encode(event):
        delivered = await transport.send(text) and delivered
    if isinstance(event, Error):
        metrics.errors_total.labels(event.code).inc()
    elif isinstance(event, Warning):
        metrics.warnings_total.labels(event.code).inc()
    elif delivered:
        _count_sent(metrics, event)
    return delivered


def _count_sent(metrics: Metrics, event: SessionEvent) -> None:
    """Count a transcript that reached the client."""
    if isinstance(event, Final):
        metrics.finals_sent_total.inc()
        if event.ended_at is not None:
            metrics.final_latency_seconds.observe(max(trio.current_time() - event.ended_at, 0.0))
    elif isinstance(event, Partial):
        metrics.partials_sent_total.inc()


def _log_value(value: str) -> str:
    """`value` made safe for a key=value log line."""
    cleaned = "".join(ch if ch.isprintable() and not ch.isspace() and ch != "=" else "_"
                      for ch in value[:64])
    return cleaned or "-"
