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

Stopping. The supervisor's signal handlers do nothing but wake it (Python's wakeup fd): it
reads the signals in the loop that starts and reaps workers, so none can fall between a check
and an action there (a handler acting at once could run between a check and a start).
SIGTERM, SIGINT or SIGHUP (the terminal closed) makes it stop: it starts no worker from then on,
sends SIGTERM once to every live worker, which drains as a single server does (its open
sessions get their finals and 1001), and exits once all have. Its exit status is that of the
stop: 0 when every worker exited cleanly on it. A second signal while stopping kills every live
worker at once, as a second Ctrl-C stops a single server at once.

Each worker runs in its own session, so a terminal's Ctrl-C (sent to its whole foreground
process group) reaches the supervisor only, and each worker gets one stop signal. A worker
must not outlive its supervisor (it would keep serving the port with nobody to stop it): on
Linux it asks the kernel for SIGTERM when the supervisor dies (``PR_SET_PDEATHSIG``), and then
drains and exits.

Restarts. A worker tells the supervisor it is ready (its engine loaded) by writing one byte to
a pipe (`report_ready`). A worker of the initial start that exits with an error before it was
ready failed at start-up: a bad setting or model fails every worker the same way, so the
supervisor then stops them all. Any other worker that exits on its own is started again after
a pause, which doubles (up to 30 s) while that worker keeps exiting before it is ready.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from types import FrameType

import attrs

from sttd.server._serve import cannot_listen
from sttd.settings import WORKER_ENV, Settings

__all__ = ["WORKER_ENV", "WorkerRole", "report_ready", "resolve_workers", "run_workers",
           "worker_role", "worker_settings_env"]

log = logging.getLogger(__name__)

# The write end of a worker's readiness pipe, in its environment (see `report_ready`).
_READY_FD_ENV = "STTD_WORKER_READY_FD"
_RESTART_PAUSE_S = 1.0
_RESTART_PAUSE_MAX_S = 30.0
_STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
# What wakes the supervisor: a stop signal, or a worker that exited.
_AWAITED = _STOP_SIGNALS | {signal.SIGCHLD}
_WAKEUP_READ_BYTES = 256
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@attrs.frozen
class WorkerRole:
    """This process is worker `index` of `count`; it reports readiness on `ready_fd`."""

    index: int
    count: int
    ready_fd: int | None


def resolve_workers(settings: Settings) -> int:
    """Worker processes `settings` ask for: ``auto`` is one per core this process may use."""
    if settings.workers == "auto":
        return max(len(os.sched_getaffinity(0)), 1)
    return int(settings.workers)


def worker_role(env: Mapping[str, str]) -> WorkerRole | None:
    """This process's role when it is one of a supervisor's workers, else None."""
    raw = env.get(WORKER_ENV)
    if not raw:
        return None
    index, _, count = raw.partition("/")
    ready_fd = env.get(_READY_FD_ENV)
    return WorkerRole(int(index), int(count), None if not ready_fd else int(ready_fd))


def report_ready(role: WorkerRole) -> None:
    """Tell the supervisor that this worker is ready (its engine loaded); closes the pipe."""
    if role.ready_fd is None:
        return
    try:
        os.write(role.ready_fd, b"r")
    except BrokenPipeError:
        pass  # the supervisor is gone: the parent-death signal stops this worker
    finally:
        os.close(role.ready_fd)


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


