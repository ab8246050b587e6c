"""Tests for sttd's own protocol (`sttd.api.NativeCodec`): the query, client text frames, and
the JSON of every server message."""

from __future__ import annotations

import json
from typing import Literal

import pytest
from werkzeug.datastructures import MultiDict

from sttd.api import (
    MAX_TEXT_MESSAGE_BYTES,
    Audio,
    ClientCommand,
    Close,
    Commit,
    End,
    Error,
    Final,
    KeepAlive,
    NativeCodec,
    Partial,
    Ready,
    SessionOptions,
    SessionRequest,
    UtteranceEnd,
    Warning,
    Word,
    dumps,
    encode_command,
    parse_server_message,
)
from sttd.audio import AudioFormat
from sttd.errors import InvalidMessage, InvalidParam
from sttd.settings import Settings

VALID = {"call_id": "call-1", "sample_rate": "16000"}
SETTINGS = Settings()


def with_(**changes: str) -> dict[str, str]:
    return {**VALID, **changes}


def accept(query: dict[str, str], settings: Settings = SETTINGS) -> SessionRequest:
    return NativeCodec().accept(MultiDict(query), settings)


def options(query: dict[str, str]) -> SessionOptions:
    return accept(query).options


def parse_client_message(text: str, received_at: float) -> ClientCommand:
    return NativeCodec().decode(text, received_at)


# --- the query: valid ---------------------------------------------------------------------------


def test_minimal_query_gives_defaults() -> None:
    assert accept(VALID) == SessionRequest(
        call_id="call-1", audio_format=AudioFormat(16000, 1, "pcm16"),
        options=SessionOptions(partial_ms=500, partials=True, language=None, hotwords=()))


def test_every_parameter_parses() -> None:
    query = with_(call_id="  abc  ", codec="pcm_s16le", channels="1", frame_ms="200", partial_ms="100",
                  language="en-US", hotwords="a, b,,c")
    assert accept(query) == SessionRequest(
        call_id="abc", audio_format=AudioFormat(),
        options=SessionOptions(partial_ms=100, language="en-US", hotwords=("a", "b", "c")))


@pytest.mark.parametrize(("rate", "codec", "expected"), [
    ("16000", None, AudioFormat()), ("8000", "mulaw", AudioFormat(8000, 1, "mulaw")),
    ("8000", "alaw", AudioFormat(8000, 1, "alaw")), ("48000", "pcm_s16le", AudioFormat(48000)),
    ("4000", None, AudioFormat(4000)), ("384000", None, AudioFormat(384000))])
def test_sample_rate_and_codec(rate: str, codec: str | None, expected: AudioFormat) -> None:
    query = with_(sample_rate=rate) if codec is None else with_(sample_rate=rate, codec=codec)
    assert accept(query).audio_format == expected


@pytest.mark.parametrize(("raw", "expected"), [(None, True), ("true", True), ("false", False),
                                               (" FALSE ", False)])
def test_words(raw: str | None, expected: bool) -> None:
    assert options(VALID if raw is None else with_(words=raw)).word_timings is expected


@pytest.mark.parametrize(("raw", "expected"), [("auto", None), ("", None), (" auto ", None), ("en", "en"),
                                               ("en-US", "en-US"), ("yue", "yue"), ("zh-Hant-TW", "zh-Hant-TW")])
def test_language(raw: str, expected: str | None) -> None:
    assert options(with_(language=raw)).language == expected


@pytest.mark.parametrize(("raw", "expected"), [("", ()), (" , ,", ()), ("a, b,,c", ("a", "b", "c")),
                                               ("Kubernetes , gRPC", ("Kubernetes", "gRPC")),
                                               (",".join(["w"] * 100), ("w",) * 100), ("x" * 64, ("x" * 64,))])
def test_hotwords(raw: str, expected: tuple[str, ...]) -> None:
    assert options(with_(hotwords=raw)).hotwords == expected


@pytest.mark.parametrize(("default_partial_ms", "query_partial_ms", "expected"),
                         [(1000, None, 1000), (1000, "300", 300), (50, None, 100), (100, None, 100)])
