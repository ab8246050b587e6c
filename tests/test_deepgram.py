"""Deepgram's live protocol on /v1/listen: the query, the translation, and the real SDK on the wire.

The wire tests drive the real `deepgram-sdk` client (its synchronous websocket client, in a
worker thread) against the real server on loopback with the mock backend, so transcripts are
exact. Audio is sent as fast as the socket takes it, except where a test is about real time
(keepalives against the idle timeout).
"""

from __future__ import annotations

import hashlib
import json
import urllib.parse
import uuid
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import soxr  # type: ignore[import-untyped]
import trio
from deepgram import DeepgramClient
from deepgram.core.events import EventType
from deepgram.environment import DeepgramClientEnvironment
from deepgram.listen.v1.socket_client import V1SocketClient
from deepgram.listen.v1.types import (
    ListenV1Error,
    ListenV1Metadata,
    ListenV1Results,
    ListenV1SpeechStarted,
    ListenV1UtteranceEnd,
)
from websockets.exceptions import ConnectionClosed
from werkzeug.datastructures import MultiDict

from sttd.api import (
    Audio,
    Cleared,
    Close,
    Commit,
    Committed,
    Configured,
    DeepgramCodec,
    End,
    Error,
    Final,
    KeepAlive,
    Partial,
    Ready,
    SessionOptions,
    SessionRequest,
    SpeechStarted,
    SpeechStopped,
    UtteranceEnd,
    Warning,
    Word,
)
from sttd.audio import AudioFormat, StreamConverter
from sttd.errors import InvalidMessage, InvalidParam
from sttd.settings import Settings
from sttd.vad import frame_rms
from tests.conftest import RunningServer, load_pcm, reference_texts, silence, start_server
from tests.test_formats import encode_media

TIMEOUT_S = 30
CHUNK_MS = 100
SETTINGS = Settings(backend="mock")
NAMES = ("ps_cards_001", "ps_goforward")


def _query(text: str) -> MultiDict[str, str]:
    return MultiDict(urllib.parse.parse_qsl(text, keep_blank_values=True))


def _accept(text: str, codec: DeepgramCodec | None = None) -> SessionRequest:
    return (codec or DeepgramCodec()).accept(_query(text), SETTINGS)


def _params(text: str) -> SessionOptions:
    return _accept(text).options


def _two_utterances(gap_s: float = 1.0) -> npt.NDArray[np.int16]:
    return np.concatenate([part for name in NAMES for part in (load_pcm(name), silence(gap_s))])


def _trim_trailing_quiet(pcm: npt.NDArray[np.int16]) -> npt.NDArray[np.int16]:
    """Cut `pcm` right after its last loud 20 ms frame, so no endpoint silence follows."""
    frames = pcm[: pcm.size - pcm.size % 320].reshape(-1, 320)
    loud = [i for i, frame in enumerate(frames) if frame_rms(frame) > 300]
    return pcm[: (loud[-1] + 1) * 320]


# --- the query ----------------------------------------------------------------------------------


def test_query_defaults_follow_deepgram() -> None:
    request = _accept("model=nova-3&encoding=linear16&sample_rate=16000")
    assert uuid.UUID(request.call_id).version == 4
    assert request == SessionRequest(
        call_id=request.call_id, audio_format=AudioFormat(16000, 1),
        options=SessionOptions(
            partial_ms=500, language="en",  # Deepgram's default
            hotwords=(), vad_silence_ms=None, partials=False, utterance_end_ms=None))
    assert _accept("encoding=linear16&sample_rate=16000").call_id != request.call_id


@pytest.mark.parametrize(("encoding", "sample_format"),
                         [("linear16", "pcm16"), ("MULAW", "mulaw"), ("alaw", "alaw")])
def test_raw_encodings_name_the_sample_format(encoding: str, sample_format: str) -> None:
    request = _accept(f"encoding={encoding}&sample_rate=8000")
    assert request.audio_format == AudioFormat(8000, 1, sample_format)  # type: ignore[arg-type]


def test_query_options_map_to_the_session() -> None:
    request = _accept(
        "encoding=LINEAR16&sample_rate=8000&channels=2&interim_results=true&endpointing=300"
        "&utterance_end_ms=1000&language=en-US&keyterm=Acme&keyterm=tango+charlie"
        "&keywords=zyx:2.5&keywords=plain&smart_format=true&punctuate=true&tag=t1&model=nova-2")
    params = request.options
    assert request.audio_format == AudioFormat(8000, 2)
    assert (params.partials, params.vad_silence_ms, params.utterance_end_ms) == (True, 300, 1000)
    assert params.language == "en-US"
    assert params.hotwords == ("Acme", "tango charlie", "zyx", "plain")


@pytest.mark.parametrize(("value", "endpointing", "silence_ms"), [
    ("false", False, None),  # finals still come at the server's pauses, never speech_final
    ("true", True, None),
    ("10", True, 100),  # raised to the shortest pause the VAD tells from a gap between words
    ("0", True, 100),
    ("800", True, 800),
])
def test_endpointing(value: str, endpointing: bool, silence_ms: int | None) -> None:
    codec = DeepgramCodec()
    assert _accept(f"encoding=linear16&sample_rate=16000&endpointing={value}",
                   codec).options.vad_silence_ms == silence_ms
    codec.encode(Ready("sid", "call", "mock", 16000))
    [sent] = codec.encode(_final("ten of clubs", "speech_end"))
    assert json.loads(sent)["speech_final"] is endpointing


