"""Run the server: load the engine, serve the app with hypercorn's trio worker, drain on a signal.

Shutdown. When `serve`'s trigger returns (the CLI's is SIGINT or SIGTERM), the server drains
first: /health turns 503, new sessions and uploads are refused, every session finalizes its open
utterance, sends the final and closes 1001, and uploads in flight finish, for at most
STT_DRAIN_S. Then hypercorn shuts down, giving what is left STT_SHUTDOWN_GRACE_S.
"""

from __future__ import annotations

import logging
import signal
import socket
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from io import BytesIO, StringIO
from typing import Any

import trio
from hypercorn.config import Config, Sockets
from hypercorn.protocol import ws_stream
from hypercorn.trio import tcp_server
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app
from hypercorn.typing import (
    ASGIFramework,
    ASGIReceiveCallable,
    ASGISendCallable,
    ASGISendEvent,
    Scope,
)
from prometheus_client import CollectorRegistry
from wsproto.events import Message, TextMessage

from sttd.admission import AppState
from sttd.backends import load_backend
from sttd.engine import Engine, VadBatcher
from sttd.errors import ConfigError
from sttd.http import create_app
from sttd.metrics import Metrics
from sttd.server._threads import limit_blas_threads
from sttd.settings import Settings
from sttd.vad import silero_model

__all__ = ["cannot_listen", "serve", "wait_for_signal"]

log = logging.getLogger(__name__)

# Bound on finishing a response once its last byte is handed over (see `_FinishResponses`).
_RESPONSE_END_TIMEOUT_S = 5.0


