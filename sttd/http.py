"""The server's routes: the file APIs (ours and OpenAI's), the WebSockets, /health, /metrics
and the browser page.

The WebSockets are served on ASGI itself (`_Streams`), everything else by a quart-trio app.

Each route only moves data between the request and the packages that do the work: admission
(`sttd.admission`: keys, drain, limits, uploads), the wire protocols (`sttd.api`), a connection's
session (`sttd.nursery`) and the engine's file pipeline (`sttd.engine`). Every /v1/* request
passes the access policy first; CORS headers are added to every response; errors become
``{"error": {"code", "message"}}`` with the error's HTTP status, counted in sttd_errors_total.
"""

from __future__ import annotations

import contextlib
import os
import logging
import time
import weakref
from collections.abc import AsyncGenerator
from urllib.parse import parse_qsl
from typing import IO, Any, Literal

import trio
import werkzeug.urls  # noqa: F401  # registers the "werkzeug.url_quote" codec error handler used below
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope, WebsocketScope
from prometheus_client import CONTENT_TYPE_LATEST
from quart import Response, has_request_context, request
from quart_trio import QuartTrio
from werkzeug.datastructures import MultiDict
from werkzeug.exceptions import HTTPException, NotFound

from sttd.admission import (
    Access,
    AppState,
    AsgiTransport,
    Cors,
    admit_session,
    admit_upload,
    continue_upload,
    read_upload,
    ready_engine,
)
from sttd.api import (
    Codec,
    DeepgramCodec,
    NativeCodec,
    RealtimeCodec,
    TranscriptionForm,
    dumps,
    parse_hotwords,
    parse_language,
    parse_task,
    render,
    stream_event,
    word_logprobs,
)
from sttd.engine import Engine, check_audio, file_segments, transcribe_file
from sttd.errors import BackendError, ClientError, Overloaded, Unauthorized
from sttd.nursery import Admission, count_refusal, serve_connection
from sttd.settings import WORKER_ENV
from sttd.static import static_file

__all__ = ["create_app"]

log = logging.getLogger(__name__)


