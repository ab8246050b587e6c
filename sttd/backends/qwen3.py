"""Qwen3-ASR in an embedded vLLM engine (GPU): every request reaches the engine as it comes.

Theory of operation. vLLM's `AsyncLLM` runs in this process, on an asyncio event loop of its
own in a daemon thread (`_EngineLoop`); the server's trio threads hand requests to it with
`asyncio.run_coroutine_threadsafe` and wait for the answers. vLLM batches whatever is in flight
continuously, so the scheduler above us runs several batches at once (`preferred_lanes`) rather
than one after another; the engine may hold every request of every lane at once (``max_num_seqs``
= lanes x STT_MAX_INFERENCE_BATCH_SIZE). With ``scheduling_policy="priority"`` live finals
(priority 0) go ahead of partials (1) and both ahead of file pieces (2); a lower value runs
first. Each request asks for its final output only (``RequestOutputKind.FINAL_ONLY``), and fails
on its own: a batch-mate's failure does not cancel it (`BatchPartlyFailed`). Once the engine has
died (vLLM's ``errored``), `degraded` says so for /health and every call fails at once.

The engine arguments sttd relies on (``_REQUIRED_ARGS``) are checked against the installed vLLM's
`AsyncEngineArgs` at start: one it does not know stops start-up with a `ConfigError`, since
dropping, say, ``scheduling_policy`` would make every partial fail. The engine's worker processes
start with ``spawn`` (``VLLM_WORKER_MULTIPROC_METHOD``): this process has threads, which ``fork``
would copy in an unknown state.

The prompt is Qwen3-ASR's chat template, built as the model's own package (`qwen-asr`) builds
it: the free-text context (our hotwords) in the system turn, which is always present, the audio
in the user turn, and, when the language is forced, ``language {Name}<asr_text>`` appended to
the assistant's turn, then a partial's stable prefix. In auto-language sessions a partial whose
stable prefix came from earlier partials forces the language those detected
(`Request.prefix_language`), so the prefix works there too; finals always detect afresh. The model answers ``language {Name}<asr_text>{text}``; ``language None``
means it heard no speech, and we return no text (the hallucination guard here, besides a token
cap by duration and the collapsing of runaway repetitions). Qwen3-ASR gives no word timings.

Requests and answers are pure functions (`build_prompt`, `parse_output`), unit-tested without a
GPU; the engine is the only thing tests replace.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import inspect
import itertools
import logging
import os
import re
import threading
from collections.abc import Coroutine, Sequence
from typing import Any, Final, Protocol, TypeVar

import attrs
import numpy as np
import numpy.typing as npt

from sttd.audio import SAMPLE_RATE_HZ
from sttd.backends.base import ASRBackend, BatchPartlyFailed, Request, Result
from sttd.errors import BackendError, ConfigError, UnsupportedLanguage

__all__ = ["LANGUAGES", "Qwen3Backend", "Qwen3Options", "assistant_start", "build_prompt",
           "engine_arguments", "forced_language", "language_name", "max_new_tokens",
           "parse_output", "prompt_context"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_ASR_TEXT: Final = "<asr_text>"
_AUDIO: Final = "<|audio_start|><|audio_pad|><|audio_end|>"
_SPECIAL_TOKEN: Final = re.compile(r"<\|[^|<>]*\|>")
# Shortest clip the audio encoder takes (qwen-asr pads to this too).
_MIN_SAMPLES: Final = SAMPLE_RATE_HZ // 2
# Output tokens allowed: a floor plus per second of audio (speech runs at 3-6 tokens a second),
# so a decode that loops is cut off early; never above STT_VLLM_MAX_TOKENS.
_MIN_NEW_TOKENS: Final = 24
_TOKENS_PER_S: Final = 12
# About 13 audio tokens per second of audio; the longest clip we send is a file piece of 30 s.
_MAX_NUM_BATCHED_TOKENS: Final = 8192
_DEFAULT_MAX_MODEL_LEN: Final = 4096
# A phrase of up to this many words repeated more than _MAX_REPEATS times in a row is a loop.
_MAX_LOOP_WORDS: Final = 8
_MAX_REPEATS: Final = 20
# vLLM's priority of a request (lower runs first): live finals, partials, file pieces.
_PRIORITY: Final = {"final": 0, "partial": 1}
_FILE_PRIORITY: Final = 2
# AsyncEngineArgs fields sttd cannot run without; start-up fails if vLLM does not take one.
_REQUIRED_ARGS: Final = ("model", "gpu_memory_utilization", "dtype", "max_model_len",
                         "max_num_seqs", "max_num_batched_tokens", "limit_mm_per_prompt",
                         "scheduling_policy")

# The 30 languages Qwen3-ASR names, by code (ISO 639-1, plus yue and fil).
LANGUAGES: Final = {
    "zh": "Chinese", "en": "English", "yue": "Cantonese", "ar": "Arabic", "de": "German",
    "fr": "French", "es": "Spanish", "pt": "Portuguese", "id": "Indonesian", "it": "Italian",
    "ko": "Korean", "ru": "Russian", "th": "Thai", "vi": "Vietnamese", "ja": "Japanese",
    "tr": "Turkish", "hi": "Hindi", "ms": "Malay", "nl": "Dutch", "sv": "Swedish",
    "da": "Danish", "fi": "Finnish", "pl": "Polish", "cs": "Czech", "fil": "Filipino",
    "fa": "Persian", "el": "Greek", "ro": "Romanian", "hu": "Hungarian", "mk": "Macedonian",
}
_CODES: Final = {name.lower(): code for code, name in LANGUAGES.items()}
_ALIASES: Final = {"tl": "fil"}


@attrs.frozen
class Qwen3Options:
    model: str = "Qwen/Qwen3-ASR-1.7B"  # a hub id or a local directory
    gpu_memory: float = 0.7
    max_tokens: int = 512
    max_batch: int = 32
    dtype: str = "auto"
    max_model_len: int = 0  # 0: 4096, room for 30 s of audio and max_tokens
    lanes: int = 8  # batches the scheduler runs at once (STT_INFERENCE_LANES, or 8)

    @property
    def max_num_seqs(self) -> int:
        """Requests the engine may hold at once: every request of every lane's batch."""
        return self.max_batch * self.lanes


