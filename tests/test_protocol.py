"""Tests for sttd.protocol: query parameters, client text frames and outbound messages."""

from __future__ import annotations

import json

import pytest

from sttd.backends.base import Result, Segment, Word
from sttd.channels import Commit, End
from sttd.errors import InvalidMessage, InvalidParam
from sttd.protocol import (
    MAX_TEXT_MESSAGE_BYTES,
    SessionParams,
    dumps,
    error_message,
    parse_client_message,
    ready_message,
    transcript_message,
)

VALID = {"call_id": "call-1", "sample_rate": "16000"}


def with_(**changes: str) -> dict[str, str]:
    return {**VALID, **changes}


# --- SessionParams: valid ------------------------------------------------------------------------


def test_minimal_query_gives_defaults() -> None:
    assert SessionParams.from_query(VALID) == SessionParams(
        call_id="call-1", sample_rate_hz=16000, codec="pcm_s16le", channels=1, frame_ms=20,
        partial_ms=500, language=None, hotwords=())


def test_every_parameter_parses() -> None:
    query = with_(call_id="  abc  ", codec="pcm_s16le", channels="1", frame_ms="200", partial_ms="100",
                  language="en-US", hotwords="a, b,,c")
    assert SessionParams.from_query(query) == SessionParams(
        call_id="abc", frame_ms=200, partial_ms=100, language="en-US", hotwords=("a", "b", "c"))


@pytest.mark.parametrize(("raw", "expected"), [("auto", None), ("", None), (" auto ", None), ("en", "en"),
                                               ("en-US", "en-US"), ("yue", "yue"), ("zh-Hant-TW", "zh-Hant-TW")])
def test_language(raw: str, expected: str | None) -> None:
    assert SessionParams.from_query(with_(language=raw)).language == expected


@pytest.mark.parametrize(("raw", "expected"), [("", ()), (" , ,", ()), ("a, b,,c", ("a", "b", "c")),
                                               ("Kubernetes , gRPC", ("Kubernetes", "gRPC")),
                                               (",".join(["w"] * 100), ("w",) * 100), ("x" * 64, ("x" * 64,))])
def test_hotwords(raw: str, expected: tuple[str, ...]) -> None:
    assert SessionParams.from_query(with_(hotwords=raw)).hotwords == expected


@pytest.mark.parametrize(("default_partial_ms", "query_partial_ms", "expected"),
                         [(1000, None, 1000), (1000, "300", 300), (50, None, 100), (100, None, 100)])
def test_default_partial_ms(default_partial_ms: int, query_partial_ms: str | None, expected: int) -> None:
    query = VALID if query_partial_ms is None else with_(partial_ms=query_partial_ms)
    params = SessionParams.from_query(query, default_partial_ms=default_partial_ms)
    assert params.partial_ms == expected


@pytest.mark.parametrize("frame_ms", [10, 20, 200])
def test_frame_ms_bounds_accepted(frame_ms: int) -> None:
    assert SessionParams.from_query(with_(frame_ms=str(frame_ms))).frame_ms == frame_ms


def test_call_id_of_256_characters_accepted() -> None:
    assert SessionParams.from_query(with_(call_id="c" * 256)).call_id == "c" * 256


# --- SessionParams: invalid ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "param", "message"),
    [
        ({"sample_rate": "16000"}, "call_id", "call_id is required, got nothing"),
        (with_(call_id=""), "call_id", "call_id is required, got nothing"),
        (with_(call_id="   "), "call_id", "call_id is required, got nothing"),
        (with_(call_id="c" * 257), "call_id", "call_id must be at most 256 characters, got 257"),
        ({"call_id": "x"}, "sample_rate", "sample_rate is required and must be 16000"),
        (with_(sample_rate="8000"), "sample_rate", "sample_rate must be 16000, got 8000"),
        (with_(sample_rate="abc"), "sample_rate", "sample_rate must be an integer, got 'abc'"),
        (with_(sample_rate=""), "sample_rate", "sample_rate must be an integer, got ''"),
        (with_(codec="opus"), "codec", "codec must be pcm_s16le, got 'opus'"),
        (with_(channels="2"), "channels", "channels must be 1, got 2"),
        (with_(channels="mono"), "channels", "channels must be an integer, got 'mono'"),
        (with_(frame_ms="5"), "frame_ms", "frame_ms must be in 10..200, got 5"),
        (with_(frame_ms="9"), "frame_ms", "frame_ms must be in 10..200, got 9"),
        (with_(frame_ms="201"), "frame_ms", "frame_ms must be in 10..200, got 201"),
        (with_(frame_ms="x"), "frame_ms", "frame_ms must be an integer, got 'x'"),
        (with_(partial_ms="50"), "partial_ms", "partial_ms must be >= 100, got 50"),
        (with_(partial_ms="99"), "partial_ms", "partial_ms must be >= 100, got 99"),
        (with_(partial_ms="1.5"), "partial_ms", "partial_ms must be an integer, got '1.5'"),
        (with_(language="english!"), "language",
         "language must be 'auto' or a BCP-47 code such as 'en' or 'en-US', got 'english!'"),
        (with_(language="e"), "language",
         "language must be 'auto' or a BCP-47 code such as 'en' or 'en-US', got 'e'"),
        (with_(language="en_US"), "language",
         "language must be 'auto' or a BCP-47 code such as 'en' or 'en-US', got 'en_US'"),
        (with_(hotwords=",".join(["w"] * 101)), "hotwords", "hotwords must hold at most 100 entries, got 101"),
        (with_(hotwords="ok," + "y" * 65), "hotwords",
         "each of hotwords must be at most 64 characters, got 65 in 'yyyyyyyyyyyyyyyy'..."),
    ],
)
def test_invalid_param_names_the_parameter(query: dict[str, str], param: str, message: str) -> None:
    with pytest.raises(InvalidParam) as info:
        SessionParams.from_query(query)
    assert str(info.value) == message
    assert info.value.param == param
    assert (info.value.code, info.value.http_status, info.value.ws_close_code) == ("invalid_param", 400, 1008)


