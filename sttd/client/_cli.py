"""The ``sttd stream`` and ``sttd transcribe`` commands (`sttd.cli` parses their options).

``stream`` sends a file (paced in real time, or fast), raw PCM16 from stdin or the microphone
over one session and shows what comes back (`_Display`): on a terminal the live partial is one
line rewritten in place (stable words plain, the rest dim) and each final is printed as
``[mm:ss.t] text``; piped, only the finals' text, one a line, or with ``--json`` the server's
final messages as JSON lines. Errors and warnings go to stderr. ``transcribe`` uploads files to
the HTTP API and writes (or prints) what the server renders, with a progress bar on stderr while
it is a terminal (`_Uploads`).

The terminal output is rich's: `rich.live.Live` keeps the partial's line and prints finals above
it, `rich.progress.Progress` draws the upload bar. Piped output does not go through rich at all.
Both commands return the exit status: 0 done, 1 a request failed, 2 a usage error; `sttd.cli`
turns Ctrl-C outside a session into 130.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Final, TextIO

import attrs
import httpx
import trio
from rich.cells import cell_len
from rich.console import Console
from rich.live import Live
from rich.progress import (
    BarColumn,
    Progress,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from sttd.api import Error, Final as FinalMessage, Partial, Warning, to_json
from sttd.audio import read_audio
from sttd.client._errors import ConnectFailed, RequestFailed, SessionClosed, TranscriptionFailed
from sttd.client._files import transcribe_file
from sttd.client._mic import MicrophoneUnavailable, load_sounddevice, send_microphone
from sttd.client._session import ServerMessage, StreamingSession, connect, stream_pcm
from sttd.errors import SttdError

__all__ = ["stream", "transcribe"]

# After ``end``: the server sends its last finals and closes; past this we stop waiting.
_END_DRAIN_S: Final = 60.0
# After a first Ctrl-C: how long the last finals may take (a second Ctrl-C stops at once).
_INTERRUPT_DRAIN_S: Final = 10.0
_STDIN_CHUNK_BYTES: Final = 16000  # at most 0.5 s of audio per frame read from stdin
_MIN_PARTIAL_CELLS: Final = 8  # of the partial's text on a narrow terminal
_PROGRESS_REFRESH_HZ: Final = 10.0

_Source = Callable[[StreamingSession], Awaitable[None]]


def _say(text: str) -> None:
    """A line for the user on stderr (not a log record: the command's own output)."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _terminal(file: TextIO) -> Console:
    """A rich console on `file`, which the caller found to be a terminal (`isatty`)."""
    # force_terminal: the decision is the caller's isatty(), as documented, not rich's reading
    # of FORCE_COLOR or TTY_COMPATIBLE. Markup and highlighting off: transcripts and file names
    # are shown as they are.
    return Console(file=file, force_terminal=True, markup=False, highlight=False, emoji=False)


# stream --------------------------------------------------------------------------------------


def stream(*, file: str | None, fast: bool, as_json: bool, url: str, api_key: str | None,
           language: str | None, hotwords: tuple[str, ...]) -> int:
    """Run ``sttd stream``: `file` is a path, ``-`` for stdin, or None for the microphone."""
    display = _Display.for_streams(sys.stdout, sys.stderr, as_json=as_json)
    source: _Source
    if file is None:
        try:
            sounddevice = load_sounddevice()
        except MicrophoneUnavailable as exc:
            _say(f"sttd: {exc}")
            return 2
        source = partial(send_microphone, sounddevice=sounddevice, notice=display.notice)
    elif file == "-":
        if sys.stdin.isatty():
            _say("sttd: stdin is a terminal; pipe raw PCM16 (16 kHz mono) into 'sttd stream -'")
            return 2
        source = _send_stdin
    else:
        try:
            pcm = read_audio(file)
        except OSError as exc:
            _say(f"sttd: {file}: {exc.strerror or exc}")
            return 2
        except SttdError as exc:
            _say(f"sttd: {file}: {exc}")
            return 2
        source = partial(stream_pcm, pcm=pcm, fast=fast, end=False)
    return trio.run(partial(
        _run_stream, url, source, display, api_key=api_key, language=language,
        hotwords=hotwords, until_interrupted=file is None, word_timings=as_json))


@attrs.define
class _Interrupts:
    """Ctrl-C while streaming: the first stops the audio and waits for the last finals, a
    second stops waiting."""

    count: int = 0


async def _run_stream(url: str, source: _Source, display: _Display, *, api_key: str | None,
                      language: str | None, hotwords: tuple[str, ...],
                      until_interrupted: bool, word_timings: bool) -> int:
    interrupts = _Interrupts()
    with display.shown():
        try:
            # Only --json shows the finals' words: otherwise the server is spared aligning them.
            async with connect(url, call_id=f"sttd-cli-{secrets.token_hex(4)}",
                               language=language, hotwords=hotwords,
                               word_timings=word_timings, api_key=api_key) as session:
                if until_interrupted:
                    display.status("listening (Ctrl-C to stop)")
                async with trio.open_nursery() as nursery:
                    stop_sending = trio.CancelScope()
                    nursery.start_soon(_send_then_end, session, source, display, stop_sending,
                                       nursery.cancel_scope)
                    nursery.start_soon(_handle_interrupts, stop_sending, nursery.cancel_scope,
                                       interrupts)
                    async for message in session:
                        display.show(message)
                    nursery.cancel_scope.cancel()  # the server closed: stop sending, watching
                # How the server closed, or None if we stopped waiting (leaving the block
                # closes).
                code = session.close_code
        except RequestFailed as exc:
            display.notice(f"sttd: {exc.code}: {exc}")
            return 1
    if code is None:
        if interrupts.count < 2:
            display.notice(f"sttd: the server did not close the session within "
                           f"{_INTERRUPT_DRAIN_S if interrupts.count else _END_DRAIN_S:g} s "
                           "of the end of the audio")
        return 130 if interrupts.count >= 2 else 1
    if code != 1000:
        reason = f" ({session.close_reason})" if session.close_reason else ""
        display.notice(f"sttd: the server closed the session with code {code}{reason}")
        return 1
    if display.errors:
        return 1
    return 130 if interrupts.count and not until_interrupted else 0


async def _send_then_end(session: StreamingSession, source: _Source, display: _Display,
                         stop_sending: trio.CancelScope, scope: trio.CancelScope) -> None:
    """Send the audio until it ends (or `stop_sending` is cancelled), then ``end``; gives the
    server `_END_DRAIN_S` from then to close."""
    try:
        with stop_sending:
            try:
                await source(session)
            except MicrophoneUnavailable as exc:
                display.fail(f"sttd: {exc}")
        await session.end()
    except SessionClosed:
        return  # the server closed first; the receiving loop reports how
    scope.deadline = min(scope.deadline, trio.current_time() + _END_DRAIN_S)


async def _handle_interrupts(stop_sending: trio.CancelScope, scope: trio.CancelScope,
                             interrupts: _Interrupts) -> None:
    with trio.open_signal_receiver(signal.SIGINT) as signals:
        async for _ in signals:
            interrupts.count += 1
            if interrupts.count > 1:
                scope.cancel()
                return
            stop_sending.cancel()
            scope.deadline = min(scope.deadline, trio.current_time() + _INTERRUPT_DRAIN_S)


async def _send_stdin(session: StreamingSession) -> None:
    """Send stdin's bytes as they arrive, until it ends."""
    async with trio.lowlevel.FdStream(os.dup(sys.stdin.fileno())) as stdin:
        while chunk := await stdin.receive_some(_STDIN_CHUNK_BYTES):
            await session.send_audio(chunk)


@attrs.define
class _Display:
    """Shows a session's messages on stdout (finals) and stderr (errors, warnings).

    Live (a `console`, given when stdout is a terminal and there is no ``--json``):
    while `shown`, the partial is one line rewritten in place (a `rich.live.Live`), its stable
    part plain and the rest dim, and finals are printed above it with their start time.
    Otherwise only finals are printed, plain: their text, or the server's message as a JSON line.
    """

    _out: TextIO
    _err: TextIO
    _as_json: bool
    _console: Console | None
    errors: int = 0
    _live: Live | None = attrs.field(default=None, init=False)
    # What the live line shows: the partial, or `_idle` (see `status`) while there is none.
    _line: Text = attrs.field(factory=Text, init=False)
    _idle: Text = attrs.field(factory=Text, init=False)

    @classmethod
    def for_streams(cls, out: TextIO, err: TextIO, *, as_json: bool) -> _Display:
        live = out.isatty() and not as_json
        return cls(out, err, as_json, _terminal(out) if live else None)

    @contextlib.contextmanager
    def shown(self) -> Iterator[None]:
        """Keep the live line (when live) until the block exits, then take it away."""
        if self._console is None:
            yield
            return
        # No auto-refresh (and so no refresh thread): the line is redrawn when a message
        # changes it. transient: the line is erased at the end, the finals above it stay.
        live = Live(self._line, console=self._console, auto_refresh=False, transient=True,
                    redirect_stdout=False, redirect_stderr=False)
        live.start(refresh=True)
        self._live = live
        try:
            yield
        finally:
            self._live = None
            live.stop()

    def show(self, message: ServerMessage) -> None:
        if isinstance(message, Partial):
            if self._console is not None:
                self._redraw(self._partial_line(message, self._console.width))
        elif isinstance(message, FinalMessage):
            self._final(message)
        elif isinstance(message, Error):
            self.fail(f"sttd: error {message.code}: {message.message}")
        elif isinstance(message, Warning):
            self.notice(f"sttd: warning {message.code}: {message.message}")

    def status(self, text: str) -> None:
        """A dim placeholder for the live line while no partial is shown (not live: nothing)."""
        self._idle = Text(text, style="dim")
        self._redraw(self._idle)

    def notice(self, text: str) -> None:
        """A line on stderr, below whatever was printed."""
        if self._live is not None:
            # stderr may be the same terminal: take the live line away while the notice is
            # written, then draw it again below.
            self._live.update(Text(), refresh=True)
        self._err.write(text + "\n")
        self._err.flush()
        if self._live is not None:
            self._live.update(self._line, refresh=True)

    def fail(self, text: str) -> None:
        """`notice` an error: the command then exits 1."""
        self.errors += 1
        self.notice(text)

    def _final(self, final: FinalMessage) -> None:
        if self._as_json:
            raw = final.raw if final.raw is not None else to_json(final)
            self._out.write(json.dumps(raw, ensure_ascii=False) + "\n")
            self._out.flush()
        elif self._console is not None:
            # The partial goes first (redrawn as the idle line), so printing the final above
            # the live line does not show the partial once more under it.
            self._redraw(self._idle)
            if final.text:
                self._console.print(Text(f"[{_clock(final.start_ms)}] {final.text}"),
                                     soft_wrap=True)
        elif final.text:
            self._out.write(final.text + "\n")
            self._out.flush()

    def _redraw(self, line: Text) -> None:
        self._line = line
        if self._live is not None:
            self._live.update(line, refresh=True)

    @staticmethod
    def _partial_line(partial: Partial, width: int) -> Text:
        """``[mm:ss.t] stable unstable`` with the unstable words dim, on one row of `width`."""
        prefix = f"[{_clock(partial.start_ms)}] "
        stable = partial.stable + (" " if partial.stable and partial.unstable else "")
        words = Text.assemble(stable, (partial.unstable, "dim"))
        # The line must not wrap (nor fill the row, which leaves the cursor waiting to wrap),
        # or rewriting it in place would leave a row behind; and it is the newest words that
        # matter. rich crops and ellipsizes only at the end of a line, so the start is cut
        # here by hand (no_wrap and crop below are only a backstop).
        room = max(width - 1 - cell_len(prefix), _MIN_PARTIAL_CELLS)
        if words.cell_len > room:
            plain = words.plain
            cut = max(len(plain) - (room - 1), 0)
            while cell_len(plain[cut:]) > room - 1:  # wide characters take two cells
                cut += 1
            words = Text("…") + words[cut:]
        return Text.assemble(prefix, words, no_wrap=True, overflow="crop")


def _clock(ms: int) -> str:
    """Stream time as ``mm:ss.t``, or ``h:mm:ss.t`` from an hour on."""
    seconds, millis = divmod(max(ms, 0), 1000)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    clock = f"{minutes:02d}:{seconds:02d}.{millis // 100}"
    return f"{hours}:{clock}" if hours else clock


# transcribe ----------------------------------------------------------------------------------


def transcribe(*, files: Sequence[Path], out: Path | None, response_format: str, suffix: str,
               url: str, api_key: str | None, language: str | None,
               hotwords: tuple[str, ...]) -> int:
    """Run ``sttd transcribe``: each of `files` to `out` as STEM`suffix` (see `_jobs`)."""
    try:
        jobs = _jobs(list(files), out, suffix)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
    except (ValueError, OSError) as exc:
        _say(f"sttd: {exc}")
        return 2
    uploads = _Uploads.for_stream(sys.stderr, files=len(jobs))
    with uploads.shown():
        return trio.run(partial(
            _run_transcribe, url, jobs, uploads, response_format=response_format,
            language=language, hotwords=hotwords, api_key=api_key))


def _jobs(sources: list[Path], out: Path | None, suffix: str) -> list[tuple[Path, Path | None]]:
    """Each input and where its result goes (None: stdout); raises `ValueError` if two inputs
    would write the same file or one would overwrite its input."""
    jobs: list[tuple[Path, Path | None]] = []
    seen: dict[Path, Path] = {}
    for source in sources:
        target: Path | None
        if out is not None:
            target = out / (source.stem + suffix)
        elif len(sources) == 1:
            target = None
        else:
            target = source.with_suffix(suffix)
        if target is not None:
            key = target.resolve()
            if key == source.resolve():
                raise ValueError(f"{source}: its result would overwrite it; use --out DIR")
            if key in seen:
                raise ValueError(f"{seen[key]} and {source} would both write {target}")
            seen[key] = source
        jobs.append((source, target))
    return jobs


async def _run_transcribe(url: str, jobs: list[tuple[Path, Path | None]], uploads: _Uploads,
                          *, response_format: str, language: str | None,
                          hotwords: tuple[str, ...], api_key: str | None) -> int:
    failed = 0
    async with httpx.AsyncClient() as http:
        for source, target in jobs:
            uploads.start(source.name)
            try:
                body = await transcribe_file(
                    url, source, response_format=response_format, language=language,
                    hotwords=hotwords, api_key=api_key, progress=uploads.uploaded, client=http)
                if target is None:
                    uploads.close()  # stdout may be the bar's terminal: take the bar away
                    # JSON bodies end without a newline: the shell's prompt would follow them.
                    sys.stdout.write(body if body.endswith("\n") else body + "\n")
                    sys.stdout.flush()
                else:
                    await trio.Path(target).write_text(body, encoding="utf-8", newline="")
                    uploads.notice(f"wrote {target}", only_on_terminal=True)
            except ConnectFailed as exc:
                uploads.notice(f"sttd: {exc.code}: {exc}")
                return 1  # the files left would fail the same way
            except TranscriptionFailed as exc:
                failed += 1
                uploads.notice(f"sttd: {source}: {exc.code}: {exc.message}")
            except OSError as exc:
                failed += 1
                uploads.notice(f"sttd: {source}: {exc.strerror or exc}")
            uploads.finish_file()
    return 1 if failed else 0


def _upload_progress(console: Console, *, auto_refresh: bool = True,
                     get_time: Callable[[], float] | None = None) -> Progress:
    """rich's progress display for uploads: name, bar, share, state, time since the start."""
    return Progress(
        TextColumn("{task.description}", markup=False), BarColumn(), TaskProgressColumn(),
        TextColumn("{task.fields[state]}", markup=False), TimeElapsedColumn(),
        console=console, transient=True, auto_refresh=auto_refresh,
        refresh_per_second=_PROGRESS_REFRESH_HZ, get_time=get_time,
        # Not rich's default: stdout (a transcript) must not be routed to stderr's console.
        redirect_stdout=False, redirect_stderr=False)


@attrs.define
class _Uploads:
    """Progress of ``transcribe`` on stderr, and its notices.

    With a `progress` (stderr is a terminal), one row shows the file being uploaded (its bytes,
    then ``transcribing`` while the server works) and, with several files, a row above it how
    many are done; notices are printed above the rows, and ``only_on_terminal`` ones only then.
    rich redraws the rows at `_PROGRESS_REFRESH_HZ` from its own thread, started and joined by
    `shown`. Without one, only notices are written, plain.
    """

    _err: TextIO
    _progress: Progress | None
    _files: int
    _done: int = attrs.field(default=0, init=False)
    _name: str = attrs.field(default="", init=False)
    _file_task: TaskID | None = attrs.field(default=None, init=False)
    _count_task: TaskID | None = attrs.field(default=None, init=False)

    @classmethod
    def for_stream(cls, err: TextIO, *, files: int) -> _Uploads:
        return cls(err, _upload_progress(_terminal(err)) if err.isatty() else None, files)

    @contextlib.contextmanager
    def shown(self) -> Iterator[None]:
        """Show the progress rows until the block exits, then erase them."""
        if self._progress is None:
            yield
            return
        with self._progress:
            if self._files > 1:
                self._count_task = self._progress.add_task(
                    "files", total=self._files, state=f"0/{self._files}")
            yield

    def start(self, name: str) -> None:
        """A file's upload begins (its size is known with the first chunk)."""
        self._name = name
        self._new_row(state="")

    def uploaded(self, sent_bytes: int, size_bytes: int) -> None:
        """`transcribe_file`'s progress callback."""
        if self._progress is None or self._file_task is None:
            return
        if sent_bytes < size_bytes:
            self._progress.update(
                self._file_task, completed=sent_bytes, total=size_bytes,
                state=f"uploading {sent_bytes / 2**20:.1f} of {size_bytes / 2**20:.1f} MiB")
        else:
            # A new row without a total while the server works: its bar pulses and its clock
            # counts the wait (a task at its total stops its clock, and rich cannot take a
            # total away).
            self._new_row(state="transcribing")

    def _new_row(self, *, state: str) -> None:
        if self._progress is None:
            return
        if self._file_task is not None:
            self._progress.remove_task(self._file_task)
        self._file_task = self._progress.add_task(self._name, total=None, state=state)

    def finish_file(self) -> None:
        self._done += 1
        if self._progress is not None and self._count_task is not None:
            self._progress.update(self._count_task, completed=self._done,
                                  state=f"{self._done}/{self._files}")

    def notice(self, text: str, *, only_on_terminal: bool = False) -> None:
        if self._progress is not None:
            self._progress.console.print(Text(text), soft_wrap=True)
        elif not only_on_terminal:
            self._err.write(text + "\n")
            self._err.flush()

    def close(self) -> None:
        """Erase the rows now (before output to stdout); `shown` then has nothing to do."""
        if self._progress is not None:
            self._progress.stop()
