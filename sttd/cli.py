"""The ``sttd`` command."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from functools import partial

import trio

from sttd.errors import ConfigError, SttdError
from sttd.logs import configure_logging
from sttd.server import serve, wait_for_signal
from sttd.settings import Settings

__all__ = ["main"]

log = logging.getLogger("sttd")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sttd`` console script."""
    parser = argparse.ArgumentParser(prog="sttd", description="Real-time speech-to-text server.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "serve", help="run the server (settings from STT_* environment variables)")
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve()
    parser.error(f"unknown command {args.command}")
    return 2


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


if __name__ == "__main__":
    sys.exit(main())