def test_first_bad_parameter_is_reported() -> None:
    with pytest.raises(InvalidParam) as info:
        SessionParams.from_query({"call_id": "x", "sample_rate": "8000", "codec": "opus", "channels": "2"})
    assert info.value.param == "sample_rate"


# --- client messages -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"type": "commit"}', Commit(1.5)),
        ('{"type": "end"}', End(1.5)),
        ('{"type":"end","extra":[1,2]}', End(1.5)),
        ('{"type": "keepalive"}', None),
        ('  {"type": "commit"}  ', Commit(1.5)),
    ],
)
def test_client_messages(text: str, expected: Commit | End | None) -> None:
    assert parse_client_message(text, 1.5) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "text messages must be JSON objects, got ''"),
        ("commit", "text messages must be JSON objects, got 'commit'"),
        ('{"type": "commit"', "text messages must be JSON objects, got '{\"type\": \"commit\"'"),
        ('["commit"]', "text messages must be JSON objects, got list"),
        ('"commit"', "text messages must be JSON objects, got str"),
        ("42", "text messages must be JSON objects, got int"),
        ("null", "text messages must be JSON objects, got NoneType"),
        ('{"type": "start"}', "message type must be one of commit, end, keepalive, got 'start'"),
        ('{"type": "COMMIT"}', "message type must be one of commit, end, keepalive, got 'COMMIT'"),
        ("{}", "message type must be one of commit, end, keepalive, got 'None'"),
        ('{"type": 1}', "message type must be one of commit, end, keepalive, got '1'"),
    ],
)
def test_invalid_client_messages(text: str, message: str) -> None:
    with pytest.raises(InvalidMessage) as info:
        parse_client_message(text, 0.0)
    assert str(info.value) == message
    assert (info.value.code, info.value.http_status, info.value.ws_close_code) == ("invalid_message", 400, 1003)


def test_oversize_text_message_rejected_before_parsing() -> None:
    text = json.dumps({"type": "commit", "pad": "x" * MAX_TEXT_MESSAGE_BYTES})
    with pytest.raises(InvalidMessage, match=f"at most 4096 bytes, got {len(text)}; send audio as binary"):
        parse_client_message(text, 0.0)


def test_text_message_at_the_limit_is_parsed() -> None:
    text = '{"type": "commit", "pad": ""}'
    text = text.replace('""', '"' + "x" * (MAX_TEXT_MESSAGE_BYTES - len(text)) + '"')
    assert len(text) == MAX_TEXT_MESSAGE_BYTES
    assert parse_client_message(text, 2.0) == Commit(2.0)


def test_oversize_limit_counts_utf8_bytes() -> None:
    text = json.dumps({"type": "commit", "pad": "\u00e9" * 3000}, ensure_ascii=False)
    assert len(text) < MAX_TEXT_MESSAGE_BYTES < len(text.encode("utf-8"))
    with pytest.raises(InvalidMessage, match="at most 4096 bytes"):
        parse_client_message(text, 0.0)


def test_long_invalid_text_is_quoted_shortly() -> None:
    with pytest.raises(InvalidMessage) as info:
        parse_client_message("y" * 1000, 0.0)
    assert str(info.value) == f"text messages must be JSON objects, got {'y' * 40!r}"


# --- outbound messages ---------------------------------------------------------------------------


_RESULT = Result(
    text="go forward",
    segments=(Segment(0.1, 0.9, "go forward"),),
    words=(Word("go", 0.1, 0.3, 0.98765), Word("forward", 0.3004, 0.9, 1.0)),
    language="en",
    confidence=0.912345,
)


def test_final_message_has_words_at_absolute_ms() -> None:
    assert transcript_message("final", 3, _RESULT, 12_000, 13_000) == {
        "type": "final",
        "utterance_id": 3,
        "text": "go forward",
        "start_ms": 12_000,
        "end_ms": 13_000,
        "words": [
            {"word": "go", "start_ms": 12_100, "end_ms": 12_300, "probability": 0.9877},
            {"word": "forward", "start_ms": 12_300, "end_ms": 12_900, "probability": 1.0},
        ],
        "confidence": 0.9123,
        "language": "en",
    }


def test_final_message_without_confidence_or_words() -> None:
    message = transcript_message("final", 0, Result(text=""), 0, 500)
    assert message == {"type": "final", "utterance_id": 0, "text": "", "start_ms": 0, "end_ms": 500,
                       "words": [], "confidence": None, "language": None}


def test_partial_message_has_no_words() -> None:
    assert transcript_message("partial", 1, _RESULT, 500, 1500) == {
        "type": "partial", "utterance_id": 1, "text": "go forward", "start_ms": 500, "end_ms": 1500}


def test_ready_and_error_messages() -> None:
    params = SessionParams.from_query(VALID)
    assert ready_message("s1", params, "mock") == {
        "type": "ready", "session_id": "s1", "call_id": "call-1", "sample_rate": 16000, "backend": "mock"}
    assert error_message("overloaded", "too much") == {"type": "error", "code": "overloaded", "message": "too much"}


def test_dumps_is_compact_utf8() -> None:
    assert dumps({"text": "héllo", "n": [1, 2]}) == '{"text":"héllo","n":[1,2]}'
