"""Qwen3-ASR in an embedded vLLM engine (GPU): every request reaches the engine as it comes.

Theory of operation. vLLM's `AsyncLLM` runs in this process, on an asyncio event loop of its
own in a daemon thread (`_EngineLoop`); the server's trio threads hand requests to it with
`asyncio.run_coroutine_threadsafe` and wait for the answers. vLLM batches whatever is in flight
continuously, so the scheduler above us runs several batches at once (`preferred_lanes`) rather
than one after another. With ``scheduling_policy="priority"`` finals (priority 0) go ahead of
partials (1); a lower value runs first.

The prompt is Qwen3-ASR's chat template, built as the model's own package (`qwen-asr`) builds
it: the free-text context (our hotwords) in the system turn, which is always present, the audio
in the user turn, and, when the language is forced, ``language {Name}<asr_text>`` appended to
the assistant's turn. The model answers ``language {Name}<asr_text>{text}``; ``language None``
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
import re
import threading
from collections.abc import Coroutine, Sequence
from typing import Any, Final, Protocol, TypeVar

import attrs
import numpy as np
import numpy.typing as npt

from sttd.audio import SAMPLE_RATE_HZ
from sttd.backends.base import ASRBackend, Request, Result
from sttd.errors import BackendError, ConfigError, UnsupportedLanguage

__all__ = ["LANGUAGES", "Qwen3Backend", "Qwen3Options", "build_prompt", "parse_output"]

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
_PRIORITY: Final = {"final": 0, "partial": 1}

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


def build_prompt(request: Request) -> str:
    """The prompt for `request`: context (hotwords) in the system turn, a forced language and
    the stable prefix of a partial in the assistant's turn."""
    context = _clean(", ".join(request.hotwords))
    prompt = (f"<|im_start|>system\n{context}<|im_end|>\n"
              f"<|im_start|>user\n{_AUDIO}<|im_end|>\n"
              f"<|im_start|>assistant\n")
    name = language_name(request.language)
    if name is not None:
        prompt += f"language {name}{_ASR_TEXT}"
        # The words a partial already showed as stable are forced (only after a language:
        # without one, the model must write its language line first).
        if request.prefix:
            prompt += _clean(request.prefix)
    return prompt


def max_new_tokens(request: Request, ceiling: int) -> int:
    return min(ceiling, _MIN_NEW_TOKENS + int(_TOKENS_PER_S * request.duration_s))


def parse_output(raw: str, request: Request) -> Result:
    """The `Result` of the model's answer `raw` to `request` (see the module docstring)."""
    text = _SPECIAL_TOKEN.sub("", raw)
    forced = language_name(request.language)
    if forced is not None:
        language: str | None = request.language
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
    """What we use of vLLM's `AsyncLLM`."""

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
                 sampling_params: type[Any] | None = None) -> None:
        self._engine = engine
        self._loop = loop
        self.options = options
        self._sampling_params = sampling_params or _vllm_sampling_params()
        self._ids = itertools.count()
        self._priority = "priority" in inspect.signature(engine.generate).parameters

    @classmethod
    def load(cls, options: Qwen3Options) -> Qwen3Backend:
        """Start vLLM with the model (minutes on first use). Blocks: call it in a thread.

        Raises `ConfigError` when vLLM or a CUDA GPU is missing, naming the fix, and
        `BackendError` when the engine fails to start.
        """
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
            raise ConfigError("STT_BACKEND=qwen3 needs an NVIDIA GPU with CUDA, and none is "
                              "visible to this process; use STT_BACKEND=whisper on a CPU")
        wanted = {
            "model": options.model,
            "gpu_memory_utilization": options.gpu_memory,
            "dtype": options.dtype,
            "max_model_len": options.max_model_len or _DEFAULT_MAX_MODEL_LEN,
            "max_num_seqs": options.max_batch,
            "max_num_batched_tokens": _MAX_NUM_BATCHED_TOKENS,
            "limit_mm_per_prompt": {"audio": 1},
            "scheduling_policy": "priority",
            "enable_log_requests": False,
            "disable_log_requests": True,
        }
        known = {field.name for field in dataclasses.fields(AsyncEngineArgs)}
        args = AsyncEngineArgs(**{k: v for k, v in wanted.items() if k in known})
        loop = _EngineLoop()

        async def start() -> Any:
            return AsyncLLM.from_engine_args(args)

        try:
            engine = loop.submit(start()).result()
        except Exception as exc:
            loop.stop()
            raise BackendError(f"vLLM could not start {options.model!r}: {exc}") from exc
        log.info("qwen3.ready model=%s", options.model)
        return cls(engine, loop, options)

    def check_language(self, language: str | None) -> None:
        language_name(language)

    def close(self) -> None:
        self._engine.shutdown()
        self._loop.stop()

    def transcribe(self, requests: Sequence[Request]) -> list[Result]:
        futures = [self._loop.submit(self._generate(request)) for request in requests]
        concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_EXCEPTION)
        error = _first_error(futures)
        if error is not None:
            # The call fails: stop the rest (cancelling the task ends vLLM's generator, which
            # aborts the request) instead of decoding for nobody.
            for future in futures:
                future.cancel()
            if isinstance(error, BackendError):
                raise error
            raise BackendError(f"vLLM failed: {type(error).__name__}: {error}") from error
        raw = [future.result() for future in futures]
        return [parse_output(text, request) for text, request in zip(raw, requests, strict=True)]

    async def _generate(self, request: Request) -> str:
        audio = _padded(request.audio)
        params = self._sampling_params(
            temperature=0.0, max_tokens=max_new_tokens(request, self.options.max_tokens))
        kwargs = {"priority": _PRIORITY[request.kind]} if self._priority else {}
        last = None
        async for output in self._engine.generate(
                {"prompt": build_prompt(request), "multi_modal_data": {"audio": audio}},
                params, f"sttd-{request.kind}-{next(self._ids)}", **kwargs):
            last = output
        if last is None or not last.outputs:
            raise BackendError("vLLM finished a request without output")
        return str(last.outputs[0].text)


def _first_error(futures: Sequence[concurrent.futures.Future[Any]]) -> BaseException | None:
    """The exception of the first finished future that failed, if any did."""
    for future in futures:
        if future.done() and not future.cancelled() and future.exception() is not None:
            return future.exception()
    return None


def _padded(audio: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    if audio.size >= _MIN_SAMPLES:
        return audio
    return np.pad(audio, (0, _MIN_SAMPLES - audio.size))


def _vllm_sampling_params() -> type[Any]:
    from vllm import SamplingParams

    return SamplingParams  # type: ignore[no-any-return]