def run_workers(settings: Settings, count: int) -> int:
    """Supervise `count` workers until a stop signal and until they have all exited.

    Returns the exit status of the stop (see the module docstring): 0 when every worker exited
    cleanly on it; a worker's status (1 for one killed) otherwise, or when one failed at
    start-up. Raises `ConfigError` when the port cannot be had.
    """
    cores = max(len(os.sched_getaffinity(0)), 1)
    reserved = _reserve_port(settings.host, settings.port)
    port = reserved.getsockname()[1]
    metrics_dir = tempfile.mkdtemp(prefix="sttd-metrics-")
    base = worker_settings_env(settings, os.environ, count, port, cores)
    base["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    wakeup_fd, wakeup_write_fd = os.pipe()
    os.set_blocking(wakeup_fd, False)
    os.set_blocking(wakeup_write_fd, False)
    # From here on, these signals only write their number to the pipe, from whichever thread
    # they hit (numpy's BLAS threads are there too), for `_Supervisor.run` to read.
    previous_fd = signal.set_wakeup_fd(wakeup_write_fd, warn_on_full_buffer=False)
    previous = {signum: signal.signal(signum, _wake_only) for signum in _AWAITED}
    try:
        log.info("workers.listening host=%s port=%d workers=%d", settings.host, port, count)
        supervisor = _Supervisor(count=count, env=base, metrics_dir=metrics_dir,
                                 wakeup_fd=wakeup_fd, in_child=_child_setup())
        return supervisor.run()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        signal.set_wakeup_fd(previous_fd)
        os.close(wakeup_fd)
        os.close(wakeup_write_fd)
        reserved.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _wake_only(_signum: int, _frame: FrameType | None) -> None:
    """The supervisor's signal handler: the wakeup fd has the signal already."""


@attrs.define
class _Worker:
    index: int
    process: subprocess.Popen[bytes]
    ready_fd: int  # read end of the worker's readiness pipe, non-blocking
    initial: bool  # started as part of the initial start, not as a replacement
    signalled: bool = False

    def was_ready(self) -> bool:
        """Whether the worker, now exited, had reported ready; closes its pipe."""
        try:
            return os.read(self.ready_fd, 1) == b"r"
        except BlockingIOError:  # not written to, and held open by a child of the worker
            return False
        finally:
            os.close(self.ready_fd)


@attrs.define
class _Supervisor:
    """Starts, restarts and stops the workers; owns their processes (see the module docstring)."""

    count: int
    env: dict[str, str]
    metrics_dir: str
    wakeup_fd: int  # a signal number per byte (`signal.set_wakeup_fd`), non-blocking
    in_child: Callable[[], None]
    _workers: dict[int, _Worker] = attrs.field(factory=dict)  # by pid
    _due: dict[int, float] = attrs.field(factory=dict)  # index -> when to start it (monotonic)
    _pause_s: dict[int, float] = attrs.field(factory=dict)  # index -> its next restart pause
    _stopping: bool = False
    _status: int = 0

    def run(self) -> int:
        """Run until stopped and every worker has exited; the exit status."""
        now = time.monotonic()
        self._due = {index: now for index in range(self.count)}
        initial = set(self._due)
        while True:
            self._reap()
            if not self._workers and not self._due:
                return self._status
            timeout_s: float | None = None  # None: until a signal comes
            if self._due:
                index = min(self._due, key=self._due.__getitem__)
                timeout_s = max(self._due[index] - time.monotonic(), 0.0)
                if timeout_s == 0.0:
                    # Start one, then take any signal that came meanwhile before the next.
                    del self._due[index]
                    self._start(index, initial=index in initial)
                    initial.discard(index)
            for signum in self._wait_signals(timeout_s):
                if signum in _STOP_SIGNALS:
                    self._stop(signal.Signals(signum).name)

    def _wait_signals(self, timeout_s: float | None) -> bytes:
        """The signals that came, waiting for one for at most `timeout_s` (None: no limit)."""
        select.select([self.wakeup_fd], [], [], timeout_s)
        try:
            return os.read(self.wakeup_fd, _WAKEUP_READ_BYTES)
        except BlockingIOError:  # the time ran out
            return b""

    def _start(self, index: int, *, initial: bool) -> None:
        read_fd, write_fd = os.pipe()
        env = {**self.env, WORKER_ENV: f"{index}/{self.count}", _READY_FD_ENV: str(write_fd)}
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "sttd.cli", "serve"], env=env, pass_fds=(write_fd,),
                start_new_session=True, preexec_fn=self.in_child)
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        os.set_blocking(read_fd, False)
        self._workers[process.pid] = _Worker(index, process, read_fd, initial)
        log.info("workers.started worker=%d pid=%d", index, process.pid)

    def _stop(self, cause: str) -> None:
        """Start no worker from now on; send SIGTERM to each live worker not yet sent one.

        Stopping already: the user asks a second time (a second Ctrl-C), as a single server
        takes it: stop at once. Each live worker is killed (a worker hung where its drain
        cannot reach would otherwise hold the port until someone found its pid).
        """
        if self._stopping:
            live = [w for w in self._workers.values() if w.process.returncode is None]
            log.warning("workers.killing cause=%s workers=%d", cause, len(live))
            for worker in live:
                worker.process.kill()
            return
        log.info("workers.stopping cause=%s", cause)
        self._stopping = True
        self._due.clear()
        for worker in self._workers.values():
            if worker.process.returncode is None:
                worker.process.send_signal(signal.SIGTERM)
                worker.signalled = True

    def _reap(self) -> None:
        for pid, worker in list(self._workers.items()):
            code = worker.process.poll()
            if code is None:
                continue
            del self._workers[pid]
            ready = worker.was_ready()
            _mark_dead(pid, self.metrics_dir)
            log.info("workers.exited worker=%d pid=%d code=%d ready=%s", worker.index, pid,
                     code, ready)
            if self._stopping:
                # Killed by our SIGTERM: it came before the worker caught it, so there was
                # nothing to drain yet.
                if code != 0 and not (worker.signalled and code == -signal.SIGTERM):
                    self._status = max(self._status, _exit_status(code))
            elif worker.initial and not ready and code != 0:
                log.error("workers.failed_to_start worker=%d code=%d", worker.index, code)
                self._status = _exit_status(code)
                self._stop("failed_to_start")
            else:
                pause_s = _RESTART_PAUSE_S if ready else self._pause_s.get(worker.index,
                                                                           _RESTART_PAUSE_S)
                self._pause_s[worker.index] = min(pause_s * 2, _RESTART_PAUSE_MAX_S)
                self._due[worker.index] = time.monotonic() + pause_s
                log.info("workers.restarting worker=%d pause_s=%g", worker.index, pause_s)


def _exit_status(code: int) -> int:
    """A process's exit status from its Popen return code (1 for one killed by a signal)."""
    return code if code > 0 else 1


def _child_setup() -> Callable[[], None]:
    """What a worker runs between fork and exec: on Linux, ask for SIGTERM when the
    supervisor dies."""
    supervisor = os.getpid()
    prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None

    def in_child() -> None:
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
            if os.getppid() != supervisor:  # it died before the request: the signal never comes
                os._exit(1)

    return in_child


def _reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to host:port with SO_REUSEPORT and never listened on: it holds the port
    (and picks one for port 0) while the workers bind it too.

    Raises `ConfigError` when the port is held already, by any server: another sttd's workers
    included, which would otherwise share it with these.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    address = host.strip("[]")
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # Bound first without SO_REUSEPORT, which fails where anyone listens on the port.
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((address, port))
            port = probe.getsockname()[1]
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((address, port))
    except OSError as exc:
        sock.close()
        raise cannot_listen(host, port, exc) from None
    return sock


def _mark_dead(pid: int, metrics_dir: str) -> None:
    """Drop a dead worker's live gauges from the shared metrics (its counters stay counted)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, metrics_dir)  # type: ignore[no-untyped-call]