def test_default_partial_ms(default_partial_ms: int, query_partial_ms: str | None, expected: int) -> None:
    query = VALID if query_partial_ms is None else with_(partial_ms=query_partial_ms)
    settings = Settings(streaming_chunk_size_sec=default_partial_ms / 1000)
    assert accept(query, settings).options.partial_ms == expected


@pytest.mark.parametrize("frame_ms", [10, 20, 200])
def test_frame_ms_bounds_accepted(frame_ms: int) -> None:
    # The client's intended frame size: checked, not kept (frames of any size are taken).
    assert accept(with_(frame_ms=str(frame_ms))) == accept(VALID)


def test_call_id_of_256_characters_accepted() -> None:
    assert accept(with_(call_id="c" * 256)).call_id == "c" * 256


# --- the query: invalid -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "param", "message"),
    [
        ({"sample_rate": "16000"}, "call_id", "call_id is required, got nothing"),
        (with_(call_id=""), "call_id", "call_id is required, got nothing"),
        (with_(call_id="   "), "call_id", "call_id is required, got nothing"),
        (with_(call_id="c" * 257), "call_id", "call_id must be at most 256 characters, got 257"),
        ({"call_id": "x"}, "sample_rate",
         "sample_rate is required (the audio's rate in Hz, 16000 for the server's own)"),
        (with_(sample_rate="3999"), "sample_rate", "sample_rate must be in 4000..384000, got 3999"),
        (with_(sample_rate="384001"), "sample_rate",
         "sample_rate must be in 4000..384000, got 384001"),
        (with_(sample_rate="abc"), "sample_rate", "sample_rate must be an integer, got 'abc'"),
        # ASCII digits only, though Python's int() reads these too.
        (with_(sample_rate="16_000"), "sample_rate", "sample_rate must be an integer, got '16_000'"),
        (with_(sample_rate="\uff11\uff16\uff10\uff10\uff10"), "sample_rate",
         "sample_rate must be an integer, got '\uff11\uff16\uff10\uff10\uff10'"),
        (with_(sample_rate=""), "sample_rate", "sample_rate must be an integer, got ''"),
        (with_(codec="opus"), "codec", "codec must be one of pcm_s16le, mulaw, alaw, got 'opus'"),
        (with_(codec="MULAW"), "codec", "codec must be one of pcm_s16le, mulaw, alaw, got 'MULAW'"),
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
        (with_(words="no"), "words", "words must be true or false, got 'no'"),
        (with_(hotwords=",".join(["w"] * 101)), "hotwords", "hotwords must hold at most 100 entries, got 101"),
        (with_(hotwords="ok," + "y" * 65), "hotwords",
         "each of hotwords must be at most 64 characters, got 65 in 'yyyyyyyyyyyyyyyy'..."),
    ],
)
def test_invalid_param_names_the_parameter(query: dict[str, str], param: str, message: str) -> None:
    with pytest.raises(InvalidParam) as info:
        accept(query)
    assert str(info.value) == message
    assert info.value.param == param
    assert (info.value.code, info.value.http_status, info.value.ws_close_code) == ("invalid_param", 400, 1008)


def test_first_bad_parameter_is_reported() -> None:
    with pytest.raises(InvalidParam) as info:
        accept({"call_id": "x", "sample_rate": "1000", "codec": "opus", "channels": "2"})
    assert info.value.param == "sample_rate"


# --- client messages -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"type": "commit"}', Commit(1.5)),
        ('{"type": "end"}', End(1.5)),
        ('{"type":"end","extra":[1,2]}', End(1.5)),
        ('{"type": "keepalive"}', KeepAlive()),
        ('  {"type": "commit"}  ', Commit(1.5)),
    ],
)
def test_client_messages(text: str, expected: ClientCommand) -> None:
    assert parse_client_message(text, 1.5) == expected


@pytest.mark.parametrize(("kind", "command"), [
    ("commit", Commit(2.5)), ("end", End(2.5)), ("keepalive", KeepAlive())])