def test_language_multi_detects_and_finals_name_the_language() -> None:
    assert _params("encoding=linear16&sample_rate=16000&language=multi").language is None
    for language, named in (("multi", ["de"]), ("de", None)):
        codec = DeepgramCodec()
        _accept(f"encoding=linear16&sample_rate=16000&language={language}", codec)
        codec.encode(Ready("sid", "call", "mock", 16000))
        [sent] = codec.encode(_final("guten Morgen", "speech_end", language="de"))
        [partial] = codec.encode(Partial(1, "guten", "", 0, 500))
        # The SDK's model reads it (`languages`: only with language=multi, as Deepgram's).
        alternative = ListenV1Results.model_validate(json.loads(sent)).channel.alternatives[0]
        assert alternative.languages == named
        assert "languages" not in json.loads(partial)["channel"]["alternatives"][0]


INVALID_QUERIES = [
    ("sample_rate=16000", "encoding", "got nothing"),
    ("encoding=opus&sample_rate=48000", "encoding", "'opus'"),
    ("encoding=linear16", "sample_rate", "required"),
    ("encoding=mulaw", "sample_rate", "required with encoding=mulaw"),
    ("encoding=linear16&sample_rate=abc", "sample_rate", "'abc'"),
    ("encoding=linear16&sample_rate=1000", "sample_rate", "1000"),
    ("encoding=linear16&sample_rate=16000&channels=0", "channels", "0"),
    ("encoding=linear16&sample_rate=16000&channels=33", "channels", "33"),
    ("encoding=linear16&sample_rate=16000&multichannel=true", "multichannel", "true"),
    ("encoding=linear16&sample_rate=16000&redact=pci", "redact", "got 'pci'"),
    ("encoding=linear16&sample_rate=16000&redact=true", "redact", "got 'true'"),
    ("encoding=linear16&sample_rate=16000&redact=numbers", "redact", "got 'numbers'"),
    ("encoding=linear16&sample_rate=16000&redact=false&redact=pci&redact=ssn", "redact",
     "got 'pci', 'ssn'"),
    ("encoding=linear16&sample_rate=16000&vad_events=yes", "vad_events", "'yes'"),
    ("encoding=linear16&sample_rate=16000&interim_results=yes", "interim_results", "'yes'"),
    ("encoding=linear16&sample_rate=16000&endpointing=soon", "endpointing", "'soon'"),
    ("encoding=linear16&sample_rate=16000&endpointing=-1", "endpointing", "-1"),
    ("encoding=linear16&sample_rate=16000&utterance_end_ms=0", "utterance_end_ms", "0"),
    ("encoding=linear16&sample_rate=16000&language=not_a_language", "language",
     "'not_a_language'"),
    ("encoding=linear16&sample_rate=16000&" + "&".join(["keyterm=w"] * 101), "keyterm", "101"),
]


@pytest.mark.parametrize(("query", "param", "value"), INVALID_QUERIES)
def test_invalid_query_names_the_parameter(query: str, param: str, value: str) -> None:
    with pytest.raises(InvalidParam) as raised:
        _params(query)
    assert str(raised.value).startswith(f"{param} must") or f"{param} is" in str(raised.value)
    assert value in str(raised.value)


def test_redact_false_and_other_unused_features_are_accepted() -> None:
    """Only a redaction sttd would not do is refused; features that change no text of the
    client's (diarize, profanity_filter, ...) stay accepted and ignored."""
    plain = _params("encoding=linear16&sample_rate=16000")
    assert _params("encoding=linear16&sample_rate=16000&redact=false&redact=FALSE&diarize=true"
                   "&profanity_filter=true&filler_words=true&numerals=true") == plain


def test_vad_events_turns_the_sessions_turn_events_on() -> None:
    assert _params("encoding=linear16&sample_rate=16000&vad_events=true").turn_events is True
    assert _params("encoding=linear16&sample_rate=16000&vad_events=false").turn_events is False
    assert _params("encoding=linear16&sample_rate=16000").turn_events is False


# --- the codec --------------------------------------------------------------------------------


def _ready(codec: DeepgramCodec, query: str = "encoding=linear16&sample_rate=16000",
           backend: str = "mock") -> SessionRequest:
    request = _accept(query, codec)
    assert codec.encode(Ready("sid", request.call_id, backend, 16000)) == []
    return request


def _final(text: str, cause: Any, **fields: Any) -> Final:
    return Final(**{"utterance_id": 0, "text": text, "start_ms": 1200, "end_ms": 2500,
                    "words": (), "confidence": 0.9, "language": "en", "backlog_ms": 0,
                    "cause": cause, **fields})


