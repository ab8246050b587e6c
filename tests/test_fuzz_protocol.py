"""Fuzzing the WebSocket protocol (issue 6, bad input): the parsers alone, then the real server.

The parsers (`NativeCodec.decode` and `NativeCodec.accept`) get hypothesis: any text, any
JSON, deep nesting, lone surrogates from JSON escapes, sizes around the 4096-byte limit, any
query. Each input parses to exactly what it says or raises the protocol's error, with a short
message that can go out in a text frame.

The wire tests drive one server each (starting one takes about 10 ms) with many cases drawn
from a seeded `random.Random` plus a curated list of nasty ones: zero-length and odd-length
binary frames, garbage text frames, invalid query parameters and oversized messages. Each case
must get its error (`{"type": "error", ...}`, then the close the README gives, or none where the
session goes on), be counted in ``sttd_errors_total``, and leave the server and a concurrent
normal session untouched: that session still gets its exact finals and /health stays 200.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable
from typing import Any, Final
from urllib.parse import urlencode

import attrs
import httpx
import numpy as np
import numpy.typing as npt
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from werkzeug.datastructures import MultiDict

from sttd.api import (
    MAX_TEXT_MESSAGE_BYTES,
    ClientCommand,
    Commit,
    End,
    Error,
    KeepAlive,
    NativeCodec,
    SessionRequest,
)
from sttd.errors import InvalidMessage, InvalidParam
from sttd.settings import Settings
from tests.conftest import RunningServer, load_pcm, reference_texts, silence, start_server

_FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_MAX_ERROR_CHARS: Final = 500  # a sentence quoting at most 40 characters of the input
TIMEOUT_S: Final = 30
_SEED: Final = 6  # issue 6; change it to explore, keep it fixed to reproduce
_PARAMS: Final = ("call_id", "sample_rate", "codec", "channels", "frame_ms", "partial_ms", "language",
                  "hotwords")


def _assert_sendable(error: InvalidMessage | InvalidParam) -> None:
    """The error's message is a short sentence that encodes as a text frame."""
    message = str(error)
    assert message
    assert len(message) <= _MAX_ERROR_CHARS, message
    [frame] = NativeCodec().encode(Error(error.code, message))
    frame.encode("utf-8")


def parse_client_message(text: str, received_at: float) -> ClientCommand:
    return NativeCodec().decode(text, received_at)


# --- NativeCodec.decode ------------------------------------------------------------------------


# Any code point, lone surrogates included (they reach a server only through JSON escapes).
_ANY_CHAR = st.characters(exclude_categories=())
_JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(_ANY_CHAR, max_size=20))
_JSON = st.recursive(_JSON_SCALARS, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(_ANY_CHAR, max_size=8), inner, max_size=4), max_leaves=12)
_TYPES = st.sampled_from(["commit", "end", "keepalive", "COMMIT", " end", "end ", "keep-alive", "", "\ud800",
                          "comm\u0000it"]) | _JSON
_EXPECTED_ITEMS: dict[object, Callable[[float], object]] = {
    "commit": Commit, "end": End, "keepalive": lambda _at: KeepAlive()}


def _expected_item(message: object) -> object:
    """What `parse_client_message` must return for this decoded JSON, or InvalidMessage."""
    if not isinstance(message, dict):
        return InvalidMessage
    kind = message.get("type")
    if isinstance(kind, str) and kind in _EXPECTED_ITEMS:
        return _EXPECTED_ITEMS[kind](1.25)
    return InvalidMessage


def _parse(text: str) -> object:
    try:
        return parse_client_message(text, 1.25)
    except InvalidMessage as exc:
        _assert_sendable(exc)
        return exc


