"""The Realtime codec alone (sans I/O): what each client event decodes to, and how the
session's events are said, without a server."""

from __future__ import annotations

import base64
import json
import math
from typing import Any

import pytest
from werkzeug.datastructures import MultiDict

from sttd.api import (
    Audio,
    Clear,
    Cleared,
    Commit,
    Committed,
    Configure,
    Configured,
    Error,
    Final,
    Partial,
    RealtimeCodec,
    Ready,
    SpeechStarted,
    SpeechStopped,
    Word,
)
from sttd.audio import AudioFormat
from sttd.errors import InvalidMessage, InvalidParam
from sttd.settings import Settings


def _codec(vad: str = "silero") -> RealtimeCodec:
    codec = RealtimeCodec()
    codec.accept(MultiDict({"intent": "transcription", "model": "gpt-4o-transcribe"}),
                 Settings(vad=vad))
    codec.encode(Ready("s", "c", "whisper", 24000))
    return codec


def _said(codec: RealtimeCodec, event: Any) -> list[dict[str, Any]]:
    return [json.loads(text) for text in codec.encode(event)]


def _update(codec: RealtimeCodec, session: dict[str, Any],
            kind: str = "session.update") -> Configure:
    command = codec.decode(json.dumps({"type": kind, "session": session}), 1.0)
    assert isinstance(command, Configure)
    return command


def test_the_url_opens_at_openais_defaults_and_other_intents_are_refused() -> None:
    codec = RealtimeCodec()
    request = codec.accept(MultiDict({"intent": "transcription"}), Settings())
    assert request.audio_format.sample_rate_hz == 24000
    options = request.options
    assert (options.vad_silence_ms, options.preroll_ms, options.turn_events,
            options.endpointing, options.language) == (500, 300, True, True, None)
    # Words show only in the logprobs, which a session asks for: until then, no alignment.
    assert options.word_timings is False
    with pytest.raises(InvalidParam, match="intent must be transcription"):
        RealtimeCodec().accept(MultiDict({"intent": "conversation"}), Settings())


def test_an_update_sets_language_hotwords_and_turn_detection() -> None:
    codec = _codec()
    command = _update(codec, {"type": "transcription", "audio": {"input": {
        "transcription": {"language": "de", "prompt": "Acme, Zyx GmbH"},
        "turn_detection": {"type": "server_vad", "threshold": 0.6, "prefix_padding_ms": 200,
                           "silence_duration_ms": 800}}}})
    options = command.options
    assert (options.language, options.hotwords) == ("de", ("Acme", "Zyx GmbH"))
    assert (options.vad_threshold, options.preroll_ms, options.vad_silence_ms) == (0.6, 200, 800)
    [updated] = _said(codec, Configured(options))
    turns = updated["session"]["audio"]["input"]["turn_detection"]
    assert updated["type"] == "session.updated"
    assert (turns["threshold"], turns["silence_duration_ms"]) == (0.6, 800)
    off = _update(codec, {"type": "transcription", "audio": {"input": {"turn_detection": None}}})
    assert off.options.endpointing is False and off.options.language == "de"  # the rest kept


def test_a_threshold_needs_the_silero_vad() -> None:
    with pytest.raises(InvalidMessage, match="STT_VAD") as caught:
        _update(_codec("energy"), {"audio": {"input": {"turn_detection": {"threshold": 0.7}}}})
    assert caught.value.param == "session.audio.input.turn_detection.threshold"


@pytest.mark.parametrize(("session", "param"), [
    ({"type": "realtime"}, "session.type"),
    ({"audio": {"output": {}}}, "session.audio.output"),
    ({"audio": {"input": {"transcription": {"temperature": 0}}}},
     "session.audio.input.transcription.temperature"),
    ({"audio": {"input": {"turn_detection": {"idle_timeout_ms": 5000}}}},
     "session.audio.input.turn_detection.idle_timeout_ms"),
    ({"audio": {"input": {"turn_detection": {"silence_duration_ms": 20}}}},
     "session.audio.input.turn_detection.silence_duration_ms"),
    ({"include": ["item.input_audio_transcription.avg_logprob"]}, "session.include"),
])
def test_what_sttd_cannot_honour_is_refused_by_name(session: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidMessage) as caught:
        _update(_codec(), session)
    assert caught.value.param == param