def _refusal(codec: DeepgramCodec, text: str) -> dict[str, Any]:
    """What the client gets for a text message the codec refuses (the session's error event)."""
    with pytest.raises(InvalidMessage) as raised:
        codec.decode(text, 0.0)
    [reply] = codec.encode(Error(raised.value.code, str(raised.value), refused=text))
    message: dict[str, Any] = json.loads(reply)
    return message


def test_client_messages_become_commands() -> None:
    codec = DeepgramCodec()
    _ready(codec)
    assert codec.decode(b"\x01\x02\x03", 0.0) == Audio(b"\x01\x02\x03")  # the session converts
    assert codec.decode(json.dumps({"type": "KeepAlive"}), 1.0) == KeepAlive()
    assert codec.decode(json.dumps({"type": "Finalize", "channel": 0}), 2.0) == Commit(2.0)
    assert codec.decode(json.dumps({"type": "CloseStream"}), 3.0) == End(3.0)


def test_empty_binary_frame_ends_the_stream_and_is_not_audio() -> None:
    """Deepgram's older CloseStream; it adds nothing to the summary's audio."""
    codec = DeepgramCodec()
    _ready(codec)
    audio = bytes(3200)  # 0.1 s
    codec.decode(audio, 0.0)
    assert codec.decode(b"", 4.0) == End(4.0)
    metadata = json.loads(codec.encode(Close(1000))[0])
    assert (metadata["sha256"], metadata["duration"]) == (hashlib.sha256(audio).hexdigest(), 0.1)


def test_unknown_client_messages_get_deepgrams_replies() -> None:
    codec = DeepgramCodec()
    request = _ready(codec)
    replies = [_refusal(codec, json.dumps({"type": "Rewind"}, separators=(",", ":"))),
               _refusal(codec, "not json"),
               _refusal(codec, json.dumps({"type": "Configure", "keyterms": ["x"]}))]
    assert replies == [
        {"type": "Error", "variant": "SchemaError",
         "description": "message type must be one of KeepAlive, Finalize, CloseStream, "
                        "got 'Rewind'",
         "message": '{"type":"Rewind"}'},
        {"type": "Error", "variant": "SchemaError",
         "description": "text messages must be JSON objects of at most 4096 bytes",
         "message": "not json"},
        {"type": "ConfigureFailure", "request_id": request.call_id,
         "code": "CONFIGURE_KEYTERMS_NOT_SUPPORTED",
         "description": "sttd does not reconfigure a stream: open a new one with the keyterm "
                        "and options you want"},
    ]


def test_audio_is_downmixed_and_resampled_chunk_by_chunk() -> None:
    """The stream's format goes to the session's converter, the one every audio path uses."""
    request = _accept("encoding=linear16&sample_rate=8000&channels=2")
    converter = StreamConverter.for_format(request.audio_format)
    rng = np.random.default_rng(7)
    mono = (rng.standard_normal(8000) * 3000).astype(np.int16)  # 1 s at 8 kHz
    stereo = np.repeat(mono, 2).tobytes()
    # Chunks that split samples and frames: the rest is carried, nothing is lost.
    pieces = [stereo[i:i + 333] for i in range(0, len(stereo), 333)]
    got = np.concatenate([*(converter.convert_pcm16(piece) for piece in pieces),
                          converter.convert_pcm16(b"", last=True)])
    want = soxr.resample(mono.astype(np.float32) / 32768, 8000, 16000, quality="HQ")
    assert got.size == want.size == 16000
    assert np.abs(got / 32768 - want).max() < 1e-3


def test_results_carry_deepgrams_fields() -> None:
    codec = DeepgramCodec()
    request = _ready(codec)
    words = (Word(" Hello,", 1300, 1700, 0.8), Word("world!", 1800, 2300, 1.0))
    [sent] = codec.encode(_final("Hello, world!", "speech_end", words=words, confidence=None))
    results = json.loads(sent)
    assert results == {
        "type": "Results", "channel_index": [0, 1], "duration": 1.3, "start": 1.2,
        "is_final": True, "speech_final": True, "from_finalize": False,
        "channel": {"alternatives": [{
            "transcript": "Hello, world!", "confidence": 0.9,
            "words": [
                {"word": "hello", "start": 1.3, "end": 1.7, "confidence": 0.8,
                 "punctuated_word": "Hello,"},
                {"word": "world", "start": 1.8, "end": 2.3, "confidence": 1.0,
                 "punctuated_word": "world!"}]}]},
        "metadata": {"request_id": request.call_id,
                     "model_info": {"name": "mock", "version": "sttd", "arch": "mock"},
                     "model_uuid": results["metadata"]["model_uuid"]},
    }
    ListenV1Results.model_validate(results)  # the SDK's own model accepts it


@pytest.mark.parametrize(("cause", "query", "speech_final", "from_finalize"), [
    ("speech_end", "", True, False),
    ("speech_end", "&endpointing=false", False, False),
    ("commit", "", False, True),
    ("max_length", "", False, False),
    ("end", "", False, False),
])
def test_final_flags_follow_what_ended_the_utterance(
        cause: str, query: str, speech_final: bool, from_finalize: bool) -> None:
    codec = DeepgramCodec()
    _ready(codec, "encoding=linear16&sample_rate=16000" + query)
    [sent] = codec.encode(_final("ten of clubs", cause))
    results = json.loads(sent)
    assert (results["is_final"], results["speech_final"], results["from_finalize"]) == (
        True, speech_final, from_finalize)