async def serve(
    settings: Settings,
    *,
    state: AppState | None = None,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    workers: int = 1,
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Serve HTTP and WebSocket on ``settings.host:settings.port`` until cancelled or triggered.

    `state` (built from `settings` with a fresh registry if omitted) lets a caller watch the
    server's sessions and metrics. Calls ``task_status.started(port)`` once listening (the
    engine may still be loading: /health says 503 until it is ready), and `on_ready` once the
    engine is. When `shutdown_trigger`
    returns, drains (see the module docstring) and returns after a graceful shutdown. Raises
    `ConfigError` for a bad STT_API_KEYS_FILE, and `ConfigError` or `BackendError` if the engine
    cannot load.
    """
    limit_blas_threads()  # the engine's lanes are the parallelism: see sttd.server._threads
    if state is None:
        state = AppState(settings, Metrics.create(CollectorRegistry()))
    state.metrics.watch_queues(state.sessions.queue_depths)
    state.metrics.watch_engine(lambda: None if state.engine is None else state.engine.load())
    app = create_app(state)
    config = Config()
    config.bind = [f"{settings.host}:{settings.port}"]
    # One of several worker processes on this port (sttd.server._workers): hypercorn then binds
    # it with SO_REUSEPORT, and the kernel spreads connections over the workers.
    config.workers = workers
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = settings.shutdown_grace_s
    # hypercorn's idle timer runs from a connection's start until its request headers are in
    # (and between kept-alive requests): a client stalling in its headers is closed after this.
    # Upload bodies are paced by `sttd.admission.read_upload`; a WebSocket is bounded by its
    # session's idle timeout.
    config.keep_alive_timeout = settings.http_read_timeout_s
    config.websocket_max_message_size = settings.max_message_bytes
    _bound_websocket_messages()
    _close_when_the_client_does()
    trigger = None if shutdown_trigger is None else partial(_drain_after, shutdown_trigger, state)
    loaded: list[Engine] = []  # the engine, as soon as it exists: closed on the way out
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_load_engine, state, nursery, loaded, on_ready)
            await worker_serve(wrap_app(_FinishResponses(app), config.wsgi_max_body_size, "asgi"),
                               config, sockets=_listening_sockets(config, settings),
                               shutdown_trigger=trigger,
                               task_status=_PortStatus(task_status, settings.host))
            # The server has shut down; an engine still loading is of no use now.
            nursery.cancel_scope.cancel()
    finally:
        for engine in loaded:
            await engine.aclose()  # vLLM's engine process, pooled HTTP connections


def _listening_sockets(config: Config, settings: Settings) -> Sockets:
    """hypercorn's sockets for `config`, listening, each connection's unsent data bounded.

    hypercorn writes to a connection with its send shielded from cancellation, so a client
    that stops reading (its receive window at zero) held the session's send, its
    STT_SEND_TIMEOUT_S included, and a drain, for as long as the client lived. Linux's
    TCP_USER_TIMEOUT, inherited by the connections a socket accepts, makes the kernel drop a
    connection whose data stayed unacknowledged or unsent that long: the stuck send then
    fails, and the session ends. (It also ends a connection to a peer that vanished without a
    FIN, which retransmissions would otherwise keep for about 15 minutes.)
    """
    try:
        sockets = config.create_sockets()
    except OSError as exc:
        raise cannot_listen(settings.host, settings.port, exc) from None
    for sock in (*sockets.secure_sockets, *sockets.insecure_sockets):
        if hasattr(socket, "TCP_USER_TIMEOUT"):  # Linux
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                            max(round(settings.send_timeout_s * 1000), 1))
        sock.listen(config.backlog)
    return sockets


def cannot_listen(host: str, port: int, exc: OSError) -> ConfigError:
    """The start-up error for a host:port that cannot be bound (`exc` from the bind)."""
    return ConfigError(f"cannot listen on STT_HOST={host} STT_PORT={port}: "
                       f"{exc.strerror or exc}; expected a free port on an address of this host")


async def _drain_after(trigger: Callable[[], Awaitable[None]], state: AppState) -> None:
    """Wait for `trigger`, then drain for at most STT_DRAIN_S; hypercorn shuts down after.

    This is hypercorn's shutdown trigger, so hypercorn keeps serving while it runs: /health
    says draining, and the sessions' last finals and close frames go out.
    """
    await trigger()
    drain_s = state.settings.drain_s
    log.info("server.draining sessions=%d uploads=%d drain_s=%g",
             len(state.sessions), state.uploads, drain_s)
    state.begin_drain()
    with trio.move_on_after(drain_s):
        await state.wait_drained()
    log.info("server.drained sessions_left=%d uploads_left=%d", len(state.sessions), state.uploads)


class _BoundedWebsocketBuffer(ws_stream.WebsocketBuffer):
    """hypercorn's WebSocket message buffer, keeping one unit past the limit instead of failing.

    hypercorn's own buffer raises past ``websocket_max_message_size``, and hypercorn 0.18 then
    sends close 1009 behind the app's back: the session is not told (its pending finals are
    lost), the rest of that read is not parsed (a client's close frame in it goes unanswered and
    the connection hangs), and the oversized data stays buffered, so that a next message of the
    other type raises TypeError in the connection handler and stops the whole server. This
    buffer holds at most max_length + 1 units of a message (memory stays bounded the same way)
    and hands the app a message it can tell is too long; the session then ends in band:
    finals first, then ``payload_too_large`` and close 1009.
    """

    def extend(self, event: Message[Any]) -> None:
        if self.value is None:
            self.value = StringIO() if isinstance(event, TextMessage) else BytesIO()
        room = self.max_length + 1 - self.length
        if room > 0:
            # wsproto gives every frame of one message the same type as its first.
            self.length += self.value.write(event.data[:room])


class _FinishResponses:
    """ASGI middleware: an HTTP response's last message is sent shielded, for a bounded time.

    hypercorn finishes a connection's request cycle inside the app's send of the last body
    message: it tells the app the request is over, then restarts the keep-alive timer or, for a
    ``Connection: close`` response, closes the socket. Telling quart-trio the request is over
    makes it cancel the very task doing that send, so the cycle stopped half way and the
    connection was never closed nor timed out: a client could hold it forever after one request
    (a kept-alive idle one, or one whose body was refused unread). Shielding lets it finish.
    """

    def __init__(self, app: ASGIFramework) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: ASGIReceiveCallable,
                       send: ASGISendCallable) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return

        async def send_finishing(message: ASGISendEvent) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                with trio.move_on_after(_RESPONSE_END_TIMEOUT_S, shield=True):
                    await send(message)
            else:
                await send(message)

        await self._app(scope, receive, send_finishing)


def _bound_websocket_messages() -> None:
    """Install `_BoundedWebsocketBuffer` for every WebSocket hypercorn accepts from now on."""
    ws_stream.WebsocketBuffer = _BoundedWebsocketBuffer  # type: ignore[misc]  # hypercorn has no hook for this; it builds one buffer per stream by this name


async def _read_then_stop_idling(self: tcp_server.TCPServer) -> None:
    """hypercorn's read loop, then the connection's keep-alive timer stopped: nothing more can
    come from a client that closed its end, and the connection closes once its tasks end.

    hypercorn's connection waits for all its tasks before it closes the socket, and the
    keep-alive timer is one of them: a client that closed an idle kept-alive connection (any
    HTTP client ending its session: curl, an SDK, httpx) left the socket in CLOSE-WAIT, its
    file descriptor held, for the whole STT_HTTP_READ_TIMEOUT_S (30 s); 34 such requests a
    second would hold 1000 descriptors, the usual limit. (The timer runs because
    `_FinishResponses` lets the request's cycle finish; before, a cycle cut short left no timer,
    and such a connection was never closed at all while its client kept it.)
    """
    await _hypercorn_read_data(self)
    await self.idle_task.stop()


_hypercorn_read_data = tcp_server.TCPServer._read_data


def _close_when_the_client_does() -> None:
    """Install `_read_then_stop_idling` for every connection hypercorn accepts from now on."""
    tcp_server.TCPServer._read_data = _read_then_stop_idling  # type: ignore[method-assign]  # hypercorn has no hook for this


class _PortStatus:
    """Reports the bound port from hypercorn's list of bind URLs."""

    def __init__(self, status: trio.TaskStatus[int], host: str) -> None:
        self._status = status
        self._host = host

    def started(self, binds: list[str] | None = None) -> None:
        if not binds:
            raise RuntimeError("hypercorn reported no bound address")
        port = int(binds[0].rsplit(":", 1)[1])
        log.info("server.listening host=%s port=%d", self._host, port)
        self._status.started(port)