def engine_arguments(options: Qwen3Options, accepted: set[str]) -> dict[str, Any]:
    """The `AsyncEngineArgs` keywords for `options`, given the field names the installed vLLM
    `accepted`. Raises `ConfigError` naming any required one it lacks."""
    wanted: dict[str, Any] = {
        "model": options.model,
        "gpu_memory_utilization": options.gpu_memory,
        "dtype": options.dtype,
        "max_model_len": options.max_model_len or _DEFAULT_MAX_MODEL_LEN,
        "max_num_seqs": options.max_num_seqs,
        "max_num_batched_tokens": _MAX_NUM_BATCHED_TOKENS,
        "limit_mm_per_prompt": {"audio": 1},
        "scheduling_policy": "priority",
    }
    missing = [name for name in _REQUIRED_ARGS if name not in accepted]
    if missing:
        raise ConfigError(
            f"the installed vLLM does not take the engine arguments {', '.join(missing)}, which "
            "the qwen3 backend needs; install the vLLM version uv.lock pins (`uv sync --extra "
            "qwen3`)")
    # Request logging off: the field's name changed between vLLM versions (either may exist).
    if "enable_log_requests" in accepted:
        wanted["enable_log_requests"] = False
    elif "disable_log_requests" in accepted:
        wanted["disable_log_requests"] = True
    return wanted


def language_name(language: str | None) -> str | None:
    """Qwen3-ASR's name for a BCP-47 `language` (its primary subtag), or None for auto.

    Raises `UnsupportedLanguage` for one the model does not know.
    """
    if language is None:
        return None
    code = language.split("-")[0].lower()
    code = _ALIASES.get(code, code)
    if code not in LANGUAGES:
        raise UnsupportedLanguage(
            f"language {language!r} is not one Qwen3-ASR knows; use one of "
            f"{', '.join(sorted(LANGUAGES))}, or auto")
    return LANGUAGES[code]


def forced_language(request: Request) -> str | None:
    """The language code the prompt of `request` forces, or None to let the model detect it:
    the session's language, else, for a partial with a stable prefix, the language its earlier
    partials were detected in (the model must write its language line before any text)."""
    if request.language is not None:
        return request.language
    if request.prefix and request.prefix_language:
        code = request.prefix_language.split("-")[0].lower()
        return code if _ALIASES.get(code, code) in LANGUAGES else None
    return None