def test_buffer_events_and_audio() -> None:
    codec = _codec()
    audio = codec.decode(json.dumps({"type": "input_audio_buffer.append",
                                     "audio": "AAABAA=="}), 1.0)
    assert getattr(audio, "data", None) == b"\x00\x00\x01\x00"
    assert isinstance(codec.decode('{"type": "input_audio_buffer.commit"}', 2.0), Commit)
    assert isinstance(codec.decode('{"type": "input_audio_buffer.clear"}', 3.0), Clear)
    for bad in ('{"type": "input_audio_buffer.append", "audio": "AAA"}',
                '{"type": "input_audio_buffer.append", "audio": 5}', "[]", "{"):
        with pytest.raises(InvalidMessage):
            codec.decode(bad, 4.0)
    with pytest.raises(InvalidMessage, match="binary"):
        codec.decode(b"\x00\x00", 5.0)


def test_deltas_are_append_only_and_add_up_to_the_final_where_it_agrees() -> None:
    codec = _codec()
    deltas = []
    for stable in ("", "go", "go", "go forward", "go"):
        deltas += [e["delta"] for e in _said(codec, Partial(0, stable, "x", 0, 100))]
    assert deltas == ["go", " forward"]  # stable words only, each once, never taken back
    events = _said(codec, Final(0, "go forward ten meters", 0, 2000))
    assert [e["type"] for e in events] == [
        "conversation.item.input_audio_transcription.delta",
        "conversation.item.input_audio_transcription.completed"]
    assert events[0]["delta"] == " ten meters"
    assert events[1]["transcript"] == "go forward ten meters"
    # A final that does not begin with what the deltas said: no delta, the transcript rules.
    _said(codec, Partial(1, "for war", "", 0, 100))
    [completed] = _said(codec, Final(1, "forward", 0, 1000))
    assert completed["transcript"] == "forward"


def test_logprobs_per_word_when_included() -> None:
    codec = _codec()
    setup = _update(codec, {"include": ["item.input_audio_transcription.logprobs"]})
    assert setup.options.word_timings is True  # the finals' words are aligned from now on
    _said(codec, Configured(setup.options))
    *deltas, completed = _said(codec, Final(2, "hi there", 0, 900, words=(
        Word("hi", 0, 300, 0.5), Word("there", 300, 900, 1.0))))
    assert [d["delta"] for d in deltas] == ["hi there"]  # no partial came: said at once
    assert completed["logprobs"] == [
        {"token": "hi", "logprob": round(math.log(0.5), 4), "bytes": list(b"hi")},
        {"token": "there", "logprob": 0.0, "bytes": list(b"there")}]
    # Asked no more (an update that leaves `include` out keeps it): aligned no more.
    assert _update(codec, {"type": "transcription"}).options.word_timings is True
    assert _update(codec, {"include": []}).options.word_timings is False


def test_turns_items_and_failures() -> None:
    codec = _codec()
    [started] = _said(codec, SpeechStarted(0, 120))
    [stopped] = _said(codec, SpeechStopped(0, 1500))
    [committed] = _said(codec, Committed(0, 1500))
    assert started["item_id"] == stopped["item_id"] == committed["item_id"]
    assert (started["audio_start_ms"], stopped["audio_end_ms"]) == (120, 1500)
    assert committed["previous_item_id"] is None
    [failed] = _said(codec, Error("inference_failed", "the engine failed", utterance_id=0))
    assert failed["type"] == "conversation.item.input_audio_transcription.failed"
    assert failed["item_id"] == committed["item_id"]
    assert failed["error"]["type"] == "server_error"
    [cleared] = _said(codec, Cleared(None))
    assert cleared["type"] == "input_audio_buffer.cleared"
    ids = [e["event_id"] for e in (started, stopped, committed, failed, cleared)]
    assert len(set(ids)) == len(ids)


