"""The remote backend without a network: upstream choice and ejection, retries, the request it
sends and the answers it reads (httpx's MockTransport stands in for the upstream servers)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pytest

from sttd.backends import load_backend
from sttd.backends.base import BatchPartlyFailed, Request, Result
from sttd.backends.remote import RemoteBackend, RemoteOptions, UpstreamPool, parse_urls
from sttd.errors import BackendError, ConfigError, UnsupportedLanguage
from sttd.settings import Settings

A, B, C = "http://a/v1", "http://b/v1", "http://c/v1"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _request(kind: str = "final", **kwargs: Any) -> Request:
    return Request(np.zeros(1600, np.float32), kind, **kwargs)  # type: ignore[arg-type]


def _answer(text: str = "hello world", **extra: Any) -> httpx.Response:
    return httpx.Response(200, json={"text": text, **extra})


def _backend(handler: Callable[[httpx.Request], httpx.Response], *urls: str,
             **options: Any) -> tuple[RemoteBackend, list[float]]:
    slept: list[float] = []
    options.setdefault("model", "m")
    backend = RemoteBackend(RemoteOptions(urls=urls or (A, B), **options),
                            transport=httpx.MockTransport(handler), sleep=slept.append)
    return backend, slept


def _form(request: httpx.Request) -> dict[str, list[str]]:
    """The text fields of a multipart request."""
    body = request.content.decode("latin-1")
    boundary = request.headers["content-type"].split("boundary=")[1]
    fields: dict[str, list[str]] = {}
    for part in body.split(f"--{boundary}")[1:-1]:
        head, _, value = part.partition("\r\n\r\n")
        if "filename=" in head:
            continue
        name = head.split('name="')[1].split('"')[0]
        fields.setdefault(name, []).append(value.removesuffix("\r\n"))
    return fields


# --- the pool ---------------------------------------------------------------------------------


def test_pool_prefers_fewest_outstanding_and_takes_turns_on_ties() -> None:
    pool = UpstreamPool.of([A, B, C])
    first = pool.acquire()
    second = pool.acquire()
    third = pool.acquire()
    assert {first.url, second.url, third.url} == {A, B, C}  # each busy once
    pool.release(second, "ok")
    assert pool.acquire() is second  # the only one with nothing outstanding
    turns = set()
    for _ in range(3):
        upstream = pool.acquire()
        turns.add(upstream.url)
        pool.release(upstream, "ok")
    assert turns == {A, B, C}


def test_a_failure_ejects_with_doubling_pauses_and_a_success_restores() -> None:
    clock = Clock()
    pool = UpstreamPool.of([A, B], eject_s=5.0, clock=clock)
    a = next(u for u in pool.upstreams if u.url == A)
    for expected in (5.0, 10.0, 20.0, 40.0, 60.0, 60.0):
        clock.now = max(clock.now, a.ejected_until)  # due again: the probe fails
        a.outstanding += 1
        pool.release(a, "failed", started_at=clock.now)
        assert a.ejected_until == clock.now + expected
    for _ in range(4):
        upstream = pool.acquire()
        assert upstream.url == B  # `a` is out
        pool.release(upstream, "ok")
    clock.now = a.ejected_until
    assert not pool.all_ejected()
    a.outstanding += 1
    pool.release(a, "ok", started_at=clock.now)
    assert (a.failures, a.ejected_until) == (0, 0.0)


def test_requests_failing_together_count_once_and_late_successes_do_not_restore() -> None:
    clock = Clock()
    pool = UpstreamPool.of([A], eject_s=5.0, clock=clock)
    [a] = pool.upstreams
    sent_at = clock.now
    a.outstanding = 10
    clock.now += 1.0  # they fail a second later
    for _ in range(8):  # ten requests in flight when the upstream blinks
        pool.release(a, "failed", started_at=sent_at)
    assert (a.failures, a.ejected_until) == (1, clock.now + 5.0)
    # Two sent before the ejection come back fine: they say nothing of the upstream now.
    pool.release(a, "ok", started_at=sent_at)
    pool.release(a, "ok", started_at=sent_at)
    assert (a.failures, a.ejected_until, a.outstanding) == (1, clock.now + 5.0, 0)
    clock.now += 5.0
    a.outstanding += 1
    pool.release(a, "ok", started_at=clock.now)  # the probe after the pause succeeds
    assert (a.failures, a.ejected_until) == (0, 0.0)


def test_with_every_upstream_ejected_the_one_due_first_is_tried() -> None:
    clock = Clock()
    pool = UpstreamPool.of([A, B], eject_s=5.0, clock=clock)
    a, b = pool.upstreams
    b.outstanding = 2
    pool.release(b, "failed")  # b: first failure, out for 5 s
    clock.now += 5.0
    pool.release(b, "failed")  # due again and failed again: 10 s
    a.outstanding = 1
    pool.release(a, "failed")  # a: first failure, 5 s
    assert pool.all_ejected()
    assert pool.acquire().url == A
    assert pool.acquire(frozenset({A})).url == B  # avoided, if anything else is left


@pytest.mark.parametrize(("inference_lanes", "connections"), [(0, 40 * 8), (3, 40 * 3), (1, 64)])
def test_the_connection_pool_covers_every_request_of_every_lane(
        inference_lanes: int, connections: int) -> None:
    # Eight lanes unless STT_INFERENCE_LANES says otherwise; never fewer than 64 connections.
    backend = load_backend(Settings(backend="remote", remote_urls=A, max_inference_batch_size=40,
                                    inference_lanes=inference_lanes))
    try:
        assert isinstance(backend, RemoteBackend)
        assert (backend.preferred_lanes, backend.options.max_connections) == (8, connections)
    finally:
        backend.close()


def test_urls_are_checked() -> None:
    assert parse_urls(" http://a:8000/v1/ , https://b/v1") == ("http://a:8000/v1", "https://b/v1")
    for bad in ("", " , ", "ftp://a/v1", "a:8000", "http://a/v1,http://a/v1"):
        with pytest.raises(ConfigError):
            parse_urls(bad)


# --- requests and answers ---------------------------------------------------------------------


def test_the_request_carries_the_form_openai_servers_take() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return _answer(" Hi there. ", language="english", words=[
            {"word": " Hi", "start": 0.1, "end": 0.3, "probability": 0.5},
            {"word": " there.", "start": 0.3, "end": 0.6, "probability": 1.0}],
            segments=[{"start": 0.1, "end": 0.6, "text": " Hi there."}])

    backend, _ = _backend(handler, A, api_key="secret")
    [final, partial] = backend.transcribe([_request(language="en", hotwords=("Acme", "Zyx")),
                                           _request("partial")])
    assert final.text == "Hi there." and final.language == "en"
    assert [(w.word, w.start_s, w.end_s) for w in final.words] == [("Hi", 0.1, 0.3),
                                                                   ("there.", 0.3, 0.6)]
    assert final.confidence == pytest.approx(0.75)
    # The answer's segments add nothing to its text and words: the result is exactly these.
    assert final == Result("Hi there.", words=final.words, language="en",
                           confidence=final.confidence)
    by_kind = {("word" in "".join(_form(r).get("timestamp_granularities[]", []))): r
               for r in seen}
    form = _form(by_kind[True])
    assert str(by_kind[True].url) == f"{A}/audio/transcriptions"
    assert by_kind[True].headers["authorization"] == "Bearer secret"
    assert form == {"model": ["m"], "response_format": ["verbose_json"],
                    "timestamp_granularities[]": ["segment", "word"], "language": ["en"],
                    "prompt": ["Acme, Zyx"]}
    assert _form(by_kind[False]) == {"model": ["m"], "response_format": ["verbose_json"]}
    assert b"RIFF" in by_kind[True].content and b"WAVE" in by_kind[True].content


def test_a_final_without_word_timings_asks_the_upstream_for_none() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return _answer(" Hi there. ")

    backend, _ = _backend(handler, A)
    [final] = backend.transcribe([_request(word_timings=False)])
    assert (final.text, final.words) == ("Hi there.", ())
    assert _form(seen[0]) == {"model": ["m"], "response_format": ["verbose_json"]}


def test_a_failing_upstream_is_retried_elsewhere_then_left_out() -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(str(request.url.host))
        if request.url.host == "a":
            raise httpx.ConnectError("connection refused")
        return _answer()

    backend, slept = _backend(handler, A, B)
    results = backend.transcribe([_request() for _ in range(6)])
    assert [r.text for r in results] == ["hello world"] * 6
    assert calls.count("a") == 1  # tried once, then ejected
    assert calls.count("b") == 6
    assert len(slept) == 1 and 0.05 <= slept[0] <= 0.075


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504, 408])
def test_retryable_statuses_move_on(status: int) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, text="busy") if request.url.host == "a" else _answer()

    backend, _ = _backend(handler, A, B)
    assert all(backend.transcribe([_request()])[0].text == "hello world" for _ in range(3))


def test_a_busy_upstream_is_asked_again_after_its_retry_after_and_not_ejected() -> None:
    """Another sttd past its STT_MAX_UPLOADS answers 503 with Retry-After: 5; a few tenths of a
    second later it has room. Its three quick attempts (0.15 s in all) failed the request, and
    lost live finals behind a healthy engine."""
    answers = iter([httpx.Response(503, headers={"Retry-After": "5"}, text="busy")] * 3)

    def handler(request: httpx.Request) -> httpx.Response:
        return next(answers, None) or _answer()

    backend, slept = _backend(handler, A, retries=1)
    assert backend.transcribe([_request()])[0].text == "hello world"
    assert len(slept) == 3 and all(0.25 <= s <= 0.75 for s in slept)  # capped at 0.5 s, jittered
    assert backend.pool.upstreams[0].failures == 0  # busy is not broken
    # With two upstreams, a busy one sends the request to the other at once.
    answers = iter([httpx.Response(503, headers={"Retry-After": "5"}, text="busy")])
    backend, slept = _backend(handler, A, B)
    assert backend.transcribe([_request()])[0].text == "hello world" and slept == []


def test_an_upstream_busy_for_too_long_fails_the_request() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(429, headers={"Retry-After": "1"}, text="slow down")

    backend, slept = _backend(handler, A, retries=0)
    with pytest.raises(BackendError, match="busy"):
        backend.transcribe([_request()])
    assert 4.0 <= sum(slept) <= 5.0  # the busy budget


def test_a_bad_request_is_not_retried_and_names_the_upstream() -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(str(request.url.host))
        return httpx.Response(400, json={"error": {"message": "no such model"}})

    backend, _ = _backend(handler, A, B)
    with pytest.raises(BackendError, match="no such model"):
        backend.transcribe([_request()])
    assert len(calls) == 1
    assert not backend.pool.all_ejected()


def test_when_every_attempt_fails_the_call_fails_with_each_reason() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "a":
            raise httpx.ReadTimeout("timed out")
        return httpx.Response(200, text="<html>not json</html>")

    backend, slept = _backend(handler, A, B, retries=2)
    with pytest.raises(BackendError) as caught:
        backend.transcribe([_request()])
    message = str(caught.value)
    assert "every attempt failed (3)" in message
    assert "ReadTimeout" in message and "not JSON" in message
    assert len(slept) == 2 and slept[1] > slept[0]
    assert backend.pool.all_ejected() and backend.degraded() is not None


def test_the_model_is_learnt_from_the_upstreams_list() -> None:
    models: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"data": [{"id": "Qwen/Qwen3-ASR-1.7B"}]})
        models.extend(_form(request)["model"])
        return _answer()

    backend, _ = _backend(handler, A, model="")
    backend.transcribe([_request(), _request()])
    assert models == ["Qwen/Qwen3-ASR-1.7B"] * 2


def test_malformed_answers_are_failures_not_crashes() -> None:
    answers = iter([httpx.Response(200, json={"words": []}),
                    httpx.Response(200, json={"text": "ok", "words": [{"start": "soon"}]}),
                    _answer("fine")])

    def handler(request: httpx.Request) -> httpx.Response:
        return next(answers)

    backend, _ = _backend(handler, A, B, C, retries=2)
    assert backend.transcribe([_request()])[0].text == "fine"
    assert sum(u.failures for u in backend.pool.upstreams) == 2


# --- what each upstream can do, and what its refusals mean ------------------------------------


def _vllm_refusal(message: str, status: int = 400, err_type: str = "BadRequestError",
                  param: str | None = None) -> httpx.Response:
    """An error answer as vLLM's OpenAI server gives it (its ErrorResponse)."""
    return httpx.Response(status, json={"error": {"message": message, "type": err_type,
                                                  "param": param, "code": status}})


