"""The ``sttd`` command: ``serve`` runs the server; ``stream`` and ``transcribe`` are its client.

This module parses the command line and imports only what the chosen command needs: ``serve``
the server (`sttd.server`: hypercorn, quart, the backends), ``stream`` and ``transcribe`` the
client (`sttd.client`, whose private ``_cli`` module runs them). ``sttd --help`` and the client
commands never load the server.

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
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Final

__all__ = ["main"]

# "sttd", not __name__: run as ``python -m sttd.cli`` this module is ``__main__``, and the
# server's log configuration is for the "sttd" tree.
log = logging.getLogger("sttd")

URL_ENV: Final = "STTD_URL"
API_KEY_ENV: Final = "STTD_API_KEY"
DEFAULT_URL: Final = "http://127.0.0.1:8000"
# --format -> (the API's response_format, the output file's suffix)
_FORMATS: Final = {"txt": ("text", ".txt"), "json": ("verbose_json", ".json"),
                   "srt": ("srt", ".srt"), "vtt": ("vtt", ".vtt")}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sttd`` console script (and of ``python -m sttd``)."""
    parser = _parser(os.environ)
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args.workers)
    if args.command == "stream":
        if args.mic == (args.file is not None):
            parser.error("stream takes one of FILE, - (stdin) or --mic")
        if args.fast and (args.mic or args.file == "-"):
            parser.error("--fast applies to a FILE; stdin and the microphone are sent as they "
                         "come")
    from sttd.client import http_base_url
    from sttd.client._cli import stream, transcribe

    try:
        http_base_url(args.url)
    except ValueError as exc:
        parser.error(f"--url (or {URL_ENV}): {exc}")
    hotwords = tuple(word.strip() for word in args.hotwords.split(",") if word.strip())
    try:
        if args.command == "stream":
            return stream(file=args.file, fast=args.fast, as_json=args.json, url=args.url,
                          api_key=args.api_key, language=args.language, hotwords=hotwords)
        response_format, suffix = _FORMATS[args.format]
        return transcribe(files=[Path(name) for name in args.files], out=args.out,
                          response_format=response_format, suffix=suffix, url=args.url,
                          api_key=args.api_key, language=args.language, hotwords=hotwords)
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


def _consists_of(exc: BaseException, kind: type[BaseException]) -> bool:
    """Whether `exc` is a `kind`, or a group of nothing else."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(kind)[1] is None
    return isinstance(exc, kind)


def _parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sttd", description="Real-time speech-to-text server, and a client for it.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve", help="run the server (settings from STT_* environment variables)")
    serve.add_argument("--workers", metavar="N",
                       help="server processes on the one port: a count, or auto for one per "
                            "core (default: $STT_WORKERS, else 1)")

    stream = commands.add_parser(
        "stream", help="stream audio to a server and print its transcripts",
        description="Stream a file, stdin or the microphone over one WebSocket session. On a "
                    "terminal the live partial is shown on one line and each final is printed "
                    "with its start time; piped, only the finals' text is printed, one per line.")
    stream.add_argument("file", nargs="?", metavar="FILE",
                        help="an audio file (WAV, or any format FFmpeg decodes), or - for raw "
                             "PCM16 little-endian 16 kHz mono on stdin, sent as it arrives")
    stream.add_argument("--mic", action="store_true",
                        help="capture the microphone until Ctrl-C (needs the mic extra: "
                             "uv sync --extra mic)")
    stream.add_argument("--fast", action="store_true",
                        help="send FILE as fast as the server takes it, not in real time")
    stream.add_argument("--json", action="store_true",
                        help="print each final as a JSON line (the server's message)")
    _client_options(stream, environ)

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
    return parser


def _client_options(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
    parser.add_argument("--url", default=environ.get(URL_ENV) or DEFAULT_URL,
                        help=f"the server: http(s)://host:port (default: ${URL_ENV} or "
                             f"{DEFAULT_URL})")
    parser.add_argument("--api-key", default=environ.get(API_KEY_ENV) or None, metavar="KEY",
                        help=f"bearer key, where the server needs one (default: ${API_KEY_ENV})")
    parser.add_argument("--language", default=None, metavar="L",
                        help="BCP-47 code such as en (default: the server detects it)")
    parser.add_argument("--hotwords", default="", metavar="A,B",
                        help="comma-separated words or phrases to favour")


def _serve(workers: str | None = None) -> int:
    """Run the server until SIGTERM or SIGINT (settings from ``STT_*``; `workers` is
    ``--workers``, which overrides STT_WORKERS)."""
    from sttd.settings import WORKER_ENV

    # A worker of `--workers N` takes its stop signal from the very start (see _catch_stop_signals).
    caught = _catch_stop_signals() if os.environ.get(WORKER_ENV) else None

    import trio

    from sttd.errors import ConfigError, SttdError
    from sttd.logs import configure_logging
    from sttd.server import (
        report_ready,
        resolve_workers,
        run_workers,
        serve,
        wait_for_signal,
        worker_role,
    )
    from sttd.settings import Settings

    env = dict(os.environ)
    if workers is not None:
        env["STT_WORKERS"] = workers
    try:
        settings = Settings.from_env(env)
    except SttdError as exc:
        _say(f"sttd: {exc}")
        return 2
    role = worker_role(os.environ)
    configure_logging(settings.log_level, settings.log_format,
                      worker=None if role is None else role.index)
    if role is None and resolve_workers(settings) > 1:
        try:
            return run_workers(settings, resolve_workers(settings))
        except ConfigError as exc:  # the port cannot be had
            log.error("server.failed error=%s", type(exc).__name__)
            _say(f"sttd: {exc}")
            return 2
    failures: list[SttdError] = []
    try:
        trio.run(partial(serve, settings,
                         shutdown_trigger=partial(wait_for_signal, caught=caught or ()),
                         workers=1 if role is None else role.count,
                         on_ready=None if role is None else partial(report_ready, role)))
    except* SttdError as group:
        failures.extend(exc for exc in group.exceptions if isinstance(exc, SttdError))
    for failure in failures:
        log.error("server.failed error=%s", type(failure).__name__)
        _say(f"sttd: {failure}")
    if failures:
        # A setting found wrong only once the server starts (a key file, a model path, a port
        # in use) is a configuration error like one found while parsing: exit 2 as for those.
        return 2 if any(isinstance(failure, ConfigError) for failure in failures) else 1
    log.info("server.stopped")
    return 0


def _catch_stop_signals() -> list[int]:
    """From now on, SIGINT and SIGTERM only add themselves to the list returned, which
    `wait_for_signal` reads.

    For a worker of ``sttd serve --workers``, whose supervisor sends it one SIGTERM (and the
    kernel one more if the supervisor dies): one that comes while the worker is still importing
    or loading is kept until the server waits for it (it would kill the worker), and one after
    the first does not cut the drain short (trio's receiver, once closed, restores this
    handler).
    """
    import signal
    from types import FrameType

    caught: list[int] = []

    def record(signum: int, _frame: FrameType | None) -> None:
        caught.append(signum)

    signal.signal(signal.SIGINT, record)
    signal.signal(signal.SIGTERM, record)
    return caught


def _say(text: str) -> None:
    """A line for the user on stderr (not a log record: the command's own output)."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main())
