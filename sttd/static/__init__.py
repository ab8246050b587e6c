"""The live transcription page served at ``/``, and the lookup that serves its files.

The page is plain HTML, CSS and JavaScript (no build step): ``index.html``, ``app.js``,
``pcm-worklet.js`` (the AudioWorklet that resamples the microphone to 16 kHz PCM16) and
``style.css``. Files are served by exact packaged name only: a name from a request is never
joined to a path.
"""

from __future__ import annotations

import importlib.resources
from typing import Final

__all__ = ["static_file"]

_TYPES: Final = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml",
                 ".png": "image/png"}
_FILES: Final = importlib.resources.files(__name__)
# The files the page may load: only these names are ever looked up on disk.
_NAMES: Final = frozenset(
    entry.name for entry in _FILES.iterdir()
    if entry.is_file() and "." + entry.name.rsplit(".", 1)[-1] in _TYPES)


def static_file(name: str) -> tuple[bytes, str] | None:
    """A packaged file's bytes and content type, or None if there is no file of that name."""
    if name not in _NAMES:
        return None
    return (_FILES / name).read_bytes(), _TYPES["." + name.rsplit(".", 1)[-1]]
