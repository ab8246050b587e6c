"""Pick and load a backend from settings."""

from __future__ import annotations

import importlib.util
import logging
from typing import Literal

from sttd.backends.base import ASRBackend
from sttd.errors import ConfigError
from sttd.settings import Settings

__all__ = ["load_backend", "resolve_backend_name", "resolve_lanes"]

log = logging.getLogger(__name__)


def resolve_backend_name(settings: Settings) -> str:
    """The backend `settings` ask for, with ``auto`` resolved for this machine."""
    if settings.backend != "auto":
        return settings.backend
    # qwen3 where vLLM is installed and a CUDA GPU is visible; whisper runs on any CPU.
    if importlib.util.find_spec("vllm") is not None:
        try:
            import torch

            if torch.cuda.is_available():
                return "qwen3"
        except ImportError:
            pass
    return "whisper"


def resolve_lanes(settings: Settings,
                  preferred_lanes: int) -> tuple[int, Literal["settings", "backend"]]:
    """Backend calls the engine may run at once, and who chose: ``"settings"``
    (STT_INFERENCE_LANES) or, where that is 0, ``"backend"`` (its `preferred_lanes`)."""
    if settings.inference_lanes > 0:
        return settings.inference_lanes, "settings"
    return preferred_lanes, "backend"


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

        return WhisperBackend.load(WhisperOptions.from_settings(settings))
    if name == "remote":
        from sttd.backends.remote import RemoteBackend, RemoteOptions, parse_urls

        lanes, _ = resolve_lanes(settings, RemoteBackend.preferred_lanes)
        return RemoteBackend(RemoteOptions(
            urls=parse_urls(settings.remote_urls),
            model=settings.remote_model,
            api_key=settings.remote_api_key,
            timeout_s=settings.remote_timeout_s,
            retries=settings.remote_retries,
            eject_s=settings.remote_eject_s,
            api="chat" if settings.remote_api == "chat" else "transcriptions",
            # Every request of every batch in flight goes out at once, and the engine runs up to
            # `lanes` batches at once.
            max_connections=max(64, settings.max_inference_batch_size * lanes),
        ))
    if name == "nemo":
        from sttd.backends.nemo import NemoBackend, NemoOptions

        return NemoBackend.load(NemoOptions(model=settings.nemo_model,
                                            threads=settings.nemo_threads,
                                            decoding=settings.nemo_decoding))
    if name == "qwen3":
        from sttd.backends.qwen3 import Qwen3Backend, Qwen3Options

        lanes, _ = resolve_lanes(settings, Qwen3Backend.preferred_lanes)
        return Qwen3Backend.load(Qwen3Options(
            model=settings.vllm_model,
            gpu_memory=settings.vllm_gpu_memory,
            max_tokens=settings.vllm_max_tokens,
            max_batch=settings.max_inference_batch_size,
            dtype=settings.vllm_dtype,
            max_model_len=settings.vllm_max_model_len,
            lanes=lanes,
        ))
    raise ConfigError(
        f"STT_BACKEND={name} is not available; use one of: auto, whisper, qwen3, remote, nemo, "
        "mock")
