"""Pick and load a backend from settings."""

from __future__ import annotations

import logging

from sttd.backends.base import ASRBackend
from sttd.errors import ConfigError
from sttd.settings import Settings

__all__ = ["load_backend", "resolve_backend_name"]

log = logging.getLogger(__name__)


def resolve_backend_name(settings: Settings) -> str:
    """The backend `settings` ask for, with ``auto`` resolved for this machine."""
    if settings.backend != "auto":
        return settings.backend
    # The GPU engine (qwen3) is not built yet; whisper runs on any CPU and uses CUDA if present.
    return "whisper"


def load_backend(settings: Settings) -> ASRBackend:
    """Load the backend `settings` name; blocks while a model loads (run it in a thread).

    Raises `ConfigError` for a backend this build does not have, and `BackendError` when
    loading fails.
    """
    name = resolve_backend_name(settings)
    if name == "mock":
        from sttd.backends.mock import MockBackend

        return MockBackend.from_directory(settings.mock_references_dir or None)
    if name == "whisper":
        from sttd.backends.whisper import WhisperBackend, WhisperOptions

        return WhisperBackend.load(WhisperOptions(
            model=settings.whisper_model,
            device=settings.whisper_device,
            compute_type=settings.whisper_compute_type,
            beam_size=settings.whisper_beam_size,
            cpu_threads=settings.whisper_cpu_threads,
        ))
    raise ConfigError(
        f"STT_BACKEND={name} is not available in this build; use one of: auto, whisper, mock")