@_FUZZ
@given(text=st.text(_ANY_CHAR, max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_any_text_is_a_message_or_invalid_message(text: str) -> None:
    outcome = _parse(text)
    if not isinstance(outcome, InvalidMessage):
        assert outcome == _expected_item(json.loads(text))


@_FUZZ
@given(kind=_TYPES, extra=st.dictionaries(st.text(_ANY_CHAR, max_size=8), _JSON, max_size=3),
       has_type=st.booleans(), ascii_only=st.booleans())
def test_any_json_object_is_parsed_by_its_type(kind: object, extra: dict[str, object], has_type: bool,
                                               ascii_only: bool) -> None:
    message = {**extra, **({"type": kind} if has_type else {})}
    # ensure_ascii writes lone surrogates as \\udxxx escapes, which is how they arrive in a frame.
    text = json.dumps(message, ensure_ascii=ascii_only or _has_surrogate(message))
    outcome = _parse(text)
    if len(text.encode("utf-8", "surrogatepass")) > MAX_TEXT_MESSAGE_BYTES:
        assert isinstance(outcome, InvalidMessage)
    elif isinstance(_expected_item(message), type):
        assert isinstance(outcome, InvalidMessage)
    else:
        assert outcome == _expected_item(message)


def _has_surrogate(value: object) -> bool:
    return any(0xD800 <= ord(ch) <= 0xDFFF for ch in json.dumps(value, ensure_ascii=False))


@_FUZZ
@given(value=_JSON.filter(lambda value: not isinstance(value, dict)))
def test_json_that_is_not_an_object_is_refused(value: object) -> None:
    outcome = _parse(json.dumps(value))
    assert isinstance(outcome, InvalidMessage)
    assert "must be JSON objects" in str(outcome) or "at most 4096 bytes" in str(outcome)


@_FUZZ
@given(depth=st.integers(1, 2100), opener=st.sampled_from(["[", '{"a":', '{"type":[', "[{}, "]),
       closed=st.booleans())
def test_deep_nesting_is_invalid_message_not_a_crash(depth: int, opener: str, closed: bool) -> None:
    closer = {"[": "]", '{"a":': "}", '{"type":[': "]}", "[{}, ": "]"}[opener]
    text = opener * depth + "0" + (closer * depth if closed else "")
    outcome = _parse(text)
    assert isinstance(outcome, InvalidMessage), outcome


@pytest.mark.parametrize("depth", [900, 1000, 2040])
def test_deep_nesting_under_the_size_limit_is_refused(depth: int) -> None:
    text = "[" * depth + "]" * depth
    assert len(text) <= MAX_TEXT_MESSAGE_BYTES
    with pytest.raises(InvalidMessage, match="nested too deeply|must be JSON objects"):
        parse_client_message(text, 0.0)


@_FUZZ
@given(size=st.integers(MAX_TEXT_MESSAGE_BYTES - 40, MAX_TEXT_MESSAGE_BYTES + 40) | st.integers(0, 1 << 20),
       char=st.sampled_from(["x", "\u00e9", "\u20ac", "\U0001f600", "\\ud800"]))
def test_huge_strings_are_measured_in_utf8_bytes(size: int, char: str) -> None:
    head = '{"type":"commit","pad":"'
    count = max(0, (size - len(head) - 2) // len(char.encode("utf-8")))
    text = head + char * count + '"}'
    outcome = _parse(text)
    if len(text.encode("utf-8")) <= MAX_TEXT_MESSAGE_BYTES:
        assert outcome == Commit(1.25)
    else:
        assert isinstance(outcome, InvalidMessage)
        assert f"at most {MAX_TEXT_MESSAGE_BYTES} bytes, got {len(text.encode('utf-8'))}" in str(outcome)


# --- NativeCodec.accept --------------------------------------------------------------------


_DIGITS = st.sampled_from(["16000", "1", "20", "10", "200", "100", "99", "201", "0", "-1", " 16000", "16_000",
                           "\u0661\u0666\u0660\u0660\u0660", "1e4", "9" * 5000, "", "0x10", "\uff11\uff10"])
_QUERY_VALUES = st.one_of(_DIGITS, st.text(_ANY_CHAR, max_size=30),
                          st.sampled_from(["auto", "en", "en-US", "fr", "x" * 300, "a," * 120, "pcm_s16le"]))
_QUERIES = st.dictionaries(st.sampled_from(_PARAMS) | st.text(max_size=5), _QUERY_VALUES, max_size=10)


def _assert_valid(request: SessionRequest, query: dict[str, str]) -> None:
    assert request.call_id == query["call_id"].strip() and 1 <= len(request.call_id) <= 256
    assert request.audio_format.is_native
    assert query.get("codec", "pcm_s16le") == "pcm_s16le"
    assert 10 <= int(query.get("frame_ms", "20")) <= 200
    params = request.options
    assert params.partial_ms >= 100
    assert params.language is None or params.language == query["language"].strip()
    assert len(params.hotwords) <= 100
    assert all(word and word == word.strip() and len(word) <= 64 for word in params.hotwords)


@_FUZZ
@given(query=_QUERIES, base=st.booleans())
def test_any_query_gives_params_or_names_the_bad_one(query: dict[str, str], base: bool) -> None:
    if base:  # most of the draws then get past the required parameters
        query = {"call_id": "c", "sample_rate": "16000", **query}
    try:
        request = NativeCodec().accept(MultiDict(query), Settings())
    except InvalidParam as exc:
        assert exc.param in _PARAMS
        assert exc.param in str(exc)
        assert exc.code == "invalid_param" and exc.ws_close_code == 1008
        _assert_sendable(exc)
        return
    _assert_valid(request, query)


# --- the real server -----------------------------------------------------------------------------


def _metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def _scrape(server: RunningServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with httpx.AsyncClient(base_url=server.http_url, timeout=TIMEOUT_S) as client:
        assert (await client.get("/health")).status_code == 200
        return _metrics((await client.get("/metrics")).text)


def _errors(metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], code: str) -> float:
    return metrics.get(("sttd_errors_total", (("code", code),)), 0.0)


@attrs.frozen
class _Outcome:
    """What one session received: its messages in order, and the close code."""

    messages: list[dict[str, Any]]
    close_code: int

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [message for message in self.messages if message["type"] == kind]


async def _session(url: str, frames: list[bytes | str]) -> _Outcome:
    """Send `frames` while reading everything the server sends until it closes."""
    messages: list[dict[str, Any]] = []
    code = -1

    async def read(ws: WebSocketConnection) -> None:
        nonlocal code
        while True:
            try:
                messages.append(json.loads(await ws.get_message()))
            except ConnectionClosed as closed:
                assert closed.reason is not None
                code = closed.reason.code
                return

    async def write(ws: WebSocketConnection) -> None:
        try:
            for frame in frames:
                await ws.send_message(frame)
        except ConnectionClosed:
            pass  # the server closed first; what it sent says why

    async with open_websocket_url(url, max_message_size=1 << 20) as ws:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read, ws)
            nursery.start_soon(write, ws)
    return _Outcome(messages, code)


def _speech_frames(name: str, rng: random.Random, *, nasty: bool) -> list[bytes]:
    """A fixture and a second of silence, cut at random lengths: with `nasty`, many of them empty or odd."""
    pcm: npt.NDArray[np.int16] = np.concatenate([load_pcm(name), silence(1.0)])
    data = pcm.tobytes()
    frames = []
    offset = 0
    while offset < len(data):
        if nasty and rng.random() < 0.2:
            size = rng.choice([0, 0, 1, 3])
        else:
            # Frames of about 100 ms: a fixture then fits the input queue whatever the load.
            size = rng.choice([3199, 3200, 3201, 4801]) if nasty else 3200
        frames.append(data[offset : offset + size])
        offset += size
    return frames


def _garbage_texts(rng: random.Random, count: int) -> list[str]:
    """Text frames that are not valid client messages: curated nasties, then random ones."""
    curated = [
        "", " ", "not json", "{", "}", "null", "[]", '"end"', "42", "1e999", "NaN", "true",
        "{}", '{"type": null}', '{"type": "END"}', '{"type": "rewind"}', '{"type": ["end"]}',
        '{"type": {"type": "end"}}', '{"TYPE": "end"}', '{"type": "\\ud800"}', '{"\\udfff": "\\udfff"}',
        '{"type": "\\u0000"}', '{"type": "commit\\u0000"}', "\ufeff{\"type\": \"end\"}", "{'type': 'end'}",
        '{"type": "x' + "\U0001f600" * 1200 + '"}',  # over 4096 bytes in UTF-8, under it in characters
        '{"type": "end", "pad": "' + "y" * 5000 + '"}',  # a valid end, but over the size limit
        "[" * 2000 + "]" * 2000, '{"a":' * 1300 + "0" + "}" * 1300,
        "\u0000\u0001\u0002", "\u202e\u2028\u2029", "9" * 4000,
    ]
    alphabet = string.printable + "\u00e9\u20ac\U0001f600{}[]\":,\\"
    generated: list[str] = []
    while len(curated) + len(generated) < count:
        shape = rng.randrange(4)
        if shape == 0:
            text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 60)))
        elif shape == 1:
            text = json.dumps({"type": "".join(rng.choice(string.ascii_letters) for _ in range(rng.randrange(9)))})
        elif shape == 2:
            text = json.dumps(rng.choice([[], 0, "", None, False, 1.5, ["commit"]]))
        else:
            text = '{"type": "\\u' + f"{rng.randrange(0xD800, 0xE000):04x}" + '"}'
        if text not in ('{"type": "commit"}', '{"type": "end"}', '{"type": "keepalive"}'):
            generated.append(text)
    return curated + generated