def test_partial_is_an_interim_result() -> None:
    codec = DeepgramCodec()
    _ready(codec)
    [sent] = codec.encode(Partial(0, "ten", "of", 0, 500))
    results = json.loads(sent)
    assert (results["is_final"], results["speech_final"], results["from_finalize"]) == (
        False, False, False)
    assert results["channel"]["alternatives"] == [
        {"transcript": "ten of", "confidence": 0.0, "words": []}]
    ListenV1Results.model_validate(results)


def test_other_server_messages() -> None:
    codec = DeepgramCodec()
    _ready(codec)
    [end] = codec.encode(UtteranceEnd(2395))
    assert json.loads(end) == {"type": "UtteranceEnd", "channel": [0, 1], "last_word_end": 2.395}
    [error] = codec.encode(Error("idle_timeout", "no audio"))
    assert json.loads(error) == {"type": "Error", "variant": "idle_timeout",
                                 "description": "no audio"}
    ListenV1Error.model_validate(json.loads(error))
    assert codec.encode(Warning("lagging", "m", skipped_ms=400)) == []


def test_unauthorized_names_deepgrams_token_scheme() -> None:
    codec = DeepgramCodec()
    [error] = codec.encode(Error("unauthorized", "this API needs 'Authorization: Bearer <key>' "
                                                 "(or ?token=<key> on the WebSocket URL) with a "
                                                 "valid key"))
    assert json.loads(error) == {
        "type": "Error", "variant": "unauthorized",
        "description": "this API needs 'Authorization: Token <key>' (or ?token=<key> on the "
                       "WebSocket URL) with a valid key"}


def test_speech_started_is_deepgrams_and_other_turns_say_nothing() -> None:
    codec = DeepgramCodec()
    request = _ready(codec, "encoding=linear16&sample_rate=8000&vad_events=true")
    [started] = codec.encode(SpeechStarted(0, 1250))
    assert json.loads(started) == {"type": "SpeechStarted", "channel": [0, 1],
                                   "timestamp": 1.25}
    ListenV1SpeechStarted.model_validate(json.loads(started))  # the SDK's own model
    for event in (SpeechStopped(0, 2500), Committed(0, 2500), Committed(None, 2600),
                  Cleared(None), Configured(request.options)):
        assert codec.encode(event) == []


@pytest.mark.parametrize(("cause", "client_ended", "sent"), [
    ("speech_end", False, False),  # a cough: the session sends it only because of turn events
    ("max_length", False, False),
    ("skip", False, False),
    ("end", False, False),  # the server stopped the session
    ("commit", False, True),  # Finalize: the client waits for it
    ("end", True, True),  # CloseStream
])
def test_vad_events_send_empty_finals_only_where_the_client_forced_them(
        cause: str, client_ended: bool, sent: bool) -> None:
    """A session reporting turns answers every closed utterance with a final, empty or not;
    Deepgram's clients get the finals they would get without vad_events."""
    codec = DeepgramCodec()
    _ready(codec, "encoding=linear16&sample_rate=16000&vad_events=true")
    if client_ended:
        codec.decode(b"", 1.0)
    messages = codec.encode(_final("", cause, confidence=None))
    assert [json.loads(m)["is_final"] for m in messages] == ([True] if sent else [])
    assert len(codec.encode(_final("ten of clubs", cause))) == 1


def test_metadata_precedes_a_normal_close_only() -> None:
    codec = DeepgramCodec()
    assert codec.encode(Close(1000)) == []  # refused before the session started
    request = _ready(codec, "encoding=linear16&sample_rate=8000&channels=2")
    audio = bytes(range(256)) * 250  # 64000 bytes: 2 s of 8 kHz stereo
    codec.decode(audio, 0.0)
    assert codec.encode(Close(1008)) == []
    [sent] = codec.encode(Close(1000))
    metadata = json.loads(sent)
    assert metadata == {"type": "Metadata", "transaction_key": "deprecated",
                        "request_id": request.call_id,
                        "sha256": hashlib.sha256(audio).hexdigest(),
                        "created": metadata["created"], "duration": 2.0, "channels": 2}
    assert metadata["created"].endswith("Z")
    ListenV1Metadata.model_validate(metadata)


# --- the real SDK on the wire -------------------------------------------------------------------


def _sdk(server: RunningServer, key: str = "unused") -> DeepgramClient:
    base = f"127.0.0.1:{server.port}"
    environment = DeepgramClientEnvironment(
        base=f"http://{base}", production=f"ws://{base}", agent=f"ws://{base}",
        agent_rest=f"http://{base}")
    return DeepgramClient(api_key=key, environment=environment)


@pytest.fixture
def stepped_clock() -> trio.testing.MockClock:
    """The test's trio clock: it runs at real speed, and `_step` moves it on at once."""
    return trio.testing.MockClock(rate=1.0)