async def _load_engine(state: AppState, nursery: trio.Nursery, loaded: list[Engine],
                       on_ready: Callable[[], None] | None) -> None:
    started = trio.current_time()
    settings = state.settings
    backend = await trio.to_thread.run_sync(load_backend, settings)
    engine = Engine.from_settings(backend, settings, state.metrics)
    loaded.append(engine)
    if settings.vad == "silero":
        model = await trio.to_thread.run_sync(silero_model)  # once, so no session waits for it
        vad = VadBatcher(model)
        await nursery.start(vad.run)
        state.vad = vad
    await engine.calibrate()  # what calls cost on this machine, before the first session
    await nursery.start(engine.run)
    state.engine = engine
    state.metrics.engine_ready.set(1)
    state.engine_loaded.set()
    if on_ready is not None:
        on_ready()  # before the line, which whoever reads it may act on (tests kill a worker)
    log.info("engine.ready backend=%s load_s=%.2f", backend.name, trio.current_time() - started)


async def wait_for_signal(*, caught: Sequence[int] = ()) -> None:
    """Return at the first SIGINT or SIGTERM, or at once if `caught` holds one already.

    `caught` holds the stop signals a handler recorded before `trio.run` (a worker's: see
    ``sttd.cli``).
    """
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        if caught:
            signum = caught[0]
        else:
            signum = await signals.__anext__()
        log.info("server.stopping signal=%s", signal.Signals(signum).name)

