"""The ``sttd`` command: ``serve`` runs the server; ``stream`` and ``transcribe`` are its client.

``stream`` sends a file (paced in real time, or ``--fast``), raw PCM16 from stdin (``-``) or
the microphone (``--mic``) over one WebSocket session and prints the finals; on a terminal the
live partial is shown on one line that is rewritten in place. ``transcribe`` sends files to the
HTTP API and writes (or prints) what the server renders. Both talk to ``--url`` (or
``$STTD_URL``) with ``--api-key`` (or ``$STTD_API_KEY``): ``STT_*`` variables are the server's.

Exit status: 0 done; 1 a request failed (the server refused or broke off a session or a file, or
could not be reached); 2 a usage error (bad options, unreadable audio, no microphone support);
130 interrupted (``stream --mic`` stops on Ctrl-C with 0: that is how it ends).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import os
import secrets
import shutil
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any, Final, TextIO

import attrs
import httpx
import trio

from sttd import client
from sttd.audio import SAMPLE_RATE_HZ
from sttd.errors import ConfigError, SttdError
from sttd.logs import configure_logging
from sttd.server import serve, wait_for_signal
from sttd.settings import Settings

__all__ = ["main"]

log = logging.getLogger("sttd")

URL_ENV: Final = "STTD_URL"
API_KEY_ENV: Final = "STTD_API_KEY"
DEFAULT_URL: Final = "http://127.0.0.1:8000"
# --format -> (the API's response_format, the output file's suffix)
_FORMATS: Final = {"txt": ("text", ".txt"), "json": ("verbose_json", ".json"),
                   "srt": ("srt", ".srt"), "vtt": ("vtt", ".vtt")}
# After ``end``: the server sends its last finals and closes; past this we stop waiting.
_END_DRAIN_S: Final = 60.0
# After a first Ctrl-C: how long the last finals may take (a second Ctrl-C stops at once).
_INTERRUPT_DRAIN_S: Final = 10.0
_STDIN_CHUNK_BYTES: Final = 16000  # at most 0.5 s of audio per frame read from stdin
_MIC_BLOCK_MS: Final = 20
# Microphone blocks waiting for the network (5 s); past that new blocks are dropped.
_MIC_QUEUE_BLOCKS: Final = 250
_MIC_DROP_REPORT_EVERY: Final = 50
_PROGRESS_PERIOD_S: Final = 0.1
_BAR_CELLS: Final = 24
_CLEAR_LINE: Final = "\r\x1b[2K"
_DIM: Final = "\x1b[2m"
_PLAIN: Final = "\x1b[0m"
_MIC_HINT: Final = "install the mic extra: uv sync --extra mic"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sttd`` console script."""
    parser = _parser(os.environ)
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve()
    try:
        client.http_base_url(args.url)
    except ValueError as exc:
        parser.error(f"--url (or {URL_ENV}): {exc}")
    try:
        if args.command == "stream":
            return _stream(args, parser)
        if args.command == "transcribe":
            return _transcribe(args)
    except BaseException as exc:  # re-raised unless it is one of the two below
        # Either may come out of a nursery wrapped in an exception group.
        if _consists_of(exc, KeyboardInterrupt):
            return 130
        if _consists_of(exc, BrokenPipeError):
            # Whoever read stdout went away (`sttd stream talk.wav | head -1`): stop quietly,
            # with stdout on /dev/null so that flushing it at exit does not fail again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1
        raise
    parser.error(f"unknown command {args.command}")
    return 2