def _interleave(rng: random.Random, frames: list[bytes], texts: list[str]) -> list[bytes | str]:
    """`frames` in order, with `texts` and keepalives at random places among them, then end."""
    out: list[bytes | str] = list(frames)
    for text in [*texts, json.dumps({"type": "keepalive"})]:
        out.insert(rng.randrange(len(out) + 1), text)
    out.append(json.dumps({"type": "end"}))
    return out


_FIXTURES: Final = ("ps_goforward", "ps_cards_001", "ps_librivox_0930")
_FUZZ_SESSIONS: Final = 6
_GARBAGE_PER_SESSION: Final = 40


async def test_garbage_frames_get_errors_and_the_session_goes_on(nursery: trio.Nursery) -> None:
    """Six sessions stream a fixture cut into empty and odd frames among garbage text frames.

    Each garbage frame gets exactly one invalid_message error, the session goes on, and its
    final is the fixture's exact text; a clean session running alongside gets its final too.
    Admission from measured capacity is off (STT_MAX_LOAD=0): it is not what this tests, and
    on a slow or busy machine it may refuse one of the seven.
    """
    server = await start_server(nursery, max_load=0.0)
    refs = reference_texts()
    rng = random.Random(_SEED)
    plans = []
    for index in range(_FUZZ_SESSIONS):
        name = _FIXTURES[index % len(_FIXTURES)]
        garbage = _garbage_texts(rng, _GARBAGE_PER_SESSION)
        rng.shuffle(garbage)
        plans.append((name, garbage, _interleave(rng, _speech_frames(name, rng, nasty=True), garbage)))
    outcomes: dict[int, _Outcome] = {}

    async def run(index: int, frames: list[bytes | str]) -> None:
        outcomes[index] = await _session(server.ws_url(f"call_id=fuzz-{index}&sample_rate=16000"), frames)

    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as sessions:
            sessions.start_soon(run, -1, _interleave(rng, _speech_frames("ps_librivox_0880", rng, nasty=False), []))
            for index, (_name, _garbage, frames) in enumerate(plans):
                sessions.start_soon(run, index, frames)
        metrics = await _scrape(server)

    clean = outcomes[-1]
    assert [m["text"] for m in clean.of_type("final")] == [refs["ps_librivox_0880"]]
    assert clean.of_type("error") == [] and clean.close_code == 1000
    for index, (name, garbage, _frames) in enumerate(plans):
        outcome = outcomes[index]
        errors = outcome.of_type("error")
        assert len(errors) == len(garbage), [e["message"] for e in errors]
        assert {e["code"] for e in errors} == {"invalid_message"}
        assert all(e["message"] and len(e["message"]) <= _MAX_ERROR_CHARS for e in errors)
        assert [m["text"] for m in outcome.of_type("final")] == [refs[name]]
        assert {m["type"] for m in outcome.messages} <= {"ready", "partial", "final", "error"}
        assert outcome.close_code == 1000
    assert _errors(metrics, "invalid_message") == _FUZZ_SESSIONS * _GARBAGE_PER_SESSION
    assert _errors(metrics, "internal") == 0
    assert metrics[("sttd_sessions_total", (("outcome", "ended"),))] == _FUZZ_SESSIONS + 1
    assert metrics[("sttd_sessions_active", ())] == 0
    assert metrics[("sttd_frames_dropped_total", ())] == 0