def _step(clock: trio.testing.MockClock, seconds: float) -> None:
    """From the SDK's thread: once the server has taken in everything sent so far, move the
    server's clock `seconds` on, as if the client had waited that long."""
    async def settle_then_jump() -> None:
        await trio.testing.wait_all_tasks_blocked()
        clock.jump(seconds)

    trio.from_thread.run(settle_then_jump)


def _send_audio(socket: V1SocketClient, pcm: bytes, *, sample_rate_hz: int = 16000,
                channels: int = 1, paced_s: float = 0.0,
                clock: trio.testing.MockClock | None = None) -> None:
    """Send `pcm` in CHUNK_MS chunks: its first `paced_s` in real time on `clock` (each chunk
    taken in by the server, then the clock stepped a chunk on), the rest at once."""
    chunk = 2 * channels * sample_rate_hz * CHUNK_MS // 1000
    paced_bytes = 2 * channels * round(sample_rate_hz * paced_s)
    assert clock is not None or not paced_bytes, "pacing needs the test's stepped_clock"
    for offset in range(0, len(pcm), chunk):
        socket.send_media(pcm[offset:offset + chunk])
        if clock is not None and offset < paced_bytes:
            _step(clock, CHUNK_MS / 1000)


def _until_close(socket: V1SocketClient) -> tuple[list[Any], int]:
    """Every message until the server closes, and the close code."""
    messages = []
    while True:
        try:
            messages.append(socket.recv())
        except ConnectionClosed as closed:
            assert closed.rcvd is not None
            return messages, closed.rcvd.code


def _until(socket: V1SocketClient, done: Callable[[Any], bool]) -> list[Any]:
    """Messages up to and including the first for which `done` is true."""
    messages = [socket.recv()]
    while not done(messages[-1]):
        messages.append(socket.recv())
    return messages


def _stream(server: RunningServer, pcm: bytes, *, key: str = "unused", sample_rate_hz: int = 16000,
            channels: int = 1, **options: Any) -> tuple[list[Any], int]:
    """Stream `pcm` in CHUNK_MS chunks, send CloseStream; every message and the close code."""
    with _sdk(server, key).listen.v1.connect(
            model="nova-3", encoding="linear16", sample_rate=sample_rate_hz, channels=channels,
            **options) as socket:
        _send_audio(socket, pcm, sample_rate_hz=sample_rate_hz, channels=channels)
        socket.send_close_stream()
        return _until_close(socket)


async def _in_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    with trio.fail_after(TIMEOUT_S):
        return await trio.to_thread.run_sync(partial(fn, *args, **kwargs), abandon_on_cancel=True)


def _finals(messages: list[Any]) -> list[ListenV1Results]:
    return [m for m in messages if isinstance(m, ListenV1Results) and m.is_final]


def _transcript(results: ListenV1Results) -> str:
    return results.channel.alternatives[0].transcript


@pytest.mark.parametrize(("endpointing", "speech_final"), [(None, True), ("false", False)])
async def test_sdk_stream_gives_reference_finals_then_metadata(
        server: RunningServer, endpointing: str | None, speech_final: bool) -> None:
    refs = reference_texts()
    audio = _two_utterances().tobytes()
    options = {} if endpointing is None else {"endpointing": endpointing}
    messages, code = await _in_thread(_stream, server, audio, **options)
    finals = _finals(messages)
    assert [_transcript(f) for f in finals] == [refs[name] for name in NAMES]
    assert [(f.speech_final, f.from_finalize) for f in finals] == [(speech_final, False)] * 2
    assert [type(m) for m in messages] == [ListenV1Results, ListenV1Results, ListenV1Metadata]
    # Words and times are in seconds of the stream, inside the audio sent.
    second = finals[1].channel.alternatives[0].words
    assert [w.word for w in second] == refs[NAMES[1]].split()
    assert finals[0].start + finals[0].duration <= finals[1].start <= second[0].start
    assert second[-1].end <= len(audio) / 32000
    metadata = messages[-1]
    assert metadata.request_id == finals[0].metadata.request_id == finals[1].metadata.request_id
    assert metadata.sha256 == hashlib.sha256(audio).hexdigest()
    assert (metadata.duration, metadata.channels) == (len(audio) / 32000, 1)
    assert code == 1000


async def test_sdk_audio_at_8_khz_stereo_is_converted(server: RunningServer) -> None:
    refs = reference_texts()
    mono = _two_utterances().astype(np.float32) / 32768
    narrow = soxr.resample(mono, 16000, 8000, quality="HQ")
    stereo = np.repeat(np.round(narrow * 32767).astype(np.int16), 2).tobytes()
    messages, code = await _in_thread(_stream, server, stereo, sample_rate_hz=8000, channels=2)
    assert [_transcript(f) for f in _finals(messages)] == [refs[name] for name in NAMES]
    metadata = messages[-1]
    assert isinstance(metadata, ListenV1Metadata)
    assert (metadata.duration, metadata.channels) == (len(stereo) / 32000, 2)
    assert code == 1000


