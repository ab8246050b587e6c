"""The VAD net's calls of every session, scored together in batched runs off the event loop.

Theory of operation. A session's core suspends wherever its VAD needs the Silero net
(`sttd.vad.VadSteps`); `VadBatcher.drive` runs those steps for the session, handing each
`NetCall` to the batcher and sending the probabilities back. One task (`run`, in the app-level
nursery) takes every call queued so far and scores them together in a worker thread
(`SileroModel.score`: one run of the net for the first window of every call, one for the second
window of those with two, ...); calls that arrive meanwhile wait for the next run. So the batch
is whatever the sessions asked for while the last run took: nothing waits on purpose, and the
event loop never runs the net. A call goes to a run at most ``_MAX_RUN_WINDOWS`` windows at a
time (the rest in the runs after, in order): a run answers its calls only at its end, and one
client's big frame (STT_MAX_MESSAGE_BYTES lets a message hold 32 s, a thousand windows, which the
net takes 270 ms to score one after another on an AMD EPYC thread) would hold every other
session's windows for all of it. Measured on one AMD EPYC thread, a window costs the net 0.39 ms
alone and 0.17-0.22 ms in a batch of 8-16 (`benchmarks/README.md`), and 200 busy sessions
would otherwise spend a core of the event loop on it.

A call from a net that is not a stream of this batcher's model (a test's fake) is scored at once,
as `sttd.vad.run_steps` would. A run that fails fails every call of it: each waiting session
gets the error (and closes as a server failure); the batcher goes on. A session cancelled while
its call waits withdraws it; one cancelled while its call runs leaves it to finish. A caller
that must not be stopped halfway through its steps drives them ``shielded``: its waits cannot be
cancelled (a cancel reaches it at its next checkpoint after), and cost no cancel scope; a
batcher that stops fails the calls it holds, so such a wait always ends.
"""

from __future__ import annotations

import logging
from typing import TypeVar

import attrs
import trio

from sttd.errors import BackendError
from sttd.vad import NetCall, SileroModel, SileroStream, VadSteps

__all__ = ["VadBatcher", "VadStatistics"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

# Most windows of one call in one run (512 ms of audio; 4.7 ms of the net's time scored alone
# on an AMD EPYC thread): see the module docstring.
_MAX_RUN_WINDOWS = 16


@attrs.define(eq=False)
class _Pending:
    call: NetCall
    done: trio.Event = attrs.field(factory=trio.Event)
    probabilities: list[float] = attrs.field(factory=list)
    error: Exception | None = None
    # A caller waiting without a cancel point (`VadBatcher.drive`'s ``shielded``).
    waiter: trio.lowlevel.Task | None = None

    def answer(self) -> None:
        self.done.set()
        if self.waiter is not None:
            trio.lowlevel.reschedule(self.waiter)
            self.waiter = None


@attrs.frozen
class VadStatistics:
    """What the batcher has done so far."""

    runs: int
    windows: int


@attrs.define
class VadBatcher:
    """Scores the VAD net calls of every session in shared batched runs of `model`."""

    model: SileroModel
    _queue: list[_Pending] = attrs.field(init=False, factory=list)
    _in_run: list[_Pending] = attrs.field(init=False, factory=list)  # the run being scored
    _work: trio.lowlevel.ParkingLot = attrs.field(init=False, factory=trio.lowlevel.ParkingLot)
    _runs: int = attrs.field(init=False, default=0)
    _windows: int = attrs.field(init=False, default=0)

    def statistics(self) -> VadStatistics:
        return VadStatistics(self._runs, self._windows)

    async def drive(self, steps: VadSteps[_T], *, shielded: bool = False) -> _T:
        """Run `steps` to their end, scoring their net calls in the shared runs; their result.

        `shielded`: no cancellation stops them halfway (it takes effect at the caller's next
        checkpoint). Raises what a failed run raised.
        """
        try:
            call = next(steps)
            while True:
                call = steps.send(await self._score(call, shielded))
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]  # the generator's return value

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Score queued calls until cancelled (a run in flight finishes first); calls still
        queued then fail, so that no caller waits on a batcher that is gone (a session feeding
        its core waits on its call shielded, `sttd.nursery.Session._feed_here`)."""
        task_status.started()
        try:
            await self._serve()
        finally:
            for pending in [*self._in_run, *self._queue]:
                if not pending.done.is_set():
                    pending.error = RuntimeError("the VAD batcher stopped")
                    pending.answer()
            self._in_run, self._queue = [], []

    async def _serve(self) -> None:
        while True:
            while not self._queue:
                await self._work.park()
            batch = self._in_run = self._queue
            self._queue = []
            try:
                answers = await trio.to_thread.run_sync(
                    self.model.score, [pending.call for pending in batch])
                scores = [len(answer) for answer in answers]
                windows = [pending.call.windows for pending in batch]
                if scores != windows:
                    raise ValueError(f"{sum(scores)} scores for {sum(windows)} windows")
            except Exception as exc:  # a failed run fails its calls, not the server
                log.error("vad.failed calls=%d", len(batch), exc_info=True)
                for pending in batch:
                    pending.error = exc
                    pending.answer()
                continue
            self._runs += 1
            self._windows += sum(windows)
            for pending, answer in zip(batch, answers, strict=True):  # checked above
                pending.probabilities = answer
                pending.answer()

    async def _score(self, call: NetCall, shielded: bool) -> list[float]:
        stream = call.net
        if not isinstance(stream, SileroStream) or stream.model is not self.model:
            return call.score()
        if call.windows <= _MAX_RUN_WINDOWS:
            return await self._score_in_a_run(call, shielded)
        probabilities: list[float] = []
        for part in call.parts(_MAX_RUN_WINDOWS):  # in order: the stream's state moves on
            probabilities += await self._score_in_a_run(part, shielded)
        return probabilities

    async def _score_in_a_run(self, call: NetCall, shielded: bool) -> list[float]:
        pending = _Pending(call)
        self._queue.append(pending)
        self._work.unpark_all()
        if shielded:
            # Parked until `_Pending.answer`; an abort is refused, so a cancel waits for it.
            pending.waiter = trio.lowlevel.current_task()
            await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)
        else:
            try:
                await pending.done.wait()
            finally:
                if not pending.done.is_set() and pending in self._queue:
                    self._queue.remove(pending)  # withdrawn: its session went away
        if pending.error is not None:
            raise BackendError(f"the VAD net failed: {pending.error!r}") from pending.error
        return pending.probabilities