def prompt_context(request: Request) -> str:
    """The system turn of `request`'s prompt: its hotwords, cleaned of control tokens."""
    return _clean(", ".join(request.hotwords))


def assistant_start(request: Request) -> str:
    """What the assistant's turn begins with: ``language {Name}<asr_text>`` where the language
    is forced, then the stable prefix of a partial (only after a language: without one, the
    model must write its language line first); "" to let the model write it all."""
    name = language_name(forced_language(request))
    if name is None:
        return ""
    return f"language {name}{_ASR_TEXT}{_clean(request.prefix) if request.prefix else ''}"


def build_prompt(request: Request) -> str:
    """The prompt for `request`: context (hotwords) in the system turn, a forced language and
    the stable prefix of a partial in the assistant's turn."""
    return (f"<|im_start|>system\n{prompt_context(request)}<|im_end|>\n"
            f"<|im_start|>user\n{_AUDIO}<|im_end|>\n"
            f"<|im_start|>assistant\n{assistant_start(request)}")


def max_new_tokens(request: Request, ceiling: int) -> int:
    return min(ceiling, _MIN_NEW_TOKENS + int(_TOKENS_PER_S * request.duration_s))


def parse_output(raw: str, request: Request) -> Result:
    """The `Result` of the model's answer `raw` to `request` (see the module docstring)."""
    text = _SPECIAL_TOKEN.sub("", raw)
    forced = forced_language(request)
    if forced is not None:
        language: str | None = forced
        if request.prefix:
            text = f"{_clean(request.prefix)}{text}"
    elif _ASR_TEXT in text:
        meta, _, text = text.partition(_ASR_TEXT)
        name = meta.strip().removeprefix("language").strip()
        if name.lower() in ("", "none"):
            return Result(text="")  # the model heard no speech
        language = _CODES.get(name.lower(), name)
    else:
        language = None  # no language line: the whole answer is text
    return Result(text=_collapse_loops(text.replace(_ASR_TEXT, "")).strip(), language=language)


def _clean(text: str) -> str:
    """`text` without anything that reads as a control token of the template."""
    previous = None
    while previous != text:
        previous = text
        text = _SPECIAL_TOKEN.sub("", text).replace(_ASR_TEXT, "")
    return text


def _collapse_loops(text: str) -> str:
    """Cut a phrase repeated more than _MAX_REPEATS times in a row down to one."""
    words = text.split(" ")
    for size in range(1, _MAX_LOOP_WORDS + 1):
        index = 0
        while index + size * (_MAX_REPEATS + 1) <= len(words):
            phrase = words[index : index + size]
            repeats = 1
            while words[index + repeats * size : index + (repeats + 1) * size] == phrase:
                repeats += 1
            if repeats > _MAX_REPEATS:
                del words[index + size : index + repeats * size]
            index += 1
    return " ".join(words)


class GenerationEngine(Protocol):
    """What we use of vLLM's `AsyncLLM` (whose ``errored`` and ``dead_error`` we read where
    the engine has them)."""

    def generate(self, prompt: Any, sampling_params: Any, request_id: str,
                 **kwargs: Any) -> Any: ...

    def shutdown(self) -> None: ...