def _consists_of(exc: BaseException, kind: type[BaseException]) -> bool:
    """Whether `exc` is a `kind`, or a group of nothing else."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(kind)[1] is None
    return isinstance(exc, kind)


def _parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sttd", description="Real-time speech-to-text server, and a client for it.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "serve", help="run the server (settings from STT_* environment variables)")

    stream = commands.add_parser(
        "stream", help="stream audio to a server and print its transcripts",
        description="Stream a file, stdin or the microphone over one WebSocket session. On a "
                    "terminal the live partial is shown on one line and each final is printed "
                    "with its start time; piped, only the finals' text is printed, one per line.")
    stream.add_argument("file", nargs="?", metavar="FILE",
                        help="an audio file (WAV, or any format FFmpeg decodes), or - for raw "
                             "PCM16 little-endian 16 kHz mono on stdin, sent as it arrives")
    stream.add_argument("--mic", action="store_true",
                        help=f"capture the microphone until Ctrl-C ({_MIC_HINT})")
    stream.add_argument("--fast", action="store_true",
                        help="send FILE as fast as the server takes it, not in real time")
    stream.add_argument("--json", action="store_true",
                        help="print each final as a JSON line (the server's message)")
    _client_options(stream, environ)
    stream.add_argument("--hotwords", default="", metavar="A,B",
                        help="comma-separated words or phrases to favour")

    transcribe = commands.add_parser(
        "transcribe", help="transcribe files over the HTTP API",
        description="Transcribe each file with the server's /v1/audio/transcriptions. One file "
                    "without --out is printed to stdout; otherwise each goes to --out as "
                    "STEM.txt, .json, .srt or .vtt (without --out: beside its input).")
    transcribe.add_argument("files", nargs="+", metavar="FILE",
                            help="audio files, uploaded as they are (the server decodes them)")
    transcribe.add_argument("--format", choices=tuple(_FORMATS), default="txt",
                            help="txt, json (OpenAI's verbose_json: segments with times), srt or "
                                 "vtt (default: txt)")
    transcribe.add_argument("--out", type=Path, metavar="DIR", help="write the results here")
    _client_options(transcribe, environ)
    transcribe.add_argument("--hotwords", default="", metavar="A,B",
                            help="comma-separated words or phrases to favour")
    return parser


def _client_options(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
    parser.add_argument("--url", default=environ.get(URL_ENV) or DEFAULT_URL,
                        help=f"the server: http(s)://host:port (default: ${URL_ENV} or "
                             f"{DEFAULT_URL})")
    parser.add_argument("--api-key", default=environ.get(API_KEY_ENV) or None, metavar="KEY",
                        help=f"bearer key, where the server needs one (default: ${API_KEY_ENV})")
    parser.add_argument("--language", default=None, metavar="L",
                        help="BCP-47 code such as en (default: the server detects it)")


def _hotwords(value: str) -> tuple[str, ...]:
    return tuple(word.strip() for word in value.split(",") if word.strip())


# serve ---------------------------------------------------------------------------------------


def _serve() -> int:
    try:
        settings = Settings.from_env(os.environ)
    except SttdError as exc:
        print(f"sttd: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    failures: list[SttdError] = []
    try:
        trio.run(partial(serve, settings, shutdown_trigger=wait_for_signal))
    except* SttdError as group:
        failures.extend(exc for exc in group.exceptions if isinstance(exc, SttdError))
    for failure in failures:
        log.error("server.failed error=%s", type(failure).__name__)
        print(f"sttd: {failure}", file=sys.stderr)
    if failures:
        # A setting found wrong only once the server starts (a key file, a model path) is a
        # configuration error like one found while parsing: exit 2 as for those.
        return 2 if any(isinstance(failure, ConfigError) for failure in failures) else 1
    log.info("server.stopped")
    return 0


# stream --------------------------------------------------------------------------------------

_Source = Callable[[client.StreamingSession], Awaitable[None]]


def _stream(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.mic == (args.file is not None):
        parser.error("stream takes one of FILE, - (stdin) or --mic")
    if args.fast and (args.mic or args.file == "-"):
        parser.error("--fast applies to a FILE; stdin and the microphone are sent as they come")
    display = _Display.for_streams(sys.stdout, sys.stderr, as_json=args.json)
    source: _Source
    if args.mic:
        try:
            sounddevice = importlib.import_module("sounddevice")
        except (ImportError, OSError) as exc:  # OSError: sounddevice is there, PortAudio is not
            print(f"sttd: --mic needs sounddevice ({exc}); {_MIC_HINT}", file=sys.stderr)
            return 2
        source = partial(_send_microphone, sounddevice=sounddevice, display=display)
    elif args.file == "-":
        if sys.stdin.isatty():
            print("sttd: stdin is a terminal; pipe raw PCM16 (16 kHz mono) into 'sttd stream -'",
                  file=sys.stderr)
            return 2
        source = _send_stdin
    else:
        try:
            pcm = client.read_audio(args.file)
        except OSError as exc:
            print(f"sttd: {args.file}: {exc.strerror or exc}", file=sys.stderr)
            return 2
        except SttdError as exc:
            print(f"sttd: {args.file}: {exc}", file=sys.stderr)
            return 2
        source = partial(client.stream_pcm, pcm=pcm, fast=args.fast, end=False)
    return trio.run(partial(
        _run_stream, args.url, source, display, api_key=args.api_key, language=args.language,
        hotwords=_hotwords(args.hotwords), until_interrupted=args.mic))


@attrs.define
class _Interrupts:
    """Ctrl-C while streaming: the first stops the audio and waits for the last finals, a
    second stops waiting."""

    count: int = 0


async def _run_stream(url: str, source: _Source, display: _Display, *, api_key: str | None,
                      language: str | None, hotwords: tuple[str, ...],
                      until_interrupted: bool) -> int:
    interrupts = _Interrupts()
    try:
        async with client.connect(url, call_id=f"sttd-cli-{secrets.token_hex(4)}",
                                  language=language, hotwords=hotwords,
                                  api_key=api_key) as session:
            if until_interrupted:
                display.status("listening (Ctrl-C to stop)")
            async with trio.open_nursery() as nursery:
                stop_sending = trio.CancelScope()
                nursery.start_soon(_send_then_end, session, source, stop_sending,
                                   nursery.cancel_scope)
                nursery.start_soon(_handle_interrupts, stop_sending, nursery.cancel_scope,
                                   interrupts)
                async for message in session:
                    display.show(message)
                nursery.cancel_scope.cancel()  # the server closed: stop sending and watching
            # How the server closed, or None if we stopped waiting (leaving the block closes).
            code = session.close_code
    except client.RequestFailed as exc:
        display.notice(f"sttd: {exc.code}: {exc}")
        return 1
    finally:
        display.clear()
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


async def _send_then_end(session: client.StreamingSession, source: _Source,
                         stop_sending: trio.CancelScope, scope: trio.CancelScope) -> None:
    """Send the audio until it ends (or `stop_sending` is cancelled), then ``end``; gives the
    server `_END_DRAIN_S` from then to close."""
    try:
        with stop_sending:
            await source(session)
        await session.end()
    except client.SessionClosed:
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


async def _send_stdin(session: client.StreamingSession) -> None:
    """Send stdin's bytes as they arrive, until it ends."""
    async with trio.lowlevel.FdStream(os.dup(sys.stdin.fileno())) as stdin:
        while chunk := await stdin.receive_some(_STDIN_CHUNK_BYTES):
            await session.send_audio(chunk)