def test_an_error_answering_a_client_event_names_its_event_id() -> None:
    codec = _codec()
    refused = json.dumps({"type": "response.create", "event_id": "evt_9"})
    [error] = _said(codec, Error("unsupported_event", "no", refused=refused, param="type"))
    assert error["error"] == {"type": "invalid_request_error", "code": "unsupported_event",
                              "message": "no", "param": "type", "event_id": "evt_9"}


def test_the_older_shape_is_answered_in_it() -> None:
    codec = _codec()
    command = _update(codec, {"input_audio_format": "pcm16",
                              "input_audio_transcription": {"language": "en"},
                              "turn_detection": None}, kind="transcription_session.update")
    [updated] = _said(codec, Configured(command.options))
    assert updated["type"] == "transcription_session.updated"
    assert updated["session"]["turn_detection"] is None
    with pytest.raises(InvalidMessage) as caught:
        _update(codec, {"input_audio_format": "opus"}, kind="transcription_session.update")
    assert caught.value.param == "session.input_audio_format"


@pytest.mark.parametrize(("shape", "fields", "sample_format", "echo"), [
    ("transcription_session.update", {"input_audio_format": "g711_ulaw"}, "mulaw", "g711_ulaw"),
    ("transcription_session.update", {"input_audio_format": "g711_alaw"}, "alaw", "g711_alaw"),
    ("session.update", {"type": "transcription",
                        "audio": {"input": {"format": {"type": "audio/pcmu"}}}}, "mulaw",
     {"type": "audio/pcmu"}),
    ("session.update", {"type": "transcription",
                        "audio": {"input": {"format": {"type": "audio/pcma", "rate": 8000}}}},
     "alaw", {"type": "audio/pcma"}),
])
def test_g711_input_formats_apply_to_the_appends_after_the_update(
        shape: str, fields: dict[str, Any], sample_format: str, echo: Any) -> None:
    codec = _codec()
    before = codec.decode(json.dumps({"type": "input_audio_buffer.append",
                                      "audio": base64.b64encode(b"\0\0").decode()}), 0.0)
    assert isinstance(before, Audio) and before.audio_format == AudioFormat(24000, 1)
    command = _update(codec, fields, kind=shape)
    after = codec.decode(json.dumps({"type": "input_audio_buffer.append",
                                     "audio": base64.b64encode(b"\xff\x7f\x00").decode()}), 0.0)
    assert isinstance(after, Audio)
    assert after.audio_format == AudioFormat(8000, 1, sample_format)  # type: ignore[arg-type]
    assert after.data == b"\xff\x7f\x00"  # one byte a sample: an odd count is whole samples
    [updated] = _said(codec, Configured(command.options))
    session = updated["session"]
    said = (session["input_audio_format"] if shape.startswith("transcription")
            else session["audio"]["input"]["format"])
    assert said == echo


@pytest.mark.parametrize(("fmt", "param"), [
    ({"type": "audio/pcmu", "rate": 24000}, "session.audio.input.format.rate"),
    ({"type": "audio/pcm", "rate": 16000}, "session.audio.input.format.rate"),
    ({"type": "audio/opus"}, "session.audio.input.format.type"),
    ({"type": ["audio/pcmu"]}, "session.audio.input.format.type"),
    ({"type": "audio/pcmu", "rate": [8000]}, "session.audio.input.format.rate"),
])
def test_a_ga_format_sttd_cannot_take_is_refused(fmt: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidMessage) as caught:
        _update(_codec(), {"type": "transcription", "audio": {"input": {"format": fmt}}})
    assert caught.value.param == param
