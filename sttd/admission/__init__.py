"""Admission: who may use the server, and within what limits.

`AppState` holds what the routes share (the engine once loaded, the live sessions, the uploads
in flight, the drain). `admit_session` and `admit_upload` run the checks a WebSocket or an upload
passes before the server spends anything on it (keys, drain, limits, capacity); `Access` and
`Cors` are the access policy; `AsgiTransport` is the WebSocket within its message limit, and
`read_upload` reads an upload within its size and time limits.
"""

from sttd.admission._auth import Access, Cors
from sttd.admission._sessions import admit_session, ready_engine, session_core
from sttd.admission._state import AppState, SessionRegistry
from sttd.admission._transport import AsgiTransport
from sttd.admission._uploads import admit_upload, continue_upload, read_upload

__all__ = [
    "Access",
    "AppState",
    "AsgiTransport",
    "Cors",
    "SessionRegistry",
    "admit_session",
    "admit_upload",
    "continue_upload",
    "read_upload",
    "ready_engine",
    "session_core",
]
