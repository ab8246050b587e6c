"""``sttd serve --workers N``: N server processes on one host:port, each its own trio loop.

Theory of operation. The supervisor (this module, in the process the user started) does no
serving. It reserves the port (a socket bound with SO_REUSEPORT and never listened on, so the
kernel hands it no connections: with ``STT_PORT=0`` this is how the port is chosen), then starts
N workers, each an ordinary ``sttd serve`` process with:

* ``STTD_WORKER=i/N``: it binds the same host:port with SO_REUSEPORT (hypercorn does, given
  ``workers`` > 1), so the kernel spreads new connections over the workers;
* its share of the machine: ``STT_MAX_SESSIONS`` split (rounded up) and, unless set,
  ``STT_INFERENCE_LANES`` and ``STT_WHISPER_CPU_THREADS`` so that the workers' lanes together
  use the cores once (a whisper worker loads its own model; with ``remote`` every worker
  shares the upstream engines);
* ``PROMETHEUS_MULTIPROC_DIR``: a directory this supervisor made, where every worker's metrics
  live, so a scrape of ``/metrics`` on any worker counts all of them (prometheus-client's
  multiprocess mode).

SIGTERM or SIGINT is passed to every worker, which drains as a single server does (its open
sessions get their finals and 1001), and the supervisor exits once all have, with the worst
exit status. A worker that dies on its own is started again after a pause, unless it failed at
start-up (a bad setting fails every worker the same way: the supervisor then stops them all).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from types import FrameType

import attrs

from sttd.settings import WORKER_ENV, Settings

__all__ = ["WORKER_ENV", "resolve_workers", "run_workers", "worker_index", "worker_settings_env"]

log = logging.getLogger(__name__)

_RESTART_PAUSE_S = 1.0
# A worker that exits sooner than this after its start failed starting: do not restart it.
_START_GRACE_S = 5.0


def resolve_workers(settings: Settings) -> int:
    """Worker processes `settings` ask for: ``auto`` is one per core this process may use."""
    if settings.workers == "auto":
        return max(len(os.sched_getaffinity(0)), 1)
    return int(settings.workers)


def worker_index(env: Mapping[str, str]) -> tuple[int, int] | None:
    """(i, N) when this process is worker i of N, else None."""
    raw = env.get(WORKER_ENV)
    if not raw:
        return None
    index, _, count = raw.partition("/")
    return int(index), int(count)


def worker_settings_env(settings: Settings, env: Mapping[str, str], count: int, port: int,
                        cores: int) -> dict[str, str]:
    """The ``STT_*`` environment of each of `count` workers: the same settings, with the port
    chosen, the session cap split, and the cores shared out where the user left it to us."""
    out = dict(env)
    out["STT_PORT"] = str(port)
    out["STT_WORKERS"] = "1"
    if settings.max_sessions:
        out["STT_MAX_SESSIONS"] = str(math.ceil(settings.max_sessions / count))
    if settings.backend in ("whisper", "auto"):
        # One single-threaded whisper call per core, the cores shared out among the workers.
        if settings.inference_lanes == 0:
            out["STT_INFERENCE_LANES"] = str(max(cores // count, 1))
        if settings.whisper_cpu_threads == 0:
            out["STT_WHISPER_CPU_THREADS"] = "1"
    return out


@attrs.define
class _Worker:
    index: int
    process: subprocess.Popen[bytes]
    started_at: float


def _reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to host:port with SO_REUSEPORT and never listened on: it holds the port
    (and picks one for port 0) while the workers bind it too."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host.strip("[]"), port))
    return sock


def run_workers(settings: Settings, count: int) -> int:
    """Supervise `count` workers until they have all stopped; their worst exit status."""
    cores = max(len(os.sched_getaffinity(0)), 1)
    reserved = _reserve_port(settings.host, settings.port)
    port = reserved.getsockname()[1]
    metrics_dir = tempfile.mkdtemp(prefix="sttd-metrics-")
    base = worker_settings_env(settings, os.environ, count, port, cores)
    base["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    stopping = False

    def start(index: int) -> _Worker:
        env = {**base, WORKER_ENV: f"{index}/{count}"}
        process = subprocess.Popen([sys.executable, "-m", "sttd.cli", "serve"], env=env)
        log.info("workers.started worker=%d pid=%d", index, process.pid)
        return _Worker(index, process, time.monotonic())

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for worker in workers.values():
            if worker.process.poll() is None:
                worker.process.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    log.info("workers.listening host=%s port=%d workers=%d", settings.host, port, count)
    workers: dict[int, _Worker] = {}
    for index in range(count):
        worker = start(index)
        workers[worker.process.pid] = worker
    worst = 0
    try:
        while workers:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            except InterruptedError:  # a signal came: forward() ran; wait again
                continue
            if pid not in workers:
                continue
            worker = workers.pop(pid)
            _mark_dead(pid, metrics_dir)
            code = os.waitstatus_to_exitcode(status)
            worst = max(worst, code if code >= 0 else 1)
            log.info("workers.exited worker=%d pid=%d code=%d", worker.index, pid, code)
            if stopping:
                continue
            if time.monotonic() - worker.started_at < _START_GRACE_S and code != 0:
                log.error("workers.failed_to_start worker=%d code=%d: stopping", worker.index,
                          code)
                forward(signal.SIGTERM, None)
                continue
            time.sleep(_RESTART_PAUSE_S)
            replacement = start(worker.index)
            workers[replacement.process.pid] = replacement
    finally:
        reserved.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return worst


def _mark_dead(pid: int, metrics_dir: str) -> None:
    """Drop a dead worker's live gauges from the shared metrics (its counters stay counted)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, metrics_dir)  # type: ignore[no-untyped-call]
