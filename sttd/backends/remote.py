"""Remote backend: utterances go to OpenAI-compatible transcription servers over HTTP.

The way past one machine: a fleet of vLLM servers running Qwen3-ASR, speaches, or other sttd
instances does the recognising, and this process keeps the sessions, the VAD and the protocol.

Theory of operation. Every request of a batch is sent at once, each on its own worker thread,
as a WAV file to ``POST {upstream}/audio/transcriptions`` over one pooled `httpx.Client`. An
`UpstreamPool` picks the upstream with the fewest requests outstanding (ties in turn). An
attempt that fails in a way worth retrying (no connection, a timeout, a 5xx, 408 or 429) marks
its upstream failed and is retried, after a short jittered backoff, on another upstream while
`retries` allow; transcribing is idempotent, so a retry can only cost time. A failed upstream is
ejected (not chosen) for `eject_s`, doubled for each further failure in a row up to 60 s; when
it is due, the next request probes it, and one success restores it. While every upstream is
ejected, the one due soonest is tried anyway rather than failing at once. Other 4xx answers
(bad audio, unknown model) are not retried: they fail the call with the upstream's message.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import attrs
import httpx

from sttd.audio import encode_wav
from sttd.backends.base import ASRBackend, Request, Result, RecognisedWord
from sttd.errors import BackendError, ConfigError
from sttd.api import language_code

__all__ = ["RemoteBackend", "RemoteOptions", "Upstream", "UpstreamPool", "parse_urls"]

log = logging.getLogger(__name__)

_MAX_EJECT_S = 60.0
_BACKOFF_S = 0.05  # first retry's wait; doubles per attempt, plus up to 50% jitter
_RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
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


@attrs.define
class Upstream:
    """One server, and what the pool knows of it."""

    url: str
    outstanding: int = 0
    failures: int = 0  # in a row
    ejected_until: float = 0.0
    ejected_at: float = -math.inf  # when the latest ejection began
    model: str = ""  # learnt from /models when no model was configured


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
        ones in `avoid`; with none healthy, the ejected one due back soonest.
        """
        with self._lock:
            now = self.clock()
            self._turn += 1
            count = len(self.upstreams)
            order = [self.upstreams[(self._turn + i) % count] for i in range(count)]
            healthy = [u for u in order if u.ejected_until <= now]
            fresh = [u for u in healthy if u.url not in avoid]
            if fresh or healthy:
                chosen = min(fresh or healthy, key=lambda u: u.outstanding)
            else:
                chosen = min(order, key=lambda u: (u.url in avoid, u.ejected_until))
            chosen.outstanding += 1
            return chosen

    def release(self, upstream: Upstream, *, ok: bool, started_at: float | None = None) -> None:
        """End a request to `upstream` sent at `started_at` (this pool's clock); a failure
        ejects it, a success restores it.

        Requests in flight together fail together: while `upstream` is ejected, more failures
        do not lengthen its pause; and a success of a request sent before the latest ejection
        says nothing of the upstream now, so it does not restore it.
        """
        with self._lock:
            upstream.outstanding -= 1
            now = self.clock()
            if ok:
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


class _Retryable(Exception):
    """An attempt failed in a way another attempt may not."""