def test_verbose_json_refused_once_per_upstream_then_json_is_asked_for() -> None:
    formats: list[tuple[str, str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        form = _form(request)
        formats.append((str(request.url.host), form["response_format"][0]))
        if request.url.host == "a" and form["response_format"] == ["verbose_json"]:
            return _vllm_refusal("Currently do not support verbose_json for m")
        return _answer("ok")

    backend, _ = _backend(handler, A, B)
    for _ in range(3):
        assert [r.text for r in backend.transcribe([_request(), _request()])] == ["ok", "ok"]
    on_a = [f for host, f in formats if host == "a"]
    assert on_a.count("verbose_json") == 1 and on_a.count("json") >= 2
    assert {f for host, f in formats if host == "b"} == {"verbose_json"}  # b can: it keeps it
    assert all(u.failures == 0 for u in backend.pool.upstreams)
    assert backend.degraded() is None


def test_a_json_answer_carries_no_word_times_and_asks_for_none() -> None:
    forms: list[dict[str, list[str]]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        forms.append(_form(request))
        if _form(request)["response_format"] == ["verbose_json"]:
            return _vllm_refusal("Currently do not support verbose_json for m")
        return httpx.Response(200, json={"text": " hi", "usage": {"type": "duration",
                                                                  "seconds": 1}})

    backend, _ = _backend(handler, A)
    [result] = backend.transcribe([_request(language="de", hotwords=("Acme",))])
    assert result == Result("hi")
    assert forms[-1] == {"model": ["m"], "response_format": ["json"], "language": ["de"],
                         "prompt": ["Acme"]}


@pytest.mark.parametrize("status", [401, 403, 404])
def test_an_upstream_that_can_never_serve_is_ejected_and_another_tried(status: int) -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(str(request.url.host))
        if request.url.host == "a":
            return _vllm_refusal("The model `m` does not exist. Valid aliases: x.", status,
                                 "NotFoundError", "model")
        return _answer()

    backend, _ = _backend(handler, A, B)
    assert [r.text for r in backend.transcribe([_request() for _ in range(4)])] == [
        "hello world"] * 4
    a = next(u for u in backend.pool.upstreams if u.url == A)
    assert a.failures == 1 and calls.count("a") == 1


def test_requests_refused_for_themselves_do_not_eject_but_degrade_health_when_all_fail() -> None:
    refusing = True

    def handler(request: httpx.Request) -> httpx.Response:
        if refusing:
            return _vllm_refusal("Unsupported language: 'xh'.  Must be one of ['zh', 'en'].")
        return _answer()

    backend, _ = _backend(handler, A)
    for count in range(1, 6):
        with pytest.raises(BackendError, match="Unsupported language"):
            backend.transcribe([_request(language="xh")])
        assert not backend.pool.all_ejected()
        assert (backend.degraded() is None) == (count < 5)
    assert "the last 5 requests" in (backend.degraded() or "")
    refusing = False
    backend.transcribe([_request()])  # one success: the line works again
    assert backend.degraded() is None


def test_older_vllms_flat_error_body_is_read_too() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"object": "error", "message": "Invalid or unsupported "
                                         "audio file.", "type": "BadRequestError", "code": 400})

    backend, _ = _backend(handler, A)
    with pytest.raises(BackendError, match=r"HTTP 400: Invalid or unsupported audio file\.$"):
        backend.transcribe([_request()])


def test_one_failed_request_fails_only_itself() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if _form(request).get("language") == ["xh"]:
            return _vllm_refusal("Unsupported language: 'xh'.")
        return _answer()

    backend, _ = _backend(handler, A)
    with pytest.raises(BatchPartlyFailed) as raised:
        backend.transcribe([_request(), _request(language="xh"), _request()])
    first, failed, third = raised.value.outcomes
    assert first == third == Result("hello world")
    assert isinstance(failed, BackendError) and "xh" in str(failed)


def _due_again() -> tuple[Clock, UpstreamPool]:
    """A pool of a and b where a failed once and its 5 s pause is just over."""
    clock = Clock()
    pool = UpstreamPool.of([A, B], eject_s=5.0, clock=clock)
    a = pool.upstreams[0]
    a.outstanding = 1
    pool.release(a, "failed", started_at=clock.now)
    clock.now += 5.0
    return clock, pool


def test_an_ejected_upstream_due_again_gets_one_probe_not_every_request() -> None:
    clock, pool = _due_again()
    a, b = pool.upstreams
    chosen = [pool.acquire() for _ in range(6)]  # six requests at once
    assert [u.url for u in chosen].count(A) == 1  # the probe; the rest went to b
    probe = next(u for u in chosen if u.url == A)
    for upstream in chosen:
        if upstream is not probe:
            pool.release(upstream, "ok", started_at=clock.now)
    assert pool.acquire().url == B  # the probe is still out: a takes nothing else
    pool.release(b, "ok", started_at=clock.now)
    pool.release(probe, "ok", started_at=clock.now)  # it worked: a is back in full
    assert (a.failures, a.probing) == (0, False)
    assert {pool.acquire().url for _ in range(4)} == {A, B}


def test_a_failed_probe_ejects_for_longer_and_frees_the_next_probe() -> None:
    clock, pool = _due_again()
    a = pool.upstreams[0]
    probe = next(u for u in (pool.acquire(), pool.acquire()) if u.url == A)
    pool.release(probe, "failed", started_at=clock.now)
    assert (a.failures, a.probing, a.ejected_until) == (2, False, clock.now + 10.0)


# --- vLLM's chat route, with Qwen3-ASR's own prompt -------------------------------------------


def test_the_chat_route_sends_qwens_prompt_and_reads_its_answer() -> None:
    import base64
    import json

    bodies: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert str(request.url) == f"{A}/chat/completions"
        body = json.loads(request.content)
        bodies.append(body)
        content = (" meters" if body.get("continue_final_message")
                   else "language German<asr_text>Guten Tag")
        return httpx.Response(200, json={"choices": [{"index": 0, "message": {
            "role": "assistant", "content": content}, "finish_reason": "stop"}]})

    backend, _ = _backend(handler, A, api="chat")
    detected, forced = backend.transcribe([
        _request(hotwords=("Acme", "Zyx")),
        _request("partial", prefix="go forward ten", prefix_language="en")])
    assert (detected.text, detected.language) == ("Guten Tag", "de")
    assert (forced.text, forced.language) == ("go forward ten meters", "en")
    # The two went out at once, each on its own thread: tell them apart by what they ask.
    first, second = sorted(bodies, key=lambda body: "continue_final_message" in body)
    assert first["messages"][0] == {"role": "system", "content": "Acme, Zyx"}
    [part] = first["messages"][1]["content"]
    assert part["type"] == "input_audio" and part["input_audio"]["format"] == "wav"
    assert base64.b64decode(part["input_audio"]["data"])[:4] == b"RIFF"
    assert len(first["messages"]) == 2 and "continue_final_message" not in first
    assert (first["temperature"], first["max_tokens"]) == (0.0, 25)
    assert second["messages"][2] == {"role": "assistant",
                                     "content": "language English<asr_text>go forward ten"}
    assert (second["continue_final_message"], second["add_generation_prompt"]) == (True, False)
    # The prompt names the language: only Qwen3-ASR's languages can be asked for.
    backend.check_language("de")
    with pytest.raises(UnsupportedLanguage):
        backend.check_language("xh")