class _EngineLoop:
    """An asyncio event loop in a daemon thread, for vLLM's async engine."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="sttd-vllm",
                                        daemon=True)
        self._thread.start()

    def submit(self, coroutine: Coroutine[Any, Any, _T]) -> concurrent.futures.Future[_T]:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


class Qwen3Backend(ASRBackend):
    """Qwen3-ASR on vLLM; see the module docstring. `load` builds the real engine."""

    name = "qwen3"
    # Batches the scheduler may have in flight at once: vLLM merges them continuously.
    preferred_lanes = 8

    def __init__(self, engine: GenerationEngine, loop: _EngineLoop, options: Qwen3Options, *,
                 sampling_params: type[Any] | None = None, final_only: Any = None) -> None:
        self._engine = engine
        self._loop = loop
        self.options = options
        if sampling_params is None:
            sampling_params, final_only = _vllm_sampling_params()
        self._sampling_params = sampling_params
        self._final_only = final_only
        self._ids = itertools.count()
        self._priority = "priority" in inspect.signature(engine.generate).parameters

    @classmethod
    def load(cls, options: Qwen3Options) -> Qwen3Backend:
        """Start vLLM with the model (minutes on first use). Blocks: call it in a thread.

        Raises `ConfigError` when vLLM or a CUDA GPU is missing, or the installed vLLM lacks an
        engine argument sttd needs, naming the fix; and `BackendError` when the engine fails
        to start.
        """
        # Before vLLM reads it: this process is multi-threaded, so its workers must not fork.
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        try:
            import vllm  # noqa: F401
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as exc:
            raise ConfigError(
                "STT_BACKEND=qwen3 needs vLLM, which is not installed: run `uv sync --extra "
                f"qwen3` (vLLM >= 0.16, on a CUDA machine), or use STT_BACKEND=whisper ({exc})"
            ) from None
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                "STT_BACKEND=qwen3 needs an NVIDIA GPU with CUDA, and none is visible to this "
                f"process (torch {torch.__version__} is built for CUDA {torch.version.cuda}; an "
                "older host driver than that CUDA needs also reads as no GPU: see "
                "docs/scaling.md); use STT_BACKEND=whisper on a CPU")
        accepted = {field.name for field in dataclasses.fields(AsyncEngineArgs)}
        args = AsyncEngineArgs(**engine_arguments(options, accepted))
        loop = _EngineLoop()

        async def start() -> Any:
            return AsyncLLM.from_engine_args(args)

        try:
            engine = loop.submit(start()).result()
        except Exception as exc:
            loop.stop()
            raise BackendError(f"vLLM could not start {options.model!r}: {exc}") from exc
        log.info("qwen3.ready model=%s max_num_seqs=%d", options.model, options.max_num_seqs)
        return cls(engine, loop, options)

    def check_language(self, language: str | None) -> None:
        language_name(language)

    def degraded(self) -> str | None:
        """Why /health should say degraded: the engine has died (its processes are gone)."""
        if not getattr(self._engine, "errored", False):
            return None
        cause = getattr(self._engine, "dead_error", None)
        return f"the vLLM engine has died ({cause})" if cause else "the vLLM engine has died"

    def close(self) -> None:
        self._engine.shutdown()
        self._loop.stop()

    def transcribe(self, requests: Sequence[Request]) -> list[Result]:
        dead = self.degraded()
        if dead is not None:
            raise BackendError(dead)
        futures = [self._loop.submit(self._generate(request)) for request in requests]
        concurrent.futures.wait(futures)  # each request succeeds or fails on its own
        outcomes: list[Result | BackendError] = []
        for future, request in zip(futures, requests, strict=True):
            error = future.exception()
            if error is None:
                outcomes.append(parse_output(future.result(), request))
            elif isinstance(error, BackendError):
                outcomes.append(error)
            else:
                wrapped = BackendError(f"vLLM failed: {type(error).__name__}: {error}")
                wrapped.__cause__ = error
                outcomes.append(wrapped)
        failed = [outcome for outcome in outcomes if isinstance(outcome, BackendError)]
        if failed and len(outcomes) == 1:
            raise failed[0]
        if failed:
            raise BatchPartlyFailed(outcomes)
        return [outcome for outcome in outcomes if isinstance(outcome, Result)]

    async def _generate(self, request: Request) -> str:
        audio = _padded(request.audio)
        params = self._sampling_params(
            temperature=0.0, max_tokens=max_new_tokens(request, self.options.max_tokens),
            output_kind=self._final_only)
        priority = _FILE_PRIORITY if request.origin == "file" else _PRIORITY[request.kind]
        kwargs = {"priority": priority} if self._priority else {}
        last = None
        async for output in self._engine.generate(
                {"prompt": build_prompt(request), "multi_modal_data": {"audio": audio}},
                params, f"sttd-{request.origin}-{request.kind}-{next(self._ids)}", **kwargs):
            last = output
        if last is None or not last.outputs:
            raise BackendError("vLLM finished a request without output")
        return str(last.outputs[0].text)


def _padded(audio: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    if audio.size >= _MIN_SAMPLES:
        return audio
    return np.pad(audio, (0, _MIN_SAMPLES - audio.size))


def _vllm_sampling_params() -> tuple[type[Any], Any]:
    """vLLM's `SamplingParams`, and the output kind that sends a request's last output only."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams, RequestOutputKind.FINAL_ONLY
