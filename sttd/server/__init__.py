"""Server start-up: load the engine, serve the app on one port with hypercorn's trio worker,
and drain on SIGTERM (see `serve`)."""

from sttd.server._serve import serve, wait_for_signal
from sttd.server._workers import (
    WorkerRole,
    report_ready,
    resolve_workers,
    run_workers,
    worker_role,
)

__all__ = ["WorkerRole", "report_ready", "resolve_workers", "run_workers", "serve",
           "wait_for_signal", "worker_role"]
