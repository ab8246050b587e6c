"""The quart-trio app: the file APIs (ours and OpenAI's), the WebSocket route, /health, /metrics.

Every /v1/* request passes the access policy (`sttd.auth`) first; CORS headers are added to
every response. While the server drains (`SessionRegistry.draining`), /health answers 503 and
new sessions and uploads are refused with ``shutting_down``; `AppState.wait_drained` lets the
server wait for the ones in flight.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator
from functools import partial
from typing import Any

import attrs
import trio
from hypercorn.utils import UnexpectedMessageError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from quart import Response, has_request_context, has_websocket_context, request, websocket
from quart_trio import QuartTrio
from werkzeug.datastructures import MultiDict
from werkzeug.exceptions import HTTPException, NotFound

from sttd.auth import Access, Cors
from sttd.engine import Engine
from sttd.errors import (
    BackendError,
    ClientError,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    ShuttingDown,
    Unauthorized,
)
from sttd.files import transcribe_file
from sttd.metrics import Metrics
from sttd import deepgram
from sttd.nursery import Session, SessionRegistry, Transport
from sttd.openai_api import TranscriptionForm, render
from sttd.uploads import read_multipart_file
from sttd.protocol import SessionParams, dumps, error_message, parse_hotwords, parse_language
from sttd.settings import Settings

__all__ = ["AppState", "create_app"]

log = logging.getLogger(__name__)


@attrs.define
class AppState:
    """What the routes share: settings, metrics, live sessions, and the engine once loaded."""

    settings: Settings
    metrics: Metrics
    sessions: SessionRegistry = attrs.field(factory=SessionRegistry)
    engine: Engine | None = None
    engine_loaded: trio.Event = attrs.field(factory=trio.Event)
    # Uploads being read or transcribed now, and a lot parked on their count.
    uploads: int = 0
    _uploads_changed: trio.lowlevel.ParkingLot = attrs.field(
        factory=trio.lowlevel.ParkingLot, repr=False)

    @property
    def draining(self) -> bool:
        return self.sessions.draining

    def begin_drain(self) -> None:
        """Refuse new sessions and uploads; tell every live session to finalize and close 1001."""
        self.sessions.begin_drain()

    async def wait_drained(self) -> None:
        """Wait until no session is live and no upload is in flight (call after `begin_drain`)."""
        await self.sessions.wait_count(0)
        while self.uploads:
            await self._uploads_changed.park()

    @contextlib.contextmanager
    def upload_in_flight(self) -> Iterator[None]:
        """Count an upload as in flight (for `wait_drained`) while the block runs."""
        self.uploads += 1
        try:
            yield
        finally:
            self.uploads -= 1
            self._uploads_changed.unpark_all()


class _QuartTransport:
    """Adapts quart's websocket object to the session's `Transport`, within a message limit.

    A message over `max_message_bytes` raises `PayloadTooLarge` from `receive`: the session then
    sends the finals of what it heard, the ``payload_too_large`` error and closes 1009.
    (server.py makes hypercorn hand such a message over cut to one byte past the limit, instead
    of closing the socket behind the session.)
    """

    def __init__(self, ws: Any, *, max_message_bytes: int, metrics: Metrics) -> None:
        self._ws = ws
        self._max_message_bytes = max_message_bytes
        self._metrics = metrics

    async def receive(self) -> bytes | str | None:
        data: bytes | str | None = await self._ws.receive()
        size = len(data.encode("utf-8", "replace") if isinstance(data, str) else data or b"")
        if size > self._max_message_bytes:
            log.info("session.message_too_large limit_bytes=%d", self._max_message_bytes)
            raise PayloadTooLarge(
                f"a WebSocket message must be at most {self._max_message_bytes} bytes "
                "(STT_MAX_MESSAGE_BYTES); send audio in smaller frames")
        return data

    async def send(self, text: str) -> None:
        try:
            await self._ws.send(text)
        except UnexpectedMessageError:
            # The client's close frame came in first: it is gone, and hypercorn's disconnect
            # event is about to cancel the session. Nothing can be delivered now.
            log.debug("session.send_after_client_close")

    async def close(self, code: int, reason: str = "") -> None:
        try:
            await self._ws.close(code, reason)
        except UnexpectedMessageError:
            log.debug("session.close_after_client_close")


class _PacedBody:
    """A request body that must keep coming: a gap over `timeout_s` raises `RequestTimeout`."""

    def __init__(self, body: AsyncIterable[bytes], *, timeout_s: float) -> None:
        self._chunks = aiter(body)
        self._timeout_s = timeout_s

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        with trio.move_on_after(self._timeout_s):
            return await anext(self._chunks)
        raise RequestTimeout(
            f"the request body stalled: nothing arrived for STT_HTTP_READ_TIMEOUT_S="
            f"{self._timeout_s:g} s")


def _error_response(status: int, code: str, message: str) -> Response:
    body = dumps({"error": {"code": code, "message": message}})
    response = Response(body, status=status, content_type="application/json")
    if status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    if request and request.method in ("POST", "PUT"):
        # The body may be unread: a kept-alive connection would read it as the next request.
        response.headers["Connection"] = "close"
    return response


def create_app(state: AppState) -> QuartTrio:
    """Build the app over `state`."""
    app = QuartTrio(__name__)
    app.config["MAX_CONTENT_LENGTH"] = state.settings.max_upload_bytes
    app.config["RESPONSE_TIMEOUT"] = None
    metrics = state.metrics
    settings = state.settings
    access = Access.from_settings(settings)
    cors = Cors.from_settings(settings)

    @app.before_request
    async def _guard() -> Response | None:
        if not request.path.startswith("/v1/"):
            return None
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            # A CORS preflight carries no credentials; its answer says what the browser may send.
            response = Response(b"", status=204)
            response.headers.update(cors.preflight_headers(request.headers.get("Origin")))
            return response
        if not access.allows_api(request.headers.get("Authorization")):
            raise Unauthorized("this API needs 'Authorization: Bearer <key>' with a valid key")
        return None

    @app.after_request
    async def _count(response: Response) -> Response:
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        metrics.http_requests_total.labels(route, str(response.status_code)).inc()
        response.headers.update(cors.response_headers(request.headers.get("Origin")))
        return response

    @app.errorhandler(ClientError)
    async def _client_error(exc: ClientError) -> Response:
        metrics.errors_total.labels(exc.code).inc()
        return _error_response(exc.http_status, exc.code, str(exc))

    @app.errorhandler(BackendError)
    async def _backend_error(exc: BackendError) -> Response:
        # A file request whose pieces the engine failed on (or that waited past
        # STT_INFERENCE_TIMEOUT_S): the engine's failure, not the server's; retrying may work.
        log.warning("http.%s path=%s", exc.code, _current_path(), exc_info=exc)
        metrics.errors_total.labels(exc.code).inc()
        return _error_response(exc.http_status, exc.code, str(exc))

    @app.errorhandler(HTTPException)
    async def _http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        code = {413: "payload_too_large", 404: "not_found", 405: "method_not_allowed"}.get(
            status, "bad_request" if status < 500 else "internal")
        message = exc.description or exc.name
        if status == 413:
            message = (f"request body must be at most {state.settings.max_upload_bytes} bytes "
                       "(STT_MAX_UPLOAD_BYTES)")
        metrics.errors_total.labels(code).inc()
        return _error_response(status, code, message)

    @app.errorhandler(Exception)
    async def _internal(exc: Exception) -> Response:
        # A WebSocket handler's exception comes here too, outside any request context.
        log.error("http.failed path=%s", _current_path(), exc_info=exc)
        metrics.errors_total.labels("internal").inc()
        return _error_response(500, "internal", "the server failed on this request; see its logs")

    @app.get("/health")
    async def health() -> Response:
        engine = state.engine
        body: dict[str, Any] = {"status": "ok",
                                "backend": engine.backend_name if engine is not None else None,
                                "sessions": len(state.sessions)}
        status = 200
        if state.draining:
            body["status"], status = "draining", 503
        elif engine is None:
            body["status"], status = "loading", 503
        elif (reason := engine.degraded()) is not None:
            # Still serving (other calls may go on), but an operator should look.
            body["status"], body["reason"] = "degraded", reason
        return Response(dumps(body), status=status, content_type="application/json")

    @app.get("/metrics")
    async def prometheus() -> Response:
        if not access.allows_metrics(request.headers.get("Authorization")):
            raise Unauthorized("/metrics needs 'Authorization: Bearer <STT_METRICS_TOKEN>'")
        return Response(generate_latest(metrics.registry), content_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/stt/transcribe")
    async def transcribe() -> Response:
        started = time.perf_counter()
        if state.draining:
            raise ShuttingDown("the server is shutting down; send the file to another instance")
        with state.upload_in_flight():
            return await _transcribe(started)

    def _check_length() -> None:
        length = request.content_length
        if length is not None and length > state.settings.max_upload_bytes:
            raise PayloadTooLarge(
                f"request body must be at most {state.settings.max_upload_bytes} bytes "
                f"(STT_MAX_UPLOAD_BYTES), got {length}")

    async def _transcribe(started: float) -> Response:
        _check_length()
        engine = _ready_engine(state)
        language = parse_language(request.args.get("language", "auto"))
        hotwords = parse_hotwords(request.args.get("hotwords", ""))
        engine.check_language(language)
        upload, _ = await read_multipart_file(
            _PacedBody(request.body, timeout_s=settings.http_read_timeout_s),
            request.mimetype, request.mimetype_params, field="file",
            max_bytes=state.settings.max_upload_bytes)
        with upload:
            result = await transcribe_file(
                engine, upload, state.settings, language=language, hotwords=hotwords)
        body = {
            "text": result.text,
            "duration_ms": round(result.duration_s * 1000),
            "latency_ms": round((time.perf_counter() - started) * 1000),
            "segments": [
                {"start_ms": segment.start_ms, "end_ms": segment.end_ms, "text": segment.text}
                for segment in result.segments
            ],
        }
        return Response(dumps(body), status=200, content_type="application/json")

    @app.get("/v1/models")
    async def models() -> Response:
        """OpenAI's model list: the one engine, under its backend's name."""
        engine = _ready_engine(state)
        body = {"object": "list", "data": [{"id": engine.backend_name, "object": "model",
                                            "created": 0, "owned_by": "sttd"}]}
        return Response(dumps(body), status=200, content_type="application/json")

    @app.post("/v1/audio/transcriptions")
    async def openai_transcriptions() -> Response:
        """OpenAI's transcription API, so that its SDKs work unchanged (`sttd.openai_api`)."""
        if state.draining:
            raise ShuttingDown("the server is shutting down; send the file to another instance")
        with state.upload_in_flight():
            _check_length()
            engine = _ready_engine(state)
            upload, fields = await read_multipart_file(
                _PacedBody(request.body, timeout_s=settings.http_read_timeout_s),
                request.mimetype, request.mimetype_params, field="file",
                max_bytes=state.settings.max_upload_bytes)
            with upload:
                form = TranscriptionForm.parse(fields)
                engine.check_language(form.language)
                result = await transcribe_file(
                    engine, upload, state.settings, language=form.language, hotwords=form.prompt)
        body, content_type = render(result, form)
        return Response(body, status=200, content_type=content_type)

    @app.websocket("/v1/stt/ws")
    async def stream() -> None:
        default_partial_ms = round(settings.streaming_chunk_size_sec * 1000)
        await _serve_session(
            lambda query: SessionParams.from_query(query, default_partial_ms=default_partial_ms),
            lambda transport: transport)

    @app.websocket("/v1/listen")
    async def deepgram_listen() -> None:
        """Deepgram's live protocol over the same session core (see `sttd.deepgram`)."""
        await _serve_session(partial(deepgram.params_from_query, settings=settings),
                             deepgram.DeepgramTransport)

    async def _serve_session(parse: Callable[[MultiDict[str, str]], SessionParams],
                             wrap: Callable[[Transport], Transport]) -> None:
        """Accept a WebSocket, check it may open a session, and run one over `wrap(transport)`.

        `parse` turns the query (without ``token``) into the session's parameters; `wrap`
        adapts the transport to the route's wire protocol (ours as it is, or Deepgram's).
        """
        await websocket.accept()
        transport = wrap(_QuartTransport(
            websocket._get_current_object(),  # type: ignore[attr-defined]  # werkzeug LocalProxy method, untyped in quart's stubs
            max_message_bytes=settings.max_message_bytes, metrics=metrics))
        try:
            # Browsers cannot set headers on a WebSocket: they may pass the key as ?token=.
            # Deepgram's clients send "Authorization: Token <key>".
            if not access.allows_api(_as_bearer(websocket.headers.get("Authorization")),
                                     token=websocket.args.get("token")):
                raise Unauthorized("this API needs 'Authorization: Bearer <key>' (or ?token=<key> "
                                   "on the WebSocket URL) with a valid key")
            if state.draining:
                raise ShuttingDown("the server is shutting down; connect to another instance")
            query = websocket.args.copy()
            query.poplist("token")
            params = parse(query)
            engine = _ready_engine(state)
            engine.check_language(params.language)
            if settings.max_sessions and len(state.sessions) >= settings.max_sessions:
                raise Overloaded(
                    f"the server holds STT_MAX_SESSIONS={settings.max_sessions} sessions "
                    "already; retry later")
            if engine.overloaded():
                # Past capacity: refuse the newcomer rather than slow every live session down.
                raise Overloaded(
                    "the server is at capacity (finals are waiting longer than "
                    f"STT_MAX_FINAL_WAIT_S={state.settings.max_final_wait_s} s); retry later")
        except ClientError as exc:
            metrics.errors_total.labels(exc.code).inc()
            metrics.sessions_total.labels("rejected").inc()
            log.info("session.rejected code=%s", exc.code)
            with trio.move_on_after(5):
                await transport.send(dumps(error_message(exc.code, str(exc))))
                await transport.close(exc.ws_close_code, exc.code)
            return
        session = Session(params, engine, state.settings, metrics)
        state.sessions.add(session)
        try:
            await session.run(transport)
        finally:
            state.sessions.discard(session)

    @app.get("/")
    async def page() -> Response:
        """The live transcription page (sttd/static/index.html)."""
        return _static_response("index.html")

    @app.get("/static/<name>")
    async def static_file(name: str) -> Response:
        return _static_response(name)

    return app


_STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png"}


_STATIC = importlib.resources.files("sttd") / "static"
# The files the page may load: only these names are ever looked up on disk.
_STATIC_NAMES = frozenset(
    entry.name for entry in _STATIC.iterdir()
    if entry.is_file() and "." + entry.name.rsplit(".", 1)[-1] in _STATIC_TYPES)


def _static_response(name: str) -> Response:
    """A file of the package's static/ folder, by exact name, or 404."""
    if name not in _STATIC_NAMES:
        raise NotFound(f"no static file {name[:40]!r}")
    resource = _STATIC / name
    suffix = "." + name.rsplit(".", 1)[-1]
    response = Response(resource.read_bytes(), status=200, content_type=_STATIC_TYPES[suffix])
    response.headers["Cache-Control"] = "no-cache"
    return response


def _current_path() -> str:
    """The path being served: an error handler runs for HTTP requests and WebSockets alike."""
    if has_request_context():
        return str(request.path)
    return str(websocket.path) if has_websocket_context() else "?"


def _as_bearer(header: str | None) -> str | None:
    """Deepgram's ``Token <key>`` as ``Bearer <key>``; any other header as it is."""
    if header is not None and header[:6].lower() == "token ":
        return "Bearer " + header[6:]
    return header


def _ready_engine(state: AppState) -> Engine:
    if state.engine is None:
        raise Overloaded("the speech engine is still loading; retry when /health returns 200")
    return state.engine