def test_what_a_client_writes_the_server_reads(kind: Literal["commit", "end", "keepalive"],
                                                command: ClientCommand) -> None:
    assert NativeCodec().decode(encode_command(kind), 2.5) == command


def test_binary_frames_are_audio_as_sent() -> None:
    assert NativeCodec().decode(b"\x01\x02\x03", 0.0) == Audio(b"\x01\x02\x03")


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
        ("{}", "message type must be one of commit, end, keepalive, got no type"),
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


_FINAL = Final(
    utterance_id=3, text="go forward", start_ms=12_000, end_ms=13_000,
    words=(Word("go", 12_100, 12_300, 0.98765), Word("forward", 12_300, 12_900, 1.0)),
    confidence=0.912345, language="en", backlog_ms=40, cause="commit", ended_at=5.0)


def encode(event: Ready | Partial | Final | UtteranceEnd | Error | Warning) -> dict[str, object]:
    [text] = NativeCodec().encode(event)
    message: dict[str, object] = json.loads(text)
    return message


def test_final_message_rounds_for_the_wire_and_keeps_server_fields_off_it() -> None:
    assert encode(_FINAL) == {
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
        "language_probability": None,
        "backlog_ms": 40,
    }


def test_final_message_without_confidence_or_words() -> None:
    message = encode(Final(0, "", 0, 500, backlog_ms=0))
    assert message == {"type": "final", "utterance_id": 0, "text": "", "start_ms": 0, "end_ms": 500,
                       "words": [], "confidence": None, "language": None, "language_probability": None,
                       "backlog_ms": 0}


def test_partial_message_has_no_words() -> None:
    assert encode(Partial(1, "go", "forward", 500, 1500)) == {
        "type": "partial", "utterance_id": 1, "text": "go forward", "stable": "go",
        "unstable": "forward", "start_ms": 500, "end_ms": 1500}


def test_ready_error_warning_and_utterance_end_messages() -> None:
    assert encode(Ready("s1", "call-1", "mock", 16000)) == {
        "type": "ready", "session_id": "s1", "call_id": "call-1", "sample_rate": 16000,
        "backend": "mock"}
    assert encode(Error("overloaded", "too much")) == {
        "type": "error", "code": "overloaded", "message": "too much"}
    assert encode(Warning("lagging", "behind", skipped_ms=700)) == {
        "type": "warning", "code": "lagging", "message": "behind", "skipped_ms": 700}
    assert encode(Warning("lagging", "dropped", frames_dropped=51)) == {
        "type": "warning", "code": "lagging", "message": "dropped", "frames_dropped": 51}
    assert encode(UtteranceEnd(2395)) == {"type": "utterance_end", "last_word_end_ms": 2395}
    assert NativeCodec().encode(Close(1000, "end of stream")) == []


@pytest.mark.parametrize("event", [
    Ready("s1", "call-1", "mock", 16000), Partial(1, "go", "forward", 500, 1500), _FINAL,
    UtteranceEnd(2395), Error("overloaded", "too much"), Warning("lagging", "x", skipped_ms=7)])
def test_what_the_server_writes_the_client_reads_back(
        event: Ready | Partial | Final | UtteranceEnd | Error | Warning) -> None:
    """One module writes and reads the protocol: a round trip keeps every field on the wire."""
    [text] = NativeCodec().encode(event)
    back = parse_server_message(text)
    assert back.raw == json.loads(text)
    if isinstance(event, Final):  # the wire rounds probabilities and carries no cause
        assert back == Final(3, "go forward", 12_000, 13_000, words=(
            Word("go", 12_100, 12_300, 0.9877), Word("forward", 12_300, 12_900, 1.0)),
            confidence=0.9123, language="en", backlog_ms=40)
    else:
        assert back == event


def test_dumps_is_compact_utf8() -> None:
    assert dumps({"text": "héllo", "n": [1, 2]}) == '{"text":"héllo","n":[1,2]}'
