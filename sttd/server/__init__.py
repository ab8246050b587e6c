"""Server start-up: load the engine, serve the app on one port with hypercorn's trio worker,
and drain on SIGTERM (see `serve`)."""

from sttd.server._serve import serve, wait_for_signal

__all__ = ["serve", "wait_for_signal"]