class RemoteBackend(ASRBackend):
    """Sends each request to an upstream transcription server; see the module docstring."""

    name = "remote"
    # Batches the scheduler may have in flight at once: each request goes out on its own.
    preferred_lanes = 8

    def __init__(self, options: RemoteOptions, *, transport: httpx.BaseTransport | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.options = options
        self.pool = UpstreamPool.of(options.urls, eject_s=options.eject_s)
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
        return None  # the upstream decides, and says so in its answer

    def degraded(self) -> str | None:
        """Why /health should say degraded, or None."""
        return "every remote upstream is failing" if self.pool.all_ejected() else None

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)
        self._client.close()

    def transcribe(self, requests: Sequence[Request]) -> list[Result]:
        if len(requests) == 1:
            return [self._transcribe_one(requests[0])]
        futures = [self._threads.submit(self._transcribe_one, r) for r in requests]
        concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_EXCEPTION)
        for future in futures:
            error = future.exception() if future.done() and not future.cancelled() else None
            if error is not None:
                # The call fails: do not send what has not gone out yet.
                for other in futures:
                    other.cancel()
                raise error
        return [future.result() for future in futures]

    def _transcribe_one(self, request: Request) -> Result:
        wav = encode_wav(request.audio)
        tried: set[str] = set()
        errors: list[str] = []
        for attempt in range(self.options.retries + 1):
            if attempt:
                self._sleep(_BACKOFF_S * 2 ** (attempt - 1) * (1 + random.random() / 2))
            started_at = self.pool.clock()
            upstream = self.pool.acquire(frozenset(tried))
            tried.add(upstream.url)
            try:
                body = self._post(upstream, request, wav)
                result = _parse_result(body)
            except (ValueError, TypeError) as exc:  # an answer of the wrong shape
                self.pool.release(upstream, ok=False, started_at=started_at)
                errors.append(f"{upstream.url}: malformed answer: {exc}")
                continue
            except _Retryable as exc:
                self.pool.release(upstream, ok=False, started_at=started_at)
                errors.append(f"{upstream.url}: {exc}")
                continue
            except BaseException:
                # The upstream answered; the request is what was bad.
                self.pool.release(upstream, ok=True, started_at=started_at)
                raise
            self.pool.release(upstream, ok=True, started_at=started_at)
            return result
        raise BackendError(f"every attempt failed ({len(errors)}): " + "; ".join(errors))

    def _post(self, upstream: Upstream, request: Request, wav: bytes) -> dict[str, Any]:
        data: dict[str, Any] = {
            "model": self.options.model or upstream.model or self._learn_model(upstream),
            "response_format": "verbose_json",
        }
        if request.kind == "final":
            data["timestamp_granularities[]"] = ["segment", "word"]
        if request.language:
            data["language"] = request.language
        if request.hotwords:
            data["prompt"] = ", ".join(request.hotwords)
        try:
            response = self._client.post(f"{upstream.url}/audio/transcriptions", data=data,
                                         files={"file": ("audio.wav", wav, "audio/wav")})
        except httpx.TransportError as exc:  # connect, read, write, pool timeouts and errors
            raise _Retryable(f"{type(exc).__name__}: {exc}") from exc
        if response.status_code in _RETRY_STATUSES:
            raise _Retryable(f"HTTP {response.status_code}: {response.text[:_MAX_ERROR_CHARS]}")
        if response.status_code != 200:
            raise BackendError(f"upstream {upstream.url} refused the request: HTTP "
                               f"{response.status_code}: {response.text[:_MAX_ERROR_CHARS]}")
        try:
            body = response.json()
        except ValueError:
            raise _Retryable(f"not JSON: {response.text[:_MAX_ERROR_CHARS]!r}") from None
        if not isinstance(body, dict) or not isinstance(body.get("text"), str):
            raise _Retryable(f"no 'text' in the answer: {str(body)[:_MAX_ERROR_CHARS]}")
        return body

    def _learn_model(self, upstream: Upstream) -> str:
        """The first model `upstream` lists (OpenAI's GET /models), remembered."""
        try:
            response = self._client.get(f"{upstream.url}/models")
            if response.status_code in _RETRY_STATUSES:
                raise _Retryable(f"GET /models: HTTP {response.status_code}")
            models = response.json().get("data") or []
            upstream.model = str(models[0]["id"])
        except httpx.TransportError as exc:
            raise _Retryable(f"GET /models: {type(exc).__name__}: {exc}") from exc
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise BackendError(
                f"upstream {upstream.url} lists no model at /models; set STT_REMOTE_MODEL"
            ) from None
        return upstream.model


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