def _paced_then_rest(server: RunningServer, pcm: bytes, clock: trio.testing.MockClock,
                     interim: bool) -> tuple[list[Any], int]:
    """The first 1.5 s of `pcm` (no pause in that speech) in real time on the server's clock,
    an open utterance long enough for partials; where interim results are asked for, the first
    one before the rest is sent (the server then had all the time it needed for it)."""
    paced_s = 1.5
    with _sdk(server).listen.v1.connect(model="nova-3", encoding="linear16", sample_rate=16000,
                                        interim_results=interim) as socket:
        split = 2 * round(16000 * paced_s)
        _send_audio(socket, pcm[:split], paced_s=paced_s, clock=clock)
        first = [socket.recv()] if interim else []
        _send_audio(socket, pcm[split:])
        socket.send_close_stream()
        messages, code = _until_close(socket)
        return first + messages, code


@pytest.mark.parametrize("interim", [True, False])
async def test_sdk_interim_results_only_when_asked(
        stepped_clock: trio.testing.MockClock, server: RunningServer, interim: bool) -> None:
    refs = reference_texts()
    audio = np.concatenate([load_pcm("ps_goforward"), silence(1.0)]).tobytes()
    messages, code = await _in_thread(_paced_then_rest, server, audio, stepped_clock, interim)
    results = [m for m in messages if isinstance(m, ListenV1Results)]
    finals = _finals(messages)
    interims = [m for m in results if not m.is_final]
    assert [_transcript(f) for f in finals] == [refs["ps_goforward"]]
    assert bool(interims) is interim
    for result in interims:
        assert (result.speech_final, result.from_finalize) == (False, False)
        # Each interim comes before its utterance's final and is a prefix of it.
        final = next(f for f in finals if f.start == result.start)
        assert results.index(result) < results.index(final)
        assert _transcript(final).startswith(_transcript(result))
    assert code == 1000


async def test_sdk_utterance_cut_at_the_length_limit_is_not_speech_final(
        nursery: trio.Nursery) -> None:
    server = await start_server(nursery, max_utterance_s=1.5)
    ref = reference_texts()["ps_librivox_0880"]
    audio = np.concatenate([load_pcm("ps_librivox_0880"), silence(1.0)]).tobytes()
    messages, code = await _in_thread(_stream, server, audio)
    finals = _finals(messages)
    # (The mock transcribes each piece as the reference words that fall in it.)
    assert all(_transcript(f) and _transcript(f).lower() in ref for f in finals)
    # Two cuts in the speech, then its end.
    assert [(f.speech_final, f.from_finalize) for f in finals] == [
        (False, False), (False, False), (True, False)]
    assert all(f.duration <= 1.5 for f in finals[:2])
    assert code == 1000


def _finalize_then_go_on(server: RunningServer) -> tuple[list[Any], list[Any], int]:
    speech = _trim_trailing_quiet(load_pcm("ps_librivox_0930")).tobytes()
    with _sdk(server).listen.v1.connect(
            model="nova-3", encoding="linear16", sample_rate=16000) as socket:
        _send_audio(socket, speech)
        socket.send_finalize()
        flushed = _until(socket, lambda m: isinstance(m, ListenV1Results) and m.is_final)
        # The stream goes on: more audio, more finals.
        _send_audio(socket, np.concatenate([load_pcm("ps_cards_001"), silence(1.0)]).tobytes())
        later = _until(socket, lambda m: isinstance(m, ListenV1Results) and m.is_final)
        socket.send_close_stream()
        rest, code = _until_close(socket)
    return flushed, later + rest, code


async def test_sdk_finalize_flushes_and_the_stream_goes_on(server: RunningServer) -> None:
    refs = reference_texts()
    flushed, later, code = await _in_thread(_finalize_then_go_on, server)
    [result] = flushed
    assert _transcript(result) == refs["ps_librivox_0930"]
    assert (result.is_final, result.from_finalize, result.speech_final) == (True, True, False)
    assert [type(m) for m in later] == [ListenV1Results, ListenV1Metadata]
    assert _transcript(later[0]) == refs["ps_cards_001"]
    assert (later[0].from_finalize, later[0].speech_final) == (False, True)
    assert code == 1000


@pytest.mark.parametrize("utterance_end_ms", [1000, None])
async def test_sdk_utterance_end_follows_a_long_enough_gap(
        server: RunningServer, utterance_end_ms: int | None) -> None:
    options = {} if utterance_end_ms is None else {"utterance_end_ms": utterance_end_ms}
    messages, code = await _in_thread(
        _stream, server, _two_utterances(gap_s=2.0).tobytes(), **options)
    finals = _finals(messages)
    if utterance_end_ms is None:
        assert [type(m) for m in messages] == [ListenV1Results, ListenV1Results, ListenV1Metadata]
    else:
        assert [type(m) for m in messages] == [
            ListenV1Results, ListenV1UtteranceEnd, ListenV1Results, ListenV1UtteranceEnd,
            ListenV1Metadata]
        ends = [m for m in messages if isinstance(m, ListenV1UtteranceEnd)]
        assert [e.last_word_end for e in ends] == [
            f.channel.alternatives[0].words[-1].end for f in finals]
        assert [e.channel for e in ends] == [[0, 1]] * 2
    assert code == 1000


