"""Remote backend: utterances go to OpenAI-compatible transcription servers over HTTP.

The way past one machine: a fleet of vLLM servers running Qwen3-ASR, speaches, or other sttd
instances does the recognising, and this process keeps the sessions, the VAD and the protocol.

Theory of operation. Every request of a batch is sent at once, each on its own worker thread,
over one pooled `httpx.Client`, by one of two routes (STT_REMOTE_API):

* ``transcriptions`` (the default; any OpenAI-compatible server: sttd, speaches, vLLM): the
  audio as a WAV file to ``POST {upstream}/audio/transcriptions``, the hotwords as ``prompt``
  and a forced language as ``language``. ``verbose_json`` is asked for (word times for finals,
  the detected language); an upstream that answers vLLM's 400 "Currently do not support
  verbose_json for ..." (vLLM does for models without segment timestamps, Qwen3-ASR among
  them) is asked for plain ``json`` from then on, which carries the text only;
* ``chat`` (vLLM serving Qwen3-ASR): ``POST {upstream}/chat/completions`` with the audio as an
  ``input_audio`` part and the qwen3 backend's own prompt (`qwen3.build_prompt`): the hotwords
  as the system turn, a forced language and a partial's stable prefix begun as the assistant's
  turn, which the model continues (``continue_final_message``). The raw answer is read by the
  qwen3 backend's parser, so the detected language comes back too.

An `UpstreamPool` picks the upstream with the fewest requests outstanding (ties in turn). An
attempt that fails because of its upstream (no connection, a timeout, a 5xx, 408 or 429, an
answer of the wrong shape, or a 401, 403, 404 or 405: a wrong key or model, which no retry on
the same upstream mends) marks it failed and is retried, after a short jittered backoff, on
another upstream while `retries` allow; transcribing is idempotent, so a retry can only cost
time. A failed upstream is ejected (not chosen) for `eject_s`, doubled for each further
failure in a row up to 60 s; when it is due, one request probes it while the others keep
away, and a success restores it. While every upstream is ejected, the one due soonest is tried
anyway rather than failing at once. Any other 4xx refuses the request itself (a language the
model does not know, audio it cannot read): it fails that request only, is not retried, and
counts neither for nor against the upstream. `degraded` (for /health) says so while every
upstream is ejected, or once the last few requests have all failed, whatever the reason.
"""

from __future__ import annotations

import base64
import concurrent.futures
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal
from urllib.parse import urlsplit

import attrs
import httpx

from sttd.audio import encode_wav
from sttd.backends.base import ASRBackend, BatchPartlyFailed, RecognisedWord, Request, Result
from sttd.backends.qwen3 import (
    assistant_start,
    language_name,
    max_new_tokens,
    parse_output,
    prompt_context,
)
from sttd.errors import BackendError, ConfigError
from sttd.api import language_code

__all__ = ["RemoteBackend", "RemoteOptions", "Upstream", "UpstreamPool", "parse_urls"]

log = logging.getLogger(__name__)

_MAX_EJECT_S = 60.0
_BACKOFF_S = 0.05  # first retry's wait; doubles per attempt, plus up to 50% jitter
_RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
# An upstream that says it is busy (429, or 503 with Retry-After) is asked again after the
# wait it names, at most this long each time, for at most _BUSY_BUDGET_S in all (seconds):
# an sttd upstream answers 503 with Retry-After: 5 past its STT_MAX_UPLOADS, and a few tenths
# of a second later it usually has room (each request is one utterance).
_MAX_BUSY_WAIT_S = 0.5
_BUSY_BUDGET_S = 5.0
# Answers that say this upstream can never serve us (a wrong key, no such model or route):
# it is ejected like a failing one, and the request goes to another.
_UPSTREAM_STATUSES = frozenset({401, 403, 404, 405})
# The qwen3 backend's ceiling on output tokens (STT_VLLM_MAX_TOKENS' default).
_CHAT_MAX_TOKENS = 512
_MAX_ERROR_CHARS = 300


def parse_urls(raw: str) -> tuple[str, ...]:
    """STT_REMOTE_URLS: comma-separated http(s) base URLs, trailing slashes dropped."""
    urls = tuple(url.strip().rstrip("/") for url in raw.split(",") if url.strip())
    if not urls:
        raise ConfigError("STT_BACKEND=remote needs STT_REMOTE_URLS: comma-separated base URLs "
                          "of OpenAI-compatible servers, e.g. http://10.0.0.5:8000/v1")
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"STT_REMOTE_URLS must hold http(s) URLs, got {url!r}")
    if len(set(urls)) != len(urls):
        raise ConfigError("STT_REMOTE_URLS lists an upstream twice")
    return urls