def _random_query(rng: random.Random) -> dict[str, str]:
    """A query whose values are mostly right and sometimes wrong in one of many ways."""
    def value(good: str, bad: list[str]) -> str | None:
        roll = rng.random()
        return None if roll < 0.05 else good if roll < 0.8 else rng.choice(bad)

    numbers = ["", "abc", "-1", "0", "1.5", "1e3", "0x10", "9" * 50, " ", "\u0661", "NaN"]
    fields = {
        "call_id": value("call-" + str(rng.randrange(1000)), ["", "   ", "c" * 257, "\u00e9" * 10, "a\u0000b",
                                                             "\U0001f600", "%ff"]),
        "sample_rate": value("16000", ["8000", "44100", "16001", *numbers]),
        "codec": value("pcm_s16le", ["opus", "PCM_S16LE", "pcm_s16le ", "", "\u00e9"]),
        "channels": value("1", ["2", "0", *numbers]),
        "frame_ms": value(str(rng.randrange(10, 201)), ["9", "201", "5", *numbers]),
        "partial_ms": value(str(rng.randrange(100, 2000)), ["99", "0", *numbers]),
        "language": value(rng.choice(["auto", "en", "en-US", ""]), ["fr", "english!", "e", "en_US", "x" * 100,
                                                                    "de-DE", "\u00e9n"]),
        "hotwords": value("kubernetes, gRPC", [",".join(["w"] * 101), "y" * 65, ",,,", "\u00e9" * 64]),
    }
    query = {key: text for key, text in fields.items() if text is not None}
    if rng.random() < 0.1:
        query["unknown_" + str(rng.randrange(10))] = "x"
    return query