async def test_sdk_no_utterance_end_within_a_short_gap(server: RunningServer) -> None:
    messages, code = await _in_thread(
        _stream, server, _two_utterances(gap_s=1.0).tobytes(), utterance_end_ms=3000)
    assert [type(m) for m in messages] == [ListenV1Results, ListenV1Results, ListenV1Metadata]
    assert code == 1000


def _idle_with_keepalives(server: RunningServer, clock: trio.testing.MockClock, idle_s: float,
                          keepalive_s: float) -> tuple[list[Any], int]:
    with _sdk(server).listen.v1.connect(
            model="nova-3", encoding="linear16", sample_rate=16000) as socket:
        for _ in range(round(idle_s / keepalive_s)):  # nothing to say, on the server's clock
            socket.send_keep_alive()
            _step(clock, keepalive_s)
        _send_audio(socket, np.concatenate([load_pcm("ps_cards_001"), silence(1.0)]).tobytes())
        socket.send_close_stream()
        return _until_close(socket)


async def test_sdk_keepalive_holds_an_idle_session_open(
        stepped_clock: trio.testing.MockClock, nursery: trio.Nursery) -> None:
    server = await start_server(nursery, idle_timeout_s=1.0)
    messages, code = await _in_thread(_idle_with_keepalives, server, stepped_clock, 2.5, 0.25)
    assert [_transcript(f) for f in _finals(messages)] == [reference_texts()["ps_cards_001"]]
    assert [type(m) for m in messages] == [ListenV1Results, ListenV1Metadata]
    assert code == 1000


def _silent(server: RunningServer, key: str = "unused") -> tuple[list[Any], int]:
    with _sdk(server, key).listen.v1.connect(
            model="nova-3", encoding="linear16", sample_rate=16000) as socket:
        return _until_close(socket)


async def test_sdk_idle_session_without_keepalive_is_closed(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, idle_timeout_s=1.0)
    messages, code = await _in_thread(_silent, server)
    assert [type(m) for m in messages] == [ListenV1Error, ListenV1Metadata]
    assert messages[0].variant == "idle_timeout"
    assert "STT_IDLE_TIMEOUT_S=1" in messages[0].description
    assert code == 1000


async def test_sdk_token_auth(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, api_keys="right-key")
    audio = np.concatenate([load_pcm("ps_cards_001"), silence(1.0)]).tobytes()
    messages, code = await _in_thread(_stream, server, audio, key="right-key")
    assert [_transcript(f) for f in _finals(messages)] == [reference_texts()["ps_cards_001"]]
    assert code == 1000
    messages, code = await _in_thread(_silent, server, key="wrong-key")
    assert [(type(m), m.variant) for m in messages] == [(ListenV1Error, "unauthorized")]
    assert code == 1008


async def test_sdk_unauthorized_names_the_token_scheme(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, api_keys="right-key")
    [error], code = await _in_thread(_silent, server, key="wrong-key")
    assert isinstance(error, ListenV1Error)
    assert error.description == ("this API needs 'Authorization: Token <key>' (or ?token=<key> "
                                 "on the WebSocket URL) with a valid key")
    assert code == 1008


@pytest.mark.parametrize("redact", [["pci"], ["numbers"], ["true"], ["false", "ssn"]])
async def test_sdk_redaction_is_refused(server: RunningServer, redact: list[str]) -> None:
    """Rather than transcripts that keep what the client meant to redact."""
    error = await _sdk_refusal(
        server, model="nova-3", encoding="linear16", sample_rate=16000,
        request_options={"additional_query_parameters": {"redact": redact}})
    assert error.variant == "invalid_param"
    assert error.description == (
        f"redact must be false: sttd does not redact transcripts (PCI, numbers, SSN or other "
        f"entities), got {redact[-1]!r}")


async def _sdk_refusal(server: RunningServer, **query: Any) -> ListenV1Error:
    """The one message of a session the server refuses at once (then close 1008), through
    the SDK's `connect` with `query`."""
    def connect() -> tuple[list[Any], int]:
        with _sdk(server).listen.v1.connect(**query) as socket:
            return _until_close(socket)

    messages, code = await _in_thread(connect)
    [error] = messages
    assert isinstance(error, ListenV1Error)
    assert code == 1008
    return error


async def test_sdk_empty_binary_frame_closes_the_stream(server: RunningServer) -> None:
    """Deepgram's older CloseStream: the finals, the summary, then 1000."""
    speech = _trim_trailing_quiet(load_pcm("ps_cards_001")).tobytes()

    def stream() -> tuple[list[Any], int]:
        with _sdk(server).listen.v1.connect(
                model="nova-3", encoding="linear16", sample_rate=16000) as socket:
            _send_audio(socket, speech)  # no pause after the speech: the close flushes it
            socket.send_media(b"")
            return _until_close(socket)

    messages, code = await _in_thread(stream)
    assert [type(m) for m in messages] == [ListenV1Results, ListenV1Metadata]
    assert _transcript(messages[0]) == reference_texts()["ps_cards_001"]
    assert messages[0].is_final
    assert (messages[1].duration, messages[1].sha256) == (
        len(speech) / 32000, hashlib.sha256(speech).hexdigest())
    assert code == 1000