@attrs.frozen
class RemoteOptions:
    urls: tuple[str, ...]
    model: str = ""  # "" = the first model each upstream lists at /models
    api_key: str = attrs.field(default="", repr=False)
    timeout_s: float = 10.0
    retries: int = 2
    eject_s: float = 5.0
    max_connections: int = 64
    # "transcriptions": OpenAI's /audio/transcriptions (any OpenAI-compatible server: sttd,
    # speaches, vLLM). "chat": vLLM's /chat/completions with Qwen3-ASR's own prompt, which also
    # carries the language, a partial's stable prefix, and the detected language back.
    api: Literal["transcriptions", "chat"] = "transcriptions"


@attrs.define
class Upstream:
    """One server, and what the pool knows of it."""

    url: str
    outstanding: int = 0
    failures: int = 0  # in a row
    ejected_until: float = 0.0
    ejected_at: float = -math.inf  # when the latest ejection began
    probing: bool = False  # one request is testing it after its pause; the rest stay away
    model: str = ""  # learnt from /models when no model was configured
    # Learnt from its answers: False once it refused verbose_json (vLLM does, for models
    # without segment timestamps such as Qwen3-ASR), so plain json is asked for from then on.
    verbose_json: bool = True


# How a request to an upstream ended, for the pool: it worked; the upstream failed (eject it);
# or the request was refused for itself, which says nothing of the upstream's health.
Outcome = Literal["ok", "failed", "refused"]
# Requests in a row failing, whatever the reason, after which /health says degraded.
_DEGRADED_AFTER_FAILURES = 5


@attrs.define
class UpstreamPool:
    """Least-outstanding-requests choice with ejection of failing upstreams. Thread-safe."""

    upstreams: list[Upstream]
    eject_s: float = 5.0
    clock: Callable[[], float] = time.monotonic
    _turn: int = 0
    _lock: threading.Lock = attrs.field(factory=threading.Lock, repr=False)

    @classmethod
    def of(cls, urls: Sequence[str], **kwargs: Any) -> UpstreamPool:
        return cls([Upstream(url) for url in urls], **kwargs)

    def acquire(self, avoid: frozenset[str] = frozenset()) -> Upstream:
        """The upstream to send to now (counted outstanding until `release`).

        Healthy upstreams not in `avoid` first, fewest outstanding, ties in turn; then healthy
        ones in `avoid`; with none healthy, the ejected one due back soonest. An ejected
        upstream whose pause is over takes one request, its probe, and no other until that
        probe ends; only with nothing else to choose do others follow it.
        """
        with self._lock:
            now = self.clock()
            self._turn += 1
            count = len(self.upstreams)
            order = [self.upstreams[(self._turn + i) % count] for i in range(count)]
            healthy = [u for u in order if u.ejected_until <= now and not u.probing]
            fresh = [u for u in healthy if u.url not in avoid]
            if fresh or healthy:
                chosen = min(fresh or healthy, key=lambda u: u.outstanding)
                if chosen.failures:  # ejected before, due now: this request probes it
                    chosen.probing = True
            else:
                chosen = min(order, key=lambda u: (u.url in avoid, u.ejected_until))
            chosen.outstanding += 1
            return chosen

    def release(self, upstream: Upstream, outcome: Outcome = "ok", *,
                started_at: float | None = None) -> None:
        """End a request to `upstream` sent at `started_at` (this pool's clock): a failure
        ejects it, a success restores it, a refusal of the request itself does neither.

        Requests in flight together fail together: while `upstream` is ejected, more failures
        do not lengthen its pause; and a success of a request sent before the latest ejection
        says nothing of the upstream now, so it does not restore it.
        """
        with self._lock:
            upstream.outstanding -= 1
            if upstream.probing and (started_at is None or started_at >= upstream.ejected_at):
                upstream.probing = False  # the probe is back (or a request sent after it)
            now = self.clock()
            if outcome == "refused":
                return
            if outcome == "ok":
                if started_at is not None and started_at < upstream.ejected_at:
                    return
                if upstream.failures:
                    log.info("remote.upstream_restored url=%s", upstream.url)
                upstream.failures = 0
                upstream.ejected_until = 0.0
                return
            if upstream.ejected_until > now:
                return  # already out: one outage, one failure
            upstream.failures += 1
            upstream.ejected_at = now
            pause = min(self.eject_s * 2 ** (upstream.failures - 1), _MAX_EJECT_S)
            upstream.ejected_until = now + pause
            log.warning("remote.upstream_ejected url=%s failures=%d for_s=%.1f",
                        upstream.url, upstream.failures, pause)

    def all_ejected(self) -> bool:
        with self._lock:
            now = self.clock()
            return all(u.ejected_until > now for u in self.upstreams)