# Queries whose raw form matters (repeats, bad percent-encoding): (raw query, expected error param or None).
_RAW_QUERIES: Final = [
    ("call_id=%ff%fe&sample_rate=16000", None),  # invalid UTF-8 stays percent-encoded
    ("call_id=%ed%a0%80&sample_rate=16000", None),  # an encoded lone surrogate, likewise
    ("call_id=a&call_id=&sample_rate=16000", None),  # the first of a repeated key counts
    ("call_id=&call_id=a&sample_rate=16000", "call_id"),
    ("call_id=a&sample_rate=16000&sample_rate=8000", None),
    ("call_id=%00&sample_rate=16000", None),
    ("call_id=a%26b%3Dc&sample_rate=16000", None),
    ("call_id=a&sample_rate=16000&frame_ms=%2B20", None),  # int() takes "+20"
    ("call_id=" + "c" * 4000 + "&sample_rate=16000", "call_id"),
    ("sample_rate=16000&=x&&&call_id=a", None),
    ("call_id=a&sample_rate=1%3000", "sample_rate"),  # 1000, below the lowest rate
    ("call_id=a;sample_rate=16000", "sample_rate"),
    ("call_id=a&sample_rate=16000&language=fr", "language!"),  # valid, but not for the mock backend
    ("call_id=a&sample_rate=16000&language=de-DE", "language!"),
    ("call_id=a&sample_rate=16000&language=EN-gb", None),
]
_RANDOM_QUERIES: Final = 60