async def _send_microphone(session: client.StreamingSession, *, sounddevice: ModuleType,
                           display: _Display) -> None:
    """Send the default input device's audio (16 kHz mono int16) until cancelled.

    PortAudio calls back on its own thread; each block is handed to trio without blocking that
    thread, through a bounded channel: if the network falls 5 s behind, new blocks are dropped
    (and reported) rather than queued without bound.
    """
    send_block, receive_block = trio.open_memory_channel[bytes](_MIC_QUEUE_BLOCKS)
    token = trio.lowlevel.current_trio_token()
    dropped = 0

    def push(block: bytes) -> None:  # in trio
        nonlocal dropped
        try:
            send_block.send_nowait(block)
        except trio.WouldBlock:
            dropped += 1
            if dropped % _MIC_DROP_REPORT_EVERY == 1:
                display.notice(f"sttd: the network is slower than the microphone: dropped "
                               f"{dropped} blocks of {_MIC_BLOCK_MS} ms so far")
        except trio.ClosedResourceError:
            pass  # a block that came after we stopped

    def callback(indata: Any, frames: int, time_info: Any, status: Any) -> None:  # PortAudio's
        try:
            token.run_sync_soon(push, bytes(indata))
        except trio.RunFinishedError:
            pass

    with send_block, receive_block:
        try:
            microphone = sounddevice.InputStream(
                samplerate=SAMPLE_RATE_HZ, channels=1, dtype="int16",
                blocksize=SAMPLE_RATE_HZ * _MIC_BLOCK_MS // 1000, callback=callback)
        except sounddevice.PortAudioError as exc:  # no input device, or it refuses 16 kHz mono
            display.errors += 1
            display.notice(f"sttd: cannot open the microphone: {exc}")
            return
        with microphone:
            async for block in receive_block:
                await session.send_audio(block)


@attrs.define
class _Display:
    """Shows a session's messages on stdout (finals) and stderr (errors, warnings).

    Live (stdout is a terminal, no --json): the partial is one line rewritten in place, its
    stable part plain and the rest dim, and finals are printed with their start time.
    Otherwise only finals are printed: their text, or the server's message as a JSON line.
    """

    _out: TextIO
    _err: TextIO
    _live: bool
    _as_json: bool
    errors: int = 0
    _line_shown: bool = attrs.field(default=False, init=False)
    # Shown on the live line while no partial is (see `status`).
    _idle: str = attrs.field(default="", init=False)

    @classmethod
    def for_streams(cls, out: TextIO, err: TextIO, *, as_json: bool) -> _Display:
        return cls(out, err, live=out.isatty() and not as_json, as_json=as_json)

    def show(self, message: client.ServerMessage) -> None:
        if isinstance(message, client.Partial):
            if self._live:
                self._rewrite(self._partial_line(message))
        elif isinstance(message, client.Final):
            self._final(message)
        elif isinstance(message, client.Error):
            self.errors += 1
            self.notice(f"sttd: error {message.code}: {message.message}")
        elif isinstance(message, client.Warning):
            self.notice(f"sttd: warning {message.code}: {message.message}")

    def status(self, text: str) -> None:
        """A dim placeholder for the live line while no partial is shown (not live: nothing)."""
        if self._live:
            self._idle = f"{_DIM}{text}{_PLAIN}"
            self._rewrite(self._idle)

    def notice(self, text: str) -> None:
        """A line on stderr, below whatever was printed."""
        self.clear()
        self._err.write(text + "\n")
        self._err.flush()

    def clear(self) -> None:
        if self._line_shown:
            self._out.write(_CLEAR_LINE)
            self._out.flush()
            self._line_shown = False

    def _final(self, final: client.Final) -> None:
        if self._as_json:
            self._out.write(json.dumps(final.raw, ensure_ascii=False) + "\n")
        elif self._live:
            self.clear()
            if final.text:
                self._out.write(f"[{_clock(final.start_ms)}] {final.text}\n")
            if self._idle:
                self._rewrite(self._idle)
        elif final.text:
            self._out.write(final.text + "\n")
        self._out.flush()

    def _rewrite(self, line: str) -> None:
        self._out.write(_CLEAR_LINE + line)
        self._out.flush()
        self._line_shown = True

    def _partial_line(self, partial: client.Partial) -> str:
        prefix = f"[{_clock(partial.start_ms)}] "
        stable, unstable = partial.stable, partial.unstable
        if not stable and not unstable:
            unstable = partial.text
        text = f"{stable} {unstable}" if stable and unstable else stable + unstable
        stable_chars = len(stable) + (1 if stable and unstable else 0)
        # The line must not wrap, or rewriting it in place would leave its first row behind.
        room = max(shutil.get_terminal_size().columns - 1 - len(prefix), 8)
        if len(text) > room:
            cut = len(text) - (room - 1)
            text, stable_chars = "…" + text[cut:], max(stable_chars - cut, 0) + 1
        return f"{prefix}{text[:stable_chars]}{_DIM}{text[stable_chars:]}{_PLAIN}"


def _clock(ms: int) -> str:
    """Stream time as ``mm:ss.t``, or ``h:mm:ss.t`` from an hour on."""
    seconds, millis = divmod(max(ms, 0), 1000)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    clock = f"{minutes:02d}:{seconds:02d}.{millis // 100}"
    return f"{hours}:{clock}" if hours else clock


# transcribe ----------------------------------------------------------------------------------


def _transcribe(args: argparse.Namespace) -> int:
    response_format, suffix = _FORMATS[args.format]
    try:
        jobs = _transcribe_jobs([Path(name) for name in args.files], args.out, suffix)
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
    except (ValueError, OSError) as exc:
        print(f"sttd: {exc}", file=sys.stderr)
        return 2
    progress = _Progress(sys.stderr, enabled=sys.stderr.isatty(), files=len(jobs))
    return trio.run(partial(
        _run_transcribe, args.url, jobs, progress, response_format=response_format,
        language=args.language, hotwords=_hotwords(args.hotwords), api_key=args.api_key))


def _transcribe_jobs(sources: list[Path], out: Path | None, suffix: str
                     ) -> list[tuple[Path, Path | None]]:
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


async def _run_transcribe(url: str, jobs: list[tuple[Path, Path | None]], progress: _Progress,
                          *, response_format: str, language: str | None,
                          hotwords: tuple[str, ...], api_key: str | None) -> int:
    failed = 0
    try:
        async with httpx.AsyncClient() as http:
            for source, target in jobs:
                progress.start(source.name)
                try:
                    body = await client.transcribe_file(
                        url, source, response_format=response_format, language=language,
                        hotwords=hotwords, api_key=api_key, progress=progress.uploaded,
                        client=http)
                    if target is None:
                        progress.clear()
                        sys.stdout.write(body)
                        sys.stdout.flush()
                    else:
                        await trio.Path(target).write_text(body, encoding="utf-8", newline="")
                        progress.notice(f"wrote {target}", only_on_terminal=True)
                except client.ConnectFailed as exc:
                    progress.notice(f"sttd: {exc.code}: {exc}")
                    return 1  # the files left would fail the same way
                except client.TranscriptionFailed as exc:
                    failed += 1
                    progress.notice(f"sttd: {source}: {exc.code}: {exc.message}")
                except OSError as exc:
                    failed += 1
                    progress.notice(f"sttd: {source}: {exc.strerror or exc}")
                progress.finish_file()
    finally:
        progress.clear()
    return 1 if failed else 0


@attrs.define
class _Progress:
    """A progress line on stderr while it is a terminal: the upload of one file, or the files
    done of many. Redrawn at most every `_PROGRESS_PERIOD_S`."""

    _err: TextIO
    _enabled: bool
    _files: int
    _done: int = attrs.field(default=0, init=False)
    _name: str = attrs.field(default="", init=False)
    _sent_bytes: int = attrs.field(default=0, init=False)
    _size_bytes: int = attrs.field(default=0, init=False)
    _drawn_at: float = attrs.field(default=-math.inf, init=False)
    _shown: bool = attrs.field(default=False, init=False)

    def start(self, name: str) -> None:
        self._name, self._sent_bytes, self._size_bytes = name, 0, 0
        self._draw(force=True)

    def uploaded(self, sent_bytes: int, size_bytes: int) -> None:
        self._sent_bytes, self._size_bytes = sent_bytes, size_bytes
        self._draw(force=sent_bytes == size_bytes)

    def finish_file(self) -> None:
        self._done += 1
        self._draw(force=True)

    def notice(self, text: str, *, only_on_terminal: bool = False) -> None:
        if only_on_terminal and not self._enabled:
            return
        self.clear()
        self._err.write(text + "\n")
        self._err.flush()

    def clear(self) -> None:
        if self._shown:
            self._err.write(_CLEAR_LINE)
            self._err.flush()
            self._shown = False

    def _draw(self, *, force: bool) -> None:
        now = time.monotonic()
        if not self._enabled or (not force and now - self._drawn_at < _PROGRESS_PERIOD_S):
            return
        self._drawn_at = now
        width = max(shutil.get_terminal_size(fallback=(80, 24)).columns - 1, 20)
        self._err.write(_CLEAR_LINE + self._line()[:width])
        self._err.flush()
        self._shown = True

    def _line(self) -> str:
        upload = ""
        if self._size_bytes and self._sent_bytes < self._size_bytes:
            share = self._sent_bytes / self._size_bytes
            upload = (f"uploading {share:4.0%} of {self._size_bytes / 2**20:.1f} MiB")
        elif self._size_bytes:
            upload = "transcribing"
        if self._files > 1:
            return (f"{_bar(self._done / self._files)} {self._done}/{self._files} files  "
                    f"{self._name} {upload}")
        share = self._sent_bytes / self._size_bytes if self._size_bytes else 0.0
        return f"{self._name} {_bar(share)} {upload}"


def _bar(share: float) -> str:
    filled = round(min(max(share, 0.0), 1.0) * _BAR_CELLS)
    return "[" + "#" * filled + "-" * (_BAR_CELLS - filled) + "]"


if __name__ == "__main__":
    sys.exit(main())