@attrs.define
class _FailureStreak:
    """Requests in a row that failed (every attempt, whatever the reason), and the latest
    reason: /health says degraded once every request has been failing. Thread-safe."""

    count: int = 0
    latest: str = ""
    _lock: threading.Lock = attrs.field(factory=threading.Lock, repr=False)

    def record(self, error: str | None) -> None:
        with self._lock:
            if error is None:
                self.count, self.latest = 0, ""
            else:
                self.count, self.latest = self.count + 1, error


def _retry_after_s(response: httpx.Response) -> float | None:
    """The wait a busy answer names (Retry-After in seconds; an HTTP date is taken as 1 s), or
    None where it names none: a 503 without it is an upstream failing, not a busy one."""
    value = response.headers.get("retry-after")
    if value is None:
        return 1.0 if response.status_code == 429 else None
    try:
        return max(float(value), 0.0)
    except ValueError:
        return 1.0


class _UpstreamFailed(Exception):
    """An attempt failed because of the upstream (down, busy, broken, or unable ever to serve
    this: wrong key, no such model or route): eject it, and try another."""


class _UpstreamBusy(_UpstreamFailed):
    """The upstream is up and said it is busy for now (429, or 503 with Retry-After): not
    ejected (it is not broken), and asked again after the wait it named."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RemoteBackend(ASRBackend):
    """Sends each request to an upstream transcription server; see the module docstring."""

    name = "remote"
    # Batches the scheduler may have in flight at once: each request goes out on its own.
    preferred_lanes = 8

    def __init__(self, options: RemoteOptions, *, transport: httpx.BaseTransport | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.options = options
        self.pool = UpstreamPool.of(options.urls, eject_s=options.eject_s)
        self._streak = _FailureStreak()
        headers = {"Authorization": f"Bearer {options.api_key}"} if options.api_key else {}
        limits = httpx.Limits(max_connections=options.max_connections,
                              max_keepalive_connections=options.max_connections)
        self._client = httpx.Client(
            headers=headers, limits=limits, transport=transport,
            timeout=httpx.Timeout(options.timeout_s, connect=min(options.timeout_s, 5.0)))
        self._threads = concurrent.futures.ThreadPoolExecutor(
            max_workers=options.max_connections, thread_name_prefix="sttd-remote")
        self._sleep = sleep

    def check_language(self, language: str | None) -> None:
        if self.options.api == "chat":
            language_name(language)  # the prompt names it: it must be one Qwen3-ASR knows
        # Otherwise the upstream decides, and says so in its answer.

    def degraded(self) -> str | None:
        """Why /health should say degraded, or None: every upstream is ejected, or the last
        few requests all failed (an upstream that refuses every request stays in the pool)."""
        if self.pool.all_ejected():
            return "every remote upstream is failing"
        count, latest = self._streak.count, self._streak.latest
        if count >= _DEGRADED_AFTER_FAILURES:
            return f"the last {count} requests to the remote upstreams failed; the latest: {latest}"
        return None

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)
        self._client.close()

    def transcribe(self, requests: Sequence[Request]) -> list[Result]:
        if len(requests) == 1:
            return [self._transcribe_one(requests[0])]
        futures = [self._threads.submit(self._transcribe_one, r) for r in requests]
        concurrent.futures.wait(futures)  # each request succeeds or fails on its own
        outcomes: list[Result | BackendError] = []
        for future in futures:
            error = future.exception()
            if error is None:
                outcomes.append(future.result())
            elif isinstance(error, BackendError):
                outcomes.append(error)
            else:
                raise error  # a bug here: the call fails
        if any(isinstance(outcome, BackendError) for outcome in outcomes):
            raise BatchPartlyFailed(outcomes)
        return [outcome for outcome in outcomes if isinstance(outcome, Result)]

    def _transcribe_one(self, request: Request) -> Result:
        wav = encode_wav(request.audio)
        tried: set[str] = set()
        errors: list[str] = []
        busy: set[str] = set()  # upstreams busy since the last wait
        busy_waited_s = 0.0
        attempt = 0
        while attempt <= self.options.retries:
            if attempt:
                self._sleep(_BACKOFF_S * 2 ** (attempt - 1) * (1 + random.random() / 2))
            started_at = self.pool.clock()
            upstream = self.pool.acquire(frozenset(tried | busy))
            try:
                result = self._attempt(upstream, request, wav)
            except _UpstreamBusy as exc:
                # Up, and busy (another sttd at its STT_MAX_UPLOADS, a vLLM's queue full): not
                # counted against the upstream or the retries. Another upstream may have room
                # now; once all said busy, ask again after the wait named, within a budget;
                # past it, a failure.
                self.pool.release(upstream, "refused", started_at=started_at)
                first = upstream.url not in busy
                busy.add(upstream.url)
                if first and len(busy) < len(self.pool.upstreams):
                    continue
                busy.clear()
                wait_s = min(exc.retry_after_s, _MAX_BUSY_WAIT_S) * (0.5 + random.random())
                if busy_waited_s + wait_s <= _BUSY_BUDGET_S:
                    busy_waited_s += wait_s
                    self._sleep(wait_s)
                    continue
                tried.add(upstream.url)
                errors.append(f"{upstream.url}: {exc} (busy for {busy_waited_s:.1f} s)")
                attempt += 1
                continue
            except _UpstreamFailed as exc:
                tried.add(upstream.url)
                self.pool.release(upstream, "failed", started_at=started_at)
                errors.append(f"{upstream.url}: {exc}")
                attempt += 1
                continue
            except BaseException as exc:
                # The upstream answered, and refused this request for itself (bad audio, a
                # language it does not know): no other upstream would do better, and the
                # upstream's health is unknown. Or this process broke (a bug, cancellation).
                self.pool.release(upstream, "refused", started_at=started_at)
                if isinstance(exc, BackendError):
                    self._streak.record(str(exc))
                raise
            self.pool.release(upstream, "ok", started_at=started_at)
            self._streak.record(None)
            return result
        message = f"every attempt failed ({len(errors)}): " + "; ".join(errors)
        self._streak.record(message)
        raise BackendError(message)

    def _attempt(self, upstream: Upstream, request: Request, wav: bytes) -> Result:
        """One request to `upstream`. Raises `_UpstreamFailed`, or `BackendError` when the
        upstream refused the request itself."""
        model = self.options.model or upstream.model or self._learn_model(upstream)
        if self.options.api == "chat":
            body = self._send(upstream, "chat/completions", json=chat_body(model, request, wav))
            try:
                return parse_output(chat_content(body), request)
            except (ValueError, TypeError, KeyError, IndexError) as exc:
                raise _UpstreamFailed(f"malformed answer: {exc!r}") from None
        verbose = upstream.verbose_json
        try:
            body = self._send(upstream, "audio/transcriptions",
                              data=_transcription_form(model, request, verbose=verbose),
                              files={"file": ("audio.wav", wav, "audio/wav")})
        except _VerboseJsonRefused:
            if not verbose:
                raise BackendError(f"upstream {upstream.url} refused json too") from None
            # vLLM, for a model without segment timestamps: ask it for plain json from now on.
            upstream.verbose_json = False
            log.info("remote.upstream_without_verbose_json url=%s format=json", upstream.url)
            body = self._send(upstream, "audio/transcriptions",
                              data=_transcription_form(model, request, verbose=False),
                              files={"file": ("audio.wav", wav, "audio/wav")})
        if not isinstance(body.get("text"), str):
            raise _UpstreamFailed(f"no 'text' in the answer: {str(body)[:_MAX_ERROR_CHARS]}")
        try:
            return _parse_result(body)
        except (ValueError, TypeError) as exc:
            raise _UpstreamFailed(f"malformed answer: {exc}") from None

    def _send(self, upstream: Upstream, route: str, **kwargs: Any) -> dict[str, Any]:
        """POST to `route` of `upstream`; its JSON object answer. Raises `_UpstreamFailed`,
        `_VerboseJsonRefused`, or `BackendError` for a request refused for itself."""
        try:
            response = self._client.post(f"{upstream.url}/{route}", **kwargs)
        except httpx.TransportError as exc:  # connect, read, write, pool timeouts and errors
            raise _UpstreamFailed(f"{type(exc).__name__}: {exc}") from exc
        status = response.status_code
        if status != 200:
            message = _error_message(response)
            busy_s = _retry_after_s(response) if status in (429, 503) else None
            if busy_s is not None:
                raise _UpstreamBusy(f"HTTP {status}: {message}", busy_s)
            if status in _RETRY_STATUSES or status in _UPSTREAM_STATUSES:
                raise _UpstreamFailed(f"HTTP {status}: {message}")
            if status == 400 and "verbose_json" in message:
                raise _VerboseJsonRefused(message)
            raise BackendError(f"upstream {upstream.url} refused the request: HTTP {status}: "
                               f"{message}")
        try:
            body = response.json()
        except ValueError:
            raise _UpstreamFailed(f"not JSON: {response.text[:_MAX_ERROR_CHARS]!r}") from None
        if not isinstance(body, dict):
            raise _UpstreamFailed(f"not a JSON object: {str(body)[:_MAX_ERROR_CHARS]}")
        return body

    def _learn_model(self, upstream: Upstream) -> str:
        """The first model `upstream` lists (OpenAI's GET /models), remembered."""
        try:
            response = self._client.get(f"{upstream.url}/models")
            if response.status_code != 200:
                raise _UpstreamFailed(f"GET /models: HTTP {response.status_code}: "
                                      f"{_error_message(response)}")
            models = response.json().get("data") or []
            upstream.model = str(models[0]["id"])
        except httpx.TransportError as exc:
            raise _UpstreamFailed(f"GET /models: {type(exc).__name__}: {exc}") from exc
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise _UpstreamFailed("it lists no model at /models; set STT_REMOTE_MODEL") from None
        return upstream.model


class _VerboseJsonRefused(BackendError):
    """The upstream answered 400 to response_format=verbose_json (vLLM: "Currently do not
    support verbose_json for ...")."""


def _error_message(response: httpx.Response) -> str:
    """The message of an error answer: OpenAI's and vLLM's ``{"error": {"message": ...}}``,
    older vLLM's flat ``{"message": ...}``, or the text itself."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:_MAX_ERROR_CHARS]
    error = body.get("error", body) if isinstance(body, dict) else body
    message = error.get("message") if isinstance(error, dict) else None
    return (message if isinstance(message, str) else str(body))[:_MAX_ERROR_CHARS]


def _transcription_form(model: str, request: Request, *, verbose: bool) -> dict[str, Any]:
    """The form of an OpenAI transcription request: the hotwords as the prompt (Whisper's
    prompt, and vLLM's Qwen3-ASR context), the language where it is forced; word and segment
    times for finals that want them where the answer can hold them."""
    data: dict[str, Any] = {"model": model,
                            "response_format": "verbose_json" if verbose else "json"}
    if verbose and request.kind == "final" and request.word_timings:
        data["timestamp_granularities[]"] = ["segment", "word"]
    if request.language:
        data["language"] = request.language
    if request.hotwords:
        data["prompt"] = ", ".join(request.hotwords)
    return data


def chat_body(model: str, request: Request, wav: bytes) -> dict[str, Any]:
    """A vLLM chat-completions request that gives Qwen3-ASR the prompt the qwen3 backend gives
    it (`build_prompt`): the hotwords as the system turn, the audio as the user's, and the
    forced language (and a partial's stable prefix) begun as the assistant's turn, which the
    model continues."""
    audio = base64.b64encode(wav).decode("ascii")
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": prompt_context(request)},
        {"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}}]},
    ]
    body: dict[str, Any] = {"model": model, "messages": messages, "temperature": 0.0,
                            "max_tokens": max_new_tokens(request, _CHAT_MAX_TOKENS)}
    start = assistant_start(request)
    if start:
        messages.append({"role": "assistant", "content": start})
        body.update(add_generation_prompt=False, continue_final_message=True)
    return body


def chat_content(body: dict[str, Any]) -> str:
    """The text of a chat-completions answer."""
    content = body["choices"][0]["message"]["content"]
    if not isinstance(content, str):
        raise TypeError(f"message content is {type(content).__name__}, not text")
    return content


def _parse_result(body: dict[str, Any]) -> Result:
    """A `Result` from an OpenAI transcription answer (json or verbose_json)."""
    words = tuple(
        RecognisedWord(str(w.get("word", "")).strip(), float(w.get("start", 0.0)), float(w.get("end", 0.0)),
             float(w.get("probability", 1.0)))
        for w in body.get("words") or () if isinstance(w, dict))
    language = body.get("language")
    if isinstance(language, str) and language:
        language = language_code(language)
    else:
        language = None
    has_probability = bool(words) and all(
        isinstance(w, dict) and "probability" in w for w in body.get("words") or ())
    confidence = (sum(w.probability for w in words) / len(words)) if has_probability else None
    return Result(text=body["text"].strip(), words=words, language=language,
                  confidence=confidence)