def _listen(server: RunningServer, pcm: bytes, **options: Any) -> tuple[list[Any], list[Any]]:
    """Stream `pcm`, then CloseStream, and hear the replies with the SDK's event handlers:
    every message, and the SpeechStarted ones its handler got."""
    messages: list[Any] = []
    started: list[ListenV1SpeechStarted] = []

    def on_message(message: Any) -> None:
        messages.append(message)
        if isinstance(message, ListenV1SpeechStarted):
            started.append(message)

    with _sdk(server).listen.v1.connect(model="nova-3", encoding="linear16", sample_rate=16000,
                                        **options) as socket:
        socket.on(EventType.MESSAGE, on_message)
        _send_audio(socket, pcm)
        socket.send_close_stream()
        socket.start_listening()  # returns once the server closed
    return messages, started


async def test_sdk_vad_events_announce_each_utterance_before_its_results(
        server: RunningServer) -> None:
    refs = reference_texts()
    audio = _two_utterances().tobytes()
    messages, started = await _in_thread(_listen, server, audio, vad_events=True,
                                         interim_results=True)
    assert len(started) == 2 and started == [m for m in messages
                                              if isinstance(m, ListenV1SpeechStarted)]
    assert all(s.channel == [0, 1] for s in started)
    results = [m for m in messages if isinstance(m, ListenV1Results)]
    finals = _finals(messages)
    assert [_transcript(f) for f in finals] == [refs[name] for name in NAMES]
    for announced, final in zip(started, finals, strict=True):
        # Where the utterance starts, and before the first of its results (interim or final).
        assert announced.timestamp == final.start
        first = next(r for r in results if r.start == final.start)
        assert messages.index(announced) < messages.index(first)
    # Nothing else changes: the finals and the summary, as without vad_events.
    assert [type(m) for m in messages if not isinstance(m, ListenV1SpeechStarted)
            and not (isinstance(m, ListenV1Results) and not m.is_final)] == [
        ListenV1Results, ListenV1Results, ListenV1Metadata]


async def test_sdk_vad_events_send_no_final_for_noise(nursery: trio.Nursery) -> None:
    """A burst of noise opens an utterance with no words (the energy VAD hears it as speech):
    SpeechStarted, as Deepgram's VAD would, but no empty final, as without vad_events."""
    server = await start_server(nursery, vad="energy")
    noise = (np.random.default_rng(3).standard_normal(8000) * 3000).astype(np.int16)
    audio = np.concatenate([silence(0.5), noise, silence(1.0), load_pcm("ps_cards_001"),
                            silence(1.0)]).tobytes()
    plain, _ = await _in_thread(_listen, server, audio)
    messages, started = await _in_thread(_listen, server, audio, vad_events=True)
    assert [type(m) for m in plain] == [ListenV1Results, ListenV1Metadata]
    assert [type(m) for m in messages] == [
        ListenV1SpeechStarted, ListenV1SpeechStarted, ListenV1Results, ListenV1Metadata]
    assert started[0].timestamp < 1.0 < started[1].timestamp == messages[2].start
    assert _transcript(messages[2]) == reference_texts()["ps_cards_001"]


async def test_sdk_unsupported_encoding_is_refused(server: RunningServer) -> None:
    error = await _sdk_refusal(server, model="nova-3", encoding="opus", sample_rate=48000)
    assert error.variant == "invalid_param"
    assert error.description == (
        "encoding must be linear16 (raw PCM16 little-endian), mulaw or alaw (raw G.711, as "
        "telephony sends it); sttd decodes no containers or other codecs, got 'opus'")


@pytest.mark.parametrize(("encoding", "codec"), [("mulaw", "pcm_mulaw"), ("alaw", "pcm_alaw")])
async def test_sdk_streams_g711_telephony_audio(server: RunningServer, encoding: str,
                                                codec: str) -> None:
    """8 kHz G.711, as Twilio and most telephony send it, encoded by FFmpeg: the reference
    finals, and the summary's duration counts one byte a sample."""
    audio = np.concatenate([load_pcm("ps_cards_001"), silence(1.0), load_pcm("ps_goforward"),
                            silence(1.0)])
    g711 = encode_media(audio, encoding, codec, rate_hz=8000, layout="mono")
    assert len(g711) == pytest.approx(audio.size / 2, abs=8)

    def stream() -> tuple[list[Any], int]:
        with _sdk(server).listen.v1.connect(model="nova-3", encoding=encoding,
                                            sample_rate=8000) as socket:
            chunk = 8 * CHUNK_MS  # bytes: 8 samples a millisecond, one byte each
            for offset in range(0, len(g711), chunk):
                socket.send_media(g711[offset:offset + chunk])
            socket.send_close_stream()
            return _until_close(socket)

    messages, code = await _in_thread(stream)
    references = reference_texts()
    assert [_transcript(f) for f in _finals(messages)] == [references["ps_cards_001"],
                                                           references["ps_goforward"]]
    [metadata] = [m for m in messages if isinstance(m, ListenV1Metadata)]
    assert metadata.duration == pytest.approx(len(g711) / 8000, abs=0.01)
    assert code == 1000