def create_app(state: AppState) -> _Streams:
    """Build the ASGI app over `state`: the streaming routes, and the quart app for the rest."""
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
        route = request.url_rule.rule if request.url_rule is not None else _route_of(request.path)
        metrics.http_requests_total.labels(route, str(response.status_code)).inc()
        response.headers.update(cors.response_headers(request.headers.get("Origin")))
        return response

    def _route_of(path: str) -> str:
        """The route a request without a matched rule was for: a route's own (the method was
        wrong, 405) or "unmatched" (404), so that no client's path becomes a label."""
        adapter = app.url_map.bind("sttd")
        try:
            method = next(iter(adapter.allowed_methods(path)), None)
            if method is None:
                return "unmatched"
            rule, _ = adapter.match(path, method=method, return_rule=True)
        except HTTPException:  # werkzeug's redirects (a path with "//", say) and the like
            return "unmatched"
        return str(rule.rule)

    @app.errorhandler(ClientError)
    async def _client_error(exc: ClientError) -> Response:
        metrics.errors_total.labels(exc.code).inc()
        return _error_response(exc.http_status, exc.code, str(exc),
                               param=getattr(exc, "param", None))

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
            message = (f"request body must be at most {settings.max_upload_bytes} bytes "
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
        if engine is not None:
            load = engine.load()
            body["capacity"] = {"streams": load.capacity_streams,
                                "stream_demand_s": _rounded(load.stream_demand_s),
                                "load": _rounded(load.load)}
        together = metrics.workers()
        if together is not None:
            index, _, count = os.environ.get(WORKER_ENV, "0/1").partition("/")
            body["worker"] = int(index)
            body["workers"] = {"count": int(count), "sessions": int(together["sessions"]),
                               # Every worker alive (one that died is not, until it is
                               # started again and ready) and every live engine ready.
                               "all_ready": together["ready"] >= 1
                                            and together["live"] >= int(count)}
        status = 200
        if state.draining:
            body["status"], status = "draining", 503
        elif engine is None:
            body["status"], status = "loading", 503
        elif (reason := engine.degraded()) is not None:
            # Still serving (other calls may go on), but an operator should look.
            body["status"], body["reason"] = "degraded", reason
        return _json(body, status)

    @app.get("/metrics")
    async def prometheus() -> Response:
        if not access.allows_metrics(request.headers.get("Authorization")):
            raise Unauthorized("/metrics needs 'Authorization: Bearer <STT_METRICS_TOKEN>'")
        return Response(metrics.exposition(), content_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/stt/transcribe")
    async def transcribe() -> Response:
        started = time.perf_counter()
        with admit_upload(state, request.content_length) as engine:
            language = parse_language(request.args.get("language", "auto"))
            hotwords = parse_hotwords(request.args.get("hotwords", ""))
            task = parse_task(request.args.get("task", "transcribe"))
            engine.check_language(language)
            engine.check_hotwords(hotwords)
            engine.check_task(task)
            upload, _ = await read_upload(request.body, request.mimetype,
                                          request.mimetype_params, settings=settings)
            with upload:
                # This route's answer has no words: none are aligned.
                result = await transcribe_file(engine, upload, settings, language=language,
                                               hotwords=hotwords, task=task, word_timings=False)
        return _json({
            "text": result.text,
            "duration_ms": round(result.duration_s * 1000),
            "latency_ms": round((time.perf_counter() - started) * 1000),
            # The language most pieces were recognised in, and each piece's (None where the
            # backend does not say).
            "language": result.language,
            "segments": [
                {"start_ms": segment.start_ms, "end_ms": segment.end_ms, "text": segment.text,
                 "language": segment.language}
                for segment in result.segments
            ],
        })

    @app.get("/v1/models")
    async def models() -> Response:
        """OpenAI's model list: the one engine, under its backend's name."""
        engine = ready_engine(state)
        return _json({"object": "list", "data": [{"id": engine.backend_name, "object": "model",
                                                  "created": 0, "owned_by": "sttd"}]})

    @app.post("/v1/audio/transcriptions")
    async def openai_transcriptions() -> Response:
        """OpenAI's transcription API, so that its SDKs work unchanged."""
        return await _openai_file("transcribe")

    @app.post("/v1/audio/translations")
    async def openai_translations() -> Response:
        """OpenAI's translation API: speech in any language the model knows, English text."""
        return await _openai_file("translate")

    async def _openai_file(task: Literal["transcribe", "translate"]) -> Response:
        with admit_upload(state, request.content_length) as engine:
            engine.check_task(task)  # the route's own: refused before the upload is read
            upload, fields = await read_upload(request.body, request.mimetype,
                                               request.mimetype_params, settings=settings)
            with contextlib.ExitStack() as owned:
                owned.enter_context(upload)
                form = TranscriptionForm.parse(fields, task=task)
                engine.check_language(form.language)
                engine.check_hotwords(form.prompt)
                if form.stream:
                    # A file that is not audio is refused while the status can still say so.
                    await check_audio(upload)
                    # Counted again before this admission ends (so that a drain never sees it
                    # gone), and the stream's now, with the upload: it leaves both.
                    owned.enter_context(continue_upload(state))
                    held = owned.pop_all()
                    stream = _openai_stream(engine, upload, form, held)
                    # A stream that is never started (its client gone before the status went
                    # out) never runs its `finally`: leave them when it is collected.
                    weakref.finalize(stream, _leave_soon, trio.lowlevel.current_trio_token(),
                                     held)
                    return Response(stream, status=200, content_type="text/event-stream",
                                    headers={"Cache-Control": "no-cache"})
                result = await transcribe_file(
                    engine, upload, settings, language=form.language, hotwords=form.prompt,
                    task=task, word_timings=("word" in form.timestamp_granularities
                                             or form.logprobs))
        body, content_type = render(result, form)
        return Response(body, status=200, content_type=content_type)

    async def _openai_stream(engine: Engine, upload: IO[bytes], form: TranscriptionForm,
                             held: contextlib.ExitStack) -> AsyncGenerator[bytes]:
        """A streamed transcription's events, each piece's text as soon as it is decoded.

        Everything a request can be refused for was checked before the stream began. `held`
        is what the request held on to: the upload, still counted as in flight (for the drain,
        and STT_MAX_UPLOADS) until this ends. A failure from now on is an error event, the
        status being sent. quart closes this generator when it stops sending.
        """
        text: list[str] = []
        every: list[dict[str, Any]] = []  # the logprobs of every word, for the done event
        try:
            with held:
                async with contextlib.aclosing(file_segments(
                        engine, upload, settings, language=form.language, hotwords=form.prompt,
                        task=form.task, word_timings=form.logprobs)) as batches:
                    async for segments, _ in batches:
                        for segment in segments:
                            scores = word_logprobs(segment.words) if form.logprobs else None
                            yield stream_event("delta", segment.text, first=not text,
                                               logprobs=scores)
                            text.append(segment.text)
                            every.extend(scores or ())
            yield stream_event("done", " ".join(text), logprobs=every if form.logprobs else None)
        except (ClientError, BackendError) as exc:
            log.warning("http.stream_failed code=%s", exc.code, exc_info=exc)
            metrics.errors_total.labels(exc.code).inc()
            yield stream_event("error", code=exc.code, message=str(exc))
        except Exception as exc:  # a bug: the client is told, the server goes on
            log.error("http.stream_failed path=%s", _current_path(), exc_info=exc)
            metrics.errors_total.labels("internal").inc()
            yield stream_event("error", code="internal",
                               message="the server failed on this request; see its logs")
        finally:
            held.close()

    @app.get("/")
    async def page() -> Response:
        """The live transcription page (sttd/static/index.html)."""
        return _static("index.html")

    @app.get("/static/<name>")
    async def page_file(name: str) -> Response:
        return _static(name)

    return _Streams(app, state, access)


def _leave_soon(token: trio.lowlevel.TrioToken, held: contextlib.ExitStack) -> None:
    """Close `held` on the server's loop, from whichever thread collected its owner (closing it
    twice does nothing)."""
    with contextlib.suppress(trio.RunFinishedError):
        token.run_sync_soon(held.close)


class _Streams:
    """The streaming routes, served on ASGI itself; every other request goes to the quart app.

    quart hands a WebSocket's messages to its route from a task of its own, through a queue and
    a signal: a task switch per audio frame on top of the session's own, where a frame is the
    message a server gets most of. Here the session's receive task reads hypercorn's ASGI
    `receive` itself (`sttd.admission.AsgiTransport`). Measured with ``benchmarks/idle.py``
    (see benchmarks/README.md, "Streaming routes without quart").

    * ``/v1/stt/ws``: sttd's own protocol (`sttd.api.NativeCodec`), every refusal in band.
    * ``/v1/listen``: Deepgram's live protocol (`sttd.api.DeepgramCodec`). A server past
      capacity answers the upgrade with 503 and Retry-After, as Deepgram's own does, so its
      clients back off; other refusals come in band.
    * ``/v1/realtime``: OpenAI's Realtime API, transcription sessions (`sttd.api.RealtimeCodec`).
      Browsers cannot set headers on a WebSocket: OpenAI's form for them, the subprotocols
      ``realtime`` and ``openai-insecure-api-key.<key>``, is taken too (and ``realtime`` is
      accepted back), as is ``?token=``; so is Deepgram's on ``/v1/listen``, the subprotocols
      ``token`` and ``<key>``.
    """

    def __init__(self, app: QuartTrio, state: AppState, access: Access) -> None:
        self.app = app
        self._state = state
        self._access = access

    async def __call__(self, scope: Scope, receive: ASGIReceiveCallable,
                       send: ASGISendCallable) -> None:
        if scope["type"] != "websocket" or scope["path"] not in _STREAM_CODECS:
            await self.app(scope, receive, send)
            return
        try:
            await self._serve(scope, receive, send)
        except Exception:
            # Outside any session (a session's own failures close it with 1011 and are logged
            # there): hypercorn then refuses the upgrade with 500, or closes with 1011.
            log.error("http.failed path=%s", scope["path"], exc_info=True)
            self._state.metrics.errors_total.labels("internal").inc()

    async def _serve(self, scope: WebsocketScope, receive: ASGIReceiveCallable,
                     send: ASGISendCallable) -> None:
        if (await receive())["type"] != "websocket.connect":
            return  # gone before its upgrade was read
        state, metrics, settings = self._state, self._state.metrics, self._state.settings
        codec = _STREAM_CODECS[scope["path"]]()
        # As quart (werkzeug) parses a query: bytes that are not UTF-8 stay percent-encoded.
        query = MultiDict(parse_qsl(scope["query_string"].decode("utf-8", "werkzeug.url_quote"),
                                    keep_blank_values=True, errors="werkzeug.url_quote"))
        authorization = next((value.decode("latin-1") for name, value in scope["headers"]
                              if name.lower() == b"authorization"), None)
        subprotocol = None
        if isinstance(codec, RealtimeCodec):
            if any(name.lower() == b"openai-beta" and b"realtime=v1" in value.lower()
                   for name, value in scope["headers"]):
                codec = RealtimeCodec(beta=True)  # opens in the beta's shape
            offered = list(scope.get("subprotocols", ()))
            key = next((p.removeprefix(_REALTIME_KEY_PROTOCOL) for p in offered
                        if p.startswith(_REALTIME_KEY_PROTOCOL)), None)
            if authorization is None and key:
                authorization = f"Bearer {key}"
            subprotocol = "realtime" if "realtime" in offered else None
        elif isinstance(codec, DeepgramCodec):
            # Deepgram's form for browsers: the subprotocols ``token`` and the key (or
            # ``bearer`` and a temporary token), the first accepted back: a browser drops a
            # connection whose server picks none of those it offered.
            offered = list(scope.get("subprotocols", ()))
            if len(offered) >= 2 and offered[0].lower() in ("token", "bearer"):
                if authorization is None:
                    authorization = f"{offered[0]} {offered[1]}"
                subprotocol = offered[0]
        admitted: Admission | ClientError
        try:
            admitted = admit_session(state, self._access, codec, query, authorization)
        except ClientError as exc:
            if isinstance(codec, DeepgramCodec) and isinstance(exc, Overloaded):
                count_refusal(exc, metrics)
                metrics.errors_total.labels(exc.code).inc()
                await _refuse_upgrade(send, exc)
                return
            admitted = exc
        with (trio.CancelScope() as gone,
              admitted.hold if isinstance(admitted, Admission) else contextlib.nullcontext()):
            await send({"type": "websocket.accept", "subprotocol": subprotocol, "headers": []})
            transport = AsgiTransport(receive, send, gone=gone,
                                      max_message_bytes=settings.max_message_bytes)
            await serve_connection(transport, codec, admitted, settings=settings,
                                   metrics=metrics)
            await transport.finish()


# Each streaming route's protocol (`_Streams`).
_STREAM_CODECS: dict[str, type[Codec]] = {
    "/v1/stt/ws": NativeCodec, "/v1/listen": DeepgramCodec, "/v1/realtime": RealtimeCodec}


async def _refuse_upgrade(send: ASGISendCallable, exc: ClientError) -> None:
    """Answer a WebSocket upgrade with `exc` as an HTTP error (ASGI's websocket.http.response)."""
    response = _error_response(exc.http_status, exc.code, str(exc))
    body = await response.get_data(as_text=False)
    headers = [(name.lower().encode("latin-1"), value.encode("latin-1"))
               for name, value in response.headers.items()]
    await send({"type": "websocket.http.response.start", "status": exc.http_status,
                "headers": headers})
    await send({"type": "websocket.http.response.body", "body": body, "more_body": False})


# OpenAI's subprotocol that carries an API key from a browser: openai-insecure-api-key.<key>.
_REALTIME_KEY_PROTOCOL = "openai-insecure-api-key."
# What a client told 503 (overloaded, loading or draining) should wait before it tries again, s.
_RETRY_AFTER_S = 5


def _static(name: str) -> Response:
    found = static_file(name)
    if found is None:
        raise NotFound(f"no static file {name[:40]!r}")
    body, content_type = found
    response = Response(body, status=200, content_type=content_type)
    response.headers["Cache-Control"] = "no-cache"
    return response


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _json(body: dict[str, Any], status: int = 200) -> Response:
    return Response(dumps(body), status=status, content_type="application/json")


def _error_response(status: int, code: str, message: str, *, param: str | None = None
                    ) -> Response:
    error: dict[str, Any] = {"code": code, "message": message}
    if request and request.path.startswith(_OPENAI_PREFIX):
        # OpenAI's shape, which its SDKs read into the exception (`e.type`, `e.param`). A file
        # it cannot read as audio is a 400 there (`openai.BadRequestError`), not a 415.
        error["type"] = "server_error" if status >= 500 else "invalid_request_error"
        error["param"] = param
        if status == 415:
            status = 400
    response = _json({"error": error}, status)
    if status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    if status == 503:
        response.headers["Retry-After"] = str(_RETRY_AFTER_S)
    if request and request.method in ("POST", "PUT"):
        # The body may be unread: a kept-alive connection would read it as the next request.
        response.headers["Connection"] = "close"
    return response


# The routes of OpenAI's file API, whose errors take OpenAI's shape (`_error_response`).
_OPENAI_PREFIX = "/v1/audio/"


def _current_path() -> str:
    """The path being served."""
    return str(request.path) if has_request_context() else "?"
