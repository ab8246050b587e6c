"""Who may open a session: the checks a WebSocket passes before its session starts.

`admit_session` runs them in order and raises the `ClientError` of the first that fails (the
connection's codec then says it in the route's protocol, and closes with its code): a valid key,
a server not draining, a valid query, a loaded engine that can do the language, room under
STT_MAX_SESSIONS, and an engine not already past capacity, since refusing a newcomer keeps the
live sessions whole where admitting it would slow every one of them down. An admitted session
gets its `SessionCore`, with a fresh VAD stream.
"""

from __future__ import annotations

from werkzeug.datastructures import MultiDict

from sttd.admission._auth import Access
from sttd.admission._state import AppState
from sttd.api import Codec, SessionRequest
from sttd.engine import Engine
from sttd.errors import Overloaded, ShuttingDown, Unauthorized
from sttd.nursery import Admission
from sttd.session import SessionCore, UtteranceTracker
from sttd.settings import Settings
from sttd.vad import loaded_silero_model, make_endpointer

__all__ = ["admit_session", "ready_engine", "session_core"]


def admit_session(state: AppState, access: Access, codec: Codec, query: MultiDict[str, str],
                  authorization: str | None) -> Admission:
    """Check that a session may open; raises the `ClientError` that refuses it.

    `query` is the WebSocket's, `authorization` its ``Authorization`` header. Browsers cannot
    set headers on a WebSocket, so a key may come as ``?token=`` too (it is not passed on to
    the codec); Deepgram's clients send ``Authorization: Token <key>``.
    """
    if not access.allows_api(_as_bearer(authorization), token=query.get("token")):
        raise Unauthorized("this API needs 'Authorization: Bearer <key>' (or ?token=<key> on "
                           "the WebSocket URL) with a valid key")
    if state.draining:
        raise ShuttingDown("the server is shutting down; connect to another instance")
    query = query.copy()
    query.poplist("token")
    request = codec.accept(query, state.settings)
    engine = ready_engine(state)
    engine.check_language(request.options.language)
    engine.check_hotwords(request.options.hotwords)
    engine.check_task(request.options.task)
    settings = state.settings
    # The engine counts a live stream from its admission (below), where the registry has it
    # only once its session starts: connections arriving together all passed that count.
    open_now = max(len(state.sessions), engine.live_streams)
    if settings.max_sessions and open_now >= settings.max_sessions:
        raise Overloaded(f"the server holds STT_MAX_SESSIONS={settings.max_sessions} sessions "
                         "already; retry later")
    engine.admit_stream()
    if engine.overloaded():
        raise Overloaded("the server is at capacity (finals are waiting longer than "
                         f"STT_MAX_FINAL_WAIT_S={settings.max_final_wait_s} s); retry later")
    core = session_core(request, settings, speculate=not engine.backend.incremental)
    admission = (Admission(request, core, engine, state.sessions.registered)
                 if state.vad is None else
                 Admission(request, core, engine, state.sessions.registered, vad=state.vad))
    # Counted at once: the next connection, admitted before this one's session starts, must
    # find it there.
    admission.hold.enter_context(engine.live_stream())
    return admission


def ready_engine(state: AppState) -> Engine:
    """The engine, or `Overloaded` while it is still loading."""
    if state.engine is None:
        raise Overloaded("the speech engine is still loading; retry when /health returns 200")
    return state.engine


def session_core(request: SessionRequest, settings: Settings, *,
                 speculate: bool = True) -> SessionCore:
    """A fresh core for `request`: its own VAD stream (of the shared model) and tracker.

    Without `speculate`, no final is decoded before its end of speech is confirmed: for a
    streaming model, whose final costs only the audio after its last partial, while a
    speculation that speech outlives would make it decode the utterance again from the start.

    Raises `Overloaded` while the shared Silero model is not loaded yet.
    """
    options = request.options
    net = None
    if settings.vad == "silero":
        model = loaded_silero_model()
        if model is None:  # the server loads it before the engine is ready
            raise Overloaded("the VAD model is still loading; retry when /health returns 200")
        net = model.stream()
    silence_ms = settings.vad_silence_ms if options.vad_silence_ms is None else options.vad_silence_ms
    endpointer = make_endpointer(settings.vad, threshold_rms=settings.vad_threshold,
                                 silence_ms=silence_ms, net=net)
    tracker = UtteranceTracker(endpointer, partial_ms=options.partial_ms,
                               max_utterance_s=settings.max_utterance_s,
                               speculate_ms=(settings.speculate_ms or None) if speculate else None)
    return SessionCore(tracker, options,
                       detect_language_once=settings.language_detection == "session")


def _as_bearer(header: str | None) -> str | None:
    """Deepgram's ``Token <key>`` as ``Bearer <key>``; any other header as it is."""
    if header is not None and header[:6].lower() == "token ":
        return "Bearer " + header[6:]
    return header