async def test_invalid_queries_get_invalid_param_then_1008(nursery: trio.Nursery) -> None:
    """Sixty random queries and fifteen raw ones: each is refused naming its bad parameter, or served."""
    server = await start_server(nursery)
    rng = random.Random(_SEED)
    cases: list[tuple[str, str | None, str | None]] = []  # raw query, bad param, call_id echoed
    for _ in range(_RANDOM_QUERIES):
        query = _random_query(rng)
        try:
            request = NativeCodec().accept(MultiDict(query), Settings())
        except InvalidParam as exc:
            cases.append((urlencode(query), exc.param, None))
        else:
            language = request.options.language
            language_ok = language is None or language.split("-")[0].lower() == "en"
            cases.append((urlencode(query), None if language_ok else "language!", request.call_id))
    cases.extend((raw, param, None) for raw, param in _RAW_QUERIES)
    clean_frames = _interleave(rng, _speech_frames("ps_cards_001", rng, nasty=False), [])
    results: list[_Outcome] = []

    async def refuse_all() -> None:
        for raw, _param, _call_id in cases:
            results.append(await _session(server.ws_url(raw), [json.dumps({"type": "end"})]))

    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as sessions:
            sessions.start_soon(refuse_all)
            clean = await _session(server.ws_url(), clean_frames)
        metrics = await _scrape(server)

    assert [m["text"] for m in clean.of_type("final")] == [reference_texts()["ps_cards_001"]]
    refused = {"invalid_param": 0, "unsupported_language": 0}
    for (raw, param, call_id), outcome in zip(cases, results, strict=True):
        if param is None:
            assert outcome.messages[0]["type"] == "ready", (raw, outcome)
            if call_id is not None:
                assert outcome.messages[0]["call_id"] == call_id
            assert outcome.close_code == 1000, (raw, outcome)
            continue
        code = "unsupported_language" if param == "language!" else "invalid_param"
        refused[code] += 1
        assert [(m["type"], m["code"]) for m in outcome.messages] == [("error", code)], (raw, outcome)
        assert param.rstrip("!") in outcome.messages[0]["message"]
        assert len(outcome.messages[0]["message"]) <= _MAX_ERROR_CHARS
        assert outcome.close_code == 1008, (raw, outcome)
    assert _errors(metrics, "invalid_param") == refused["invalid_param"]
    assert _errors(metrics, "unsupported_language") == refused["unsupported_language"]
    assert metrics[("sttd_sessions_total", (("outcome", "rejected"),))] == sum(refused.values())
    assert _errors(metrics, "internal") == 0


async def test_oversized_messages_close_1009_and_the_server_goes_on() -> None:
    """Messages past STT_MAX_MESSAGE_BYTES (1 MiB by default) close that session with 1009, and only it.

    Each oversized message is followed by what a client sends next (an end, then its answer to
    the close). A message exactly at the limit is let through to the protocol, which refuses a
    text frame that long as invalid_message and goes on.
    """
    end = json.dumps({"type": "end"})
    rng = random.Random(_SEED)
    clean_frames = _interleave(rng, _speech_frames("ps_goforward", rng, nasty=False), [])
    results: list[_Outcome] = []
    # The server runs in this test's own nursery, so that if it dies the test fails, not a fixture.
    async with trio.open_nursery() as nursery:
        server = await start_server(nursery)
        limit = server.state.settings.max_message_bytes
        oversized: list[list[bytes | str]] = [
            [bytes(limit + 1), end],  # binary past the limit, then text
            [bytes(640), "x" * (limit + 1), bytes(640), end],  # text past the limit, then binary
            [bytes(10_000_000), end],  # 10 MB of audio in one frame
            [json.dumps({"type": "end", "pad": "y" * 2_000_000}), end],
        ]

        async def send_oversized() -> None:
            for frames in oversized:
                with trio.fail_after(5):
                    results.append(await _session(server.ws_url(), frames))
            results.append(await _session(server.ws_url(), ["z" * limit, end]))

        with trio.fail_after(TIMEOUT_S):
            async with trio.open_nursery() as sessions:
                sessions.start_soon(send_oversized)
                clean = await _session(server.ws_url(), clean_frames)
            metrics = await _scrape(server)
        nursery.cancel_scope.cancel()

    assert [m["text"] for m in clean.of_type("final")] == [reference_texts()["ps_goforward"]]
    assert [outcome.close_code for outcome in results] == [1009] * len(oversized) + [1000]
    for outcome in results[:-1]:
        assert [m["code"] for m in outcome.of_type("error")] == ["payload_too_large"]
        assert "at most 1048576 bytes" in outcome.of_type("error")[0]["message"]
    assert [m["code"] for m in results[-1].of_type("error")] == ["invalid_message"]
    assert _errors(metrics, "payload_too_large") == len(oversized)
    assert _errors(metrics, "internal") == 0
