"""One WebSocket session: a nursery holding a recv, an infer, a partials and a send task.

Lifetime. `Session.run` opens one nursery with four tasks linked by bounded channels:

* ``_recv`` reads frames from the transport and owns the audio channel's send end (and a clone
  of the output channel, for errors about the client's messages). On ``end`` or an overload it
  queues the marker in band and closes its end, so ``_infer`` sees the marker, then
  `EndOfChannel`.
* ``_infer`` owns the audio channel's receive end and the output channel's send end. It feeds
  audio to the `UtteranceTracker`, runs finals before partials through the shared engine, and
  queues messages. When it stops it queues a `Close` and closes its end.
* ``_partials`` decodes partials beside ``_infer``, so a session's final never queues behind its
  own partial. ``_infer`` offers it the newest partial job through a `LatestSlot` and withdraws
  a queued partial that a newer one (or the utterance's final) made stale; a partial whose
  utterance was finalized meanwhile is dropped. ``_infer`` closes the slot when it stops.
* ``_send`` owns the output channel's receive end: it writes each message and, on `Close`,
  closes the WebSocket and cancels the nursery, which ends the others.

A client that goes away cancels the whole nursery from outside (the web framework cancels the
handler), so no task outlives the connection. An unexpected error in any task is reported to
the client as ``internal`` and closes the socket with 1011.
"""

from __future__ import annotations

import logging
import math
import secrets
from typing import Protocol

import attrs
import trio

from sttd.audio import Pcm16Framer, pcm16_to_float32
from sttd.backends.base import Request
from sttd.channels import (
    AudioChannelStatistics,
    AudioFrame,
    AudioReceiver,
    AudioSender,
    Close,
    Commit,
    End,
    Gap,
    LatestSlot,
    OutputReceiver,
    OutputSender,
    OutputStatistics,
    Overload,
    Transcript,
    open_audio_channel,
    open_output_channel,
)
from sttd.engine import Superseded, Transcriber
from sttd.errors import BackendError, ClientError, InvalidMessage
from sttd.metrics import Metrics, QueueDepths
from sttd.protocol import (
    SessionParams,
    dumps,
    error_message,
    parse_client_message,
    ready_message,
    transcript_message,
    utterance_end_message,
    warning_message,
)
from sttd.settings import Settings
from sttd.stability import PartialStabilizer
from sttd.stream import Job, UtteranceTracker
from sttd.vad import loaded_silero_model, make_endpointer, silero_model

__all__ = ["Session", "SessionRegistry", "Transport"]

log = logging.getLogger(__name__)

_SAMPLE_RATE_HZ = 16000
# Upper bound on cleanup sends (last messages, close frame) once the session is ending.
_CLOSE_TIMEOUT_S = 5.0


class Transport(Protocol):
    """The accepted WebSocket, as a session sees it."""

    async def receive(self) -> bytes | str | None:
        """The next message; None stands for an empty binary frame.

        Raises a `ClientError` for a message the session must refuse (one over the size limit):
        the session sends its finals, that error, and closes with the error's close code.
        """
        ...

    async def send(self, text: str) -> None: ...

    async def close(self, code: int, reason: str = "") -> None: ...


@attrs.frozen
class SessionStatistics:
    """A snapshot of one session's queues."""

    audio: AudioChannelStatistics
    output: OutputStatistics


@attrs.define(eq=False)
class Session:
    """One client's stream, from ready to close."""

    params: SessionParams
    engine: Transcriber
    settings: Settings
    metrics: Metrics
    session_id: str = attrs.field(factory=lambda: secrets.token_hex(6))
    outcome: str = attrs.field(init=False, default="client_gone")
    _audio: tuple[AudioSender, AudioReceiver] | None = attrs.field(init=False, default=None)
    _output: tuple[OutputSender, OutputReceiver] | None = attrs.field(init=False, default=None)
    _last_partial: dict[int, str] = attrs.field(init=False, factory=dict)
    _stabilizer: PartialStabilizer = attrs.field(init=False, factory=PartialStabilizer)
    # Highest utterance id whose final was started; its partials are stale.
    _finalized: int = attrs.field(init=False, default=-1)
    _partial_in_flight: tuple[trio.CancelScope, trio.Event] | None = attrs.field(
        init=False, default=None)
    # The receive loop's scope: cancelling it ends the session's input (drain, limits).
    _recv_scope: trio.CancelScope | None = attrs.field(init=False, default=None)
    _draining: bool = attrs.field(init=False, default=False)
    _drops_reported: int = attrs.field(init=False, default=0)
    # For `params.utterance_end_ms`: the stream time (ms) at which an utterance end is due if no
    # speech comes first, and the end of the last word sent in a final since the last one.
    _utterance_end_at_ms: int | None = attrs.field(init=False, default=None)
    _last_word_end_ms: int | None = attrs.field(init=False, default=None)

    @property
    def backlog_s(self) -> float:
        """Audio received but not yet processed (queued while the session waits on the engine)."""
        if self._audio is None:
            return 0.0
        return self._audio[0].statistics().samples_buffered / _SAMPLE_RATE_HZ

    def drain(self) -> None:
        """Stop taking audio, finalize the open utterance, send its final, close 1001."""
        self._draining = True
        if self._recv_scope is not None:
            self._recv_scope.cancel()

    def statistics(self) -> SessionStatistics | None:
        """Queue statistics, or None before the session's channels exist."""
        if self._audio is None or self._output is None:
            return None
        return SessionStatistics(self._audio[0].statistics(), self._output[0].statistics())

    async def run(self, transport: Transport) -> None:
        """Serve the session until it closes or is cancelled; closes `transport` when it can."""
        self._audio = open_audio_channel(self.settings.in_queue_size)
        self._output = open_output_channel(self.settings.out_queue_size)
        send_audio, recv_audio = self._audio
        send_out, recv_out = self._output
        log.info("session.opened sid=%s call_id=%s", self.session_id, _log_value(self.params.call_id))
        self.metrics.sessions_active.inc()
        try:
            await transport.send(dumps(ready_message(
                self.session_id, self.params, self.engine.backend_name)))
            slot: LatestSlot[Job] = LatestSlot()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._recv, transport, send_audio, send_out.clone())
                nursery.start_soon(self._partials, slot, send_out.clone())
                nursery.start_soon(self._infer, recv_audio, send_out, slot)
                nursery.start_soon(self._send, transport, recv_out, nursery.cancel_scope)
        except* Exception:
            self.outcome = "internal_error"
            log.error("session.failed sid=%s", self.session_id, exc_info=True)
            self.metrics.errors_total.labels("internal").inc()
            with trio.move_on_after(_CLOSE_TIMEOUT_S, shield=True):
                await transport.send(dumps(error_message(
                    "internal", "the server failed on this session; see its logs")))
                await transport.close(1011, "internal error")
        finally:
            self.metrics.sessions_active.dec()
            self.metrics.sessions_total.labels(self.outcome).inc()
            dropped = send_audio.statistics().dropped_frames
            log.info("session.closed sid=%s outcome=%s dropped_frames=%d",
                     self.session_id, self.outcome, dropped)

    async def _recv(
        self, transport: Transport, send_audio: AudioSender, send_errors: OutputSender
    ) -> None:
        framer = Pcm16Framer()
        settings = self.settings
        # Past this backlog, new audio is skipped (as a counted Gap) instead of queued.
        skip_above = int(2 * settings.max_lag_s * _SAMPLE_RATE_HZ)
        async with send_errors, send_audio:
            started = trio.current_time()
            ends_at = started + settings.max_session_s
            received = 0  # samples
            with trio.CancelScope(
                    deadline=min(ends_at, started + settings.idle_timeout_s)) as scope:
                self._recv_scope = scope
                if self._draining:
                    scope.cancel()
                while True:
                    try:
                        data = await transport.receive()
                    except ClientError as exc:  # e.g. a message over the size limit
                        # Finals for what was heard, then this error, then its close code.
                        send_audio.send_nowait(End(trio.current_time(), exc.ws_close_code,
                                                   str(exc), "refused", error_code=exc.code))
                        return
                    now = trio.current_time()
                    scope.deadline = min(ends_at, now + settings.idle_timeout_s)
                    if isinstance(data, str):
                        try:
                            item = parse_client_message(data, now)
                        except InvalidMessage as exc:
                            self.metrics.errors_total.labels(exc.code).inc()
                            await send_errors.send(error_message(exc.code, str(exc)))
                            continue
                        if item is None:
                            continue  # keepalive
                        send_audio.send_nowait(item)
                        if isinstance(item, End):
                            return
                        continue
                    samples = framer.feed(data or b"")
                    if samples.size == 0:
                        continue
                    self.metrics.audio_received_seconds_total.inc(samples.size / _SAMPLE_RATE_HZ)
                    received += samples.size
                    # Per frame, so the channel's counters rather than a statistics snapshot.
                    behind = send_audio.samples_buffered > skip_above
                    if behind or send_audio.full:
                        if received / _SAMPLE_RATE_HZ - (now - started) > settings.max_lag_s:
                            # Ahead of real time (a file sent fast): hold the client back.
                            scope.deadline = math.inf
                            await send_audio.wait_for_room(skip_above // 2)
                            scope.deadline = min(ends_at, trio.current_time()
                                                 + settings.idle_timeout_s)
                        elif behind:
                            # A live stream the server cannot keep up with: skip, say so.
                            send_audio.send_nowait(Gap(samples.size, now))
                            continue
                    dropped = send_audio.send_nowait(AudioFrame(samples, now))
                    if dropped:
                        total = send_audio.statistics().dropped_frames
                        await self._report_drops(dropped, total, send_errors)
                        if total > settings.in_queue_max_drops:
                            send_audio.send_nowait(Overload(total))
                            return
            # The scope ended the loop: a drain, the session's time limit, or an idle client.
            send_audio.send_nowait(self._input_ended(ends_at))

    def _input_ended(self, ends_at: float) -> End:
        now = trio.current_time()
        if self._draining:
            return End(now, 1001, "server shutting down", "drained")
        if now >= ends_at:
            code, outcome = "session_too_long", "session_limit"
            message = (f"the session reached STT_MAX_SESSION_S={self.settings.max_session_s:g} s; "
                       "open a new one to go on")
        else:
            code, outcome = "idle_timeout", "idle"
            message = (f"no audio or keepalive for STT_IDLE_TIMEOUT_S="
                       f"{self.settings.idle_timeout_s:g} s")
        return End(now, 1000, message, outcome, error_code=code)

    async def _report_drops(self, dropped: int, total: int, send_errors: OutputSender) -> None:
        """Count dropped frames; tell the client at the first drop and every 50 after."""
        self.metrics.frames_dropped_total.inc(dropped)
        if self._drops_reported and total - self._drops_reported < 50:
            return
        self._drops_reported = total
        self.metrics.warnings_total.labels("lagging").inc()
        await send_errors.send(warning_message(
            "lagging", f"the session's input queue is full: {total} audio frames dropped so far",
            frames_dropped=total))

    async def _infer(self, recv_audio: AudioReceiver, send_out: OutputSender,
                     slot: LatestSlot[Job]) -> None:
        net = None
        if self.settings.vad == "silero":
            # A stream of the shared model; the model itself loads once, off the event loop.
            model = loaded_silero_model()
            if model is None:
                model = await trio.to_thread.run_sync(silero_model)
            net = model.stream()
        silence_ms = self.params.vad_silence_ms
        endpointer = make_endpointer(
            self.settings.vad, threshold_rms=self.settings.vad_threshold,
            silence_ms=self.settings.vad_silence_ms if silence_ms is None else silence_ms, net=net)
        tracker = UtteranceTracker(
            endpointer,
            partial_ms=self.params.partial_ms,
            max_utterance_s=self.settings.max_utterance_s,
        )
        with slot:
            await self._infer_loop(tracker, recv_audio, send_out, slot)

    async def _infer_loop(self, tracker: UtteranceTracker, recv_audio: AudioReceiver,
                          send_out: OutputSender, slot: LatestSlot[Job]) -> None:
        async with send_out, recv_audio:
            max_lag = int(self.settings.max_lag_s * _SAMPLE_RATE_HZ)
            while True:
                # job, trigger time, forced, cause; None marks where an utterance end is due.
                finals: list[tuple[Job, float, bool, str] | None] = []
                stop: Close | None = None
                error = ""  # sent, with the close reason, after the finals and before the close
                skipped = 0
                try:
                    items = [await recv_audio.receive()]
                except trio.EndOfChannel:
                    items = [End(trio.current_time())]
                # How far behind the stream this round starts: past STT_MAX_LAG_S, no partial.
                lagging = recv_audio.statistics().samples_buffered > max_lag
                while True:
                    try:
                        items.append(recv_audio.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                for item in items:
                    if isinstance(item, AudioFrame):
                        self.metrics.frame_lag_seconds.observe(
                            trio.current_time() - item.received_at)
                        jobs = tracker.feed(item.samples)
                        finals.extend((job, item.received_at, False,
                                       "max_length" if job.cut else "speech_end")
                                      for job in jobs)
                    elif isinstance(item, Commit):
                        jobs = tracker.commit()
                        finals.extend((job, item.received_at, True, "commit") for job in jobs)
                    elif isinstance(item, Gap):
                        jobs = tracker.skip(item.samples)
                        finals.extend((job, item.received_at, False, "skip") for job in jobs)
                        skipped += item.samples
                    elif isinstance(item, End):
                        # Only the client's own `end` answers with a final even when empty.
                        forced = item.outcome == "ended"
                        finals.extend((job, item.received_at, forced, "end")
                                      for job in tracker.commit())
                        stop = Close(item.code, item.reason)
                        self.outcome = item.outcome
                        error = item.error_code
                        break
                    else:
                        finals.extend((job, trio.current_time(), True, "end")
                                      for job in tracker.commit())
                        stop = self._overloaded(item)
                        error = "overloaded"
                        break
                    if self._utterance_end_due(jobs, tracker):
                        finals.append(None)
                if skipped:
                    await self._report_skip(skipped, send_out)
                for entry in finals:
                    if entry is None:
                        await self._send_utterance_end(send_out)
                        continue
                    job, trigger_at, forced, cause = entry
                    # Any partial of this utterance is stale now: withdraw it if still queued.
                    self._finalized = job.utterance_id
                    self._withdraw_partial()
                    await self._decode(job, send_out, trigger_at, forced=forced, cause=cause)
                if stop is not None:
                    if error:
                        self.metrics.errors_total.labels(error).inc()
                        await send_out.send(error_message(error, stop.reason))
                    await send_out.send(stop)
                    return
                partial = tracker.take_partial() if self.params.partials else None
                if partial is not None and not lagging:
                    # The partial task decodes it; a newer one replaces an older still queued.
                    slot.put(partial)
                    self._withdraw_partial()

    async def _partials(self, slot: LatestSlot[Job], send_out: OutputSender) -> None:
        """Decode the newest partial job, one at a time, beside the infer task."""
        async with send_out:
            while True:
                try:
                    job = await slot.take()
                except trio.EndOfChannel:
                    return
                if job.utterance_id <= self._finalized:
                    continue
                started = trio.Event()
                with trio.CancelScope() as scope:
                    self._partial_in_flight = (scope, started)
                    await self._decode(job, send_out, None, forced=False, started=started)
                self._partial_in_flight = None

    def _utterance_end_due(self, jobs: list[Job], tracker: UtteranceTracker) -> bool:
        """Whether `params.utterance_end_ms` of audio without speech just followed a final.

        `jobs` are the finals the last item produced; each re-arms the wait, and speech
        disarms it until the next final.
        """
        wait_ms = self.params.utterance_end_ms
        if wait_ms is None:
            return False
        if jobs:
            self._utterance_end_at_ms = jobs[-1].end_ms + wait_ms
        if self._utterance_end_at_ms is None:
            return False
        if tracker.open_utterance_id is not None:
            self._utterance_end_at_ms = None
            return False
        if tracker.position * 1000 < self._utterance_end_at_ms * _SAMPLE_RATE_HZ:
            return False
        self._utterance_end_at_ms = None
        return True

    async def _send_utterance_end(self, send_out: OutputSender) -> None:
        """Queue ``utterance_end`` for the last word sent, unless no word came since the last."""
        if self._last_word_end_ms is not None:
            await send_out.send(utterance_end_message(self._last_word_end_ms))
            self._last_word_end_ms = None

    def _withdraw_partial(self) -> None:
        """Cancel the partial being waited for, unless its batch already started."""
        if self._partial_in_flight is not None:
            scope, started = self._partial_in_flight
            if not started.is_set():
                scope.cancel()

    async def _report_skip(self, samples: int, send_out: OutputSender) -> None:
        self.metrics.audio_skipped_seconds_total.inc(samples / _SAMPLE_RATE_HZ)
        self.metrics.warnings_total.labels("lagging").inc()
        skipped_ms = samples * 1000 // _SAMPLE_RATE_HZ
        await send_out.send(warning_message(
            "lagging",
            f"the session fell more than {2 * self.settings.max_lag_s:g} s behind "
            f"(2 x STT_MAX_LAG_S): {skipped_ms} ms of audio were skipped; the open utterance "
            "was finalized first and stream times stay those of your stream",
            skipped_ms=skipped_ms))

    def _overloaded(self, item: Overload) -> Close:
        self.outcome = "overloaded"
        return Close(
            1013,
            f"session dropped {item.dropped_frames} audio frames, more than "
            f"STT_IN_QUEUE_MAX_DROPS={self.settings.in_queue_max_drops}; "
            "the server cannot keep up with this stream",
        )

    async def _decode(
        self, job: Job, send_out: OutputSender, trigger_at: float | None, *, forced: bool,
        started: trio.Event | None = None, cause: str = "",
    ) -> None:
        """Transcribe `job` and queue its message.

        Empty partials, repeated partials and empty finals are not sent, except a final the
        client forced (commit or end), which is always answered. A final's `cause` is what
        ended its utterance (`FINAL_CAUSES`), sent when `params.final_causes` asks for it.
        """
        request = Request(
            audio=pcm16_to_float32(job.audio),
            kind=job.kind,
            language=self.params.language,
            hotwords=self.params.hotwords,
            # Partials keep the words already shown as stable; a final is a fresh decode of the
            # whole utterance (forcing the prefix into finals cost ~5 WER points on the dev set).
            prefix=self._stabilizer.stable_text if job.kind == "partial" else "",
        )
        try:
            result = await self.engine.transcribe(request, session=self, started=started)
        except Superseded:
            return
        except BackendError as exc:
            log.warning("session.%s sid=%s kind=%s", exc.code, self.session_id, job.kind,
                        exc_info=True)
            self.metrics.errors_total.labels(exc.code).inc()
            if job.kind == "final":
                self._stabilizer.reset()
            await send_out.send(error_message(
                exc.code,
                f"transcribing utterance {job.utterance_id} failed ({exc}); the session goes on"))
            return
        text = result.text.strip()
        stable = unstable = ""
        if job.kind == "partial" and job.utterance_id <= self._finalized:
            return  # its final was decided while this partial was in flight
        if job.kind == "partial":
            stable, unstable = self._stabilizer.update(text)
            text = f"{stable} {unstable}".strip()
            if not text or self._last_partial.get(job.utterance_id) == text:
                return
            self._last_partial[job.utterance_id] = text
        else:
            self._last_partial.pop(job.utterance_id, None)
            self._stabilizer.reset()
            if not text and not forced:
                return
        payload = transcript_message(job.kind, job.utterance_id, result, job.start_ms, job.end_ms)
        payload["text"] = text
        if job.kind == "final":
            payload["backlog_ms"] = round(self.backlog_s * 1000)
            if self.params.final_causes:
                payload["cause"] = cause
            if text:
                words = payload["words"]
                self._last_word_end_ms = words[-1]["end_ms"] if words else job.end_ms
        if job.kind == "partial":
            payload["stable"] = stable
            payload["unstable"] = unstable
        sent = await send_out.send(Transcript(payload, job.kind == "final", trigger_at))
        if not sent:
            self.metrics.partials_dropped_total.inc()

    async def _send(
        self, transport: Transport, recv_out: OutputReceiver, scope: trio.CancelScope
    ) -> None:
        async with recv_out:
            async for item in recv_out:
                if isinstance(item, Close):
                    with trio.move_on_after(_CLOSE_TIMEOUT_S):
                        await transport.close(item.code, item.reason[:120])
                    scope.cancel()
                    return
                if isinstance(item, Transcript):
                    await transport.send(dumps(item.payload))
                    if item.is_final:
                        self.metrics.finals_sent_total.inc()
                        if item.trigger_at is not None:
                            self.metrics.final_latency_seconds.observe(
                                max(trio.current_time() - item.trigger_at, 0.0))
                    else:
                        self.metrics.partials_sent_total.inc()
                else:
                    await transport.send(dumps(item))


@attrs.define
class SessionRegistry:
    """The live sessions of one server, for /health and queue metrics."""

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

    def add(self, session: Session) -> None:
        self._live.add(session)
        if self._draining:
            session.drain()
        self._changed.unpark_all()

    def discard(self, session: Session) -> None:
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
                backlog = max(backlog, stats.audio.samples_buffered / _SAMPLE_RATE_HZ)
        return QueueDepths(audio_frames=audio, output_messages=output, max_backlog_s=backlog)


def _log_value(value: str) -> str:
    """`value` made safe for a key=value log line."""
    cleaned = "".join(ch if ch.isprintable() and not ch.isspace() and ch != "=" else "_"
                      for ch in value[:64])
    return cleaned or "-"
