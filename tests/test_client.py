"""sttd.client against the real server on loopback (mock backend), and its sans-I/O parts."""

from __future__ import annotations

import io
import json
import socket
import wave
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import pytest
import trio

from sttd import client
from sttd.audio import MediaReader, decode_wav, encode_wav, float32_to_pcm16, pcm16_to_float32
from sttd.errors import UnsupportedMedia
from tests.conftest import (
    REFERENCES,
    RunningServer,
    load_pcm,
    reference_texts,
    silence,
    start_server,
)

TIMEOUT_S = 30
NAMES = ["ps_goforward", "ps_cards_001", "ps_librivox_0880", "ps_librivox_0930"]


async def _collect(session: client.StreamingSession) -> list[client.ServerMessage]:
    return [message async for message in session]


def _finals(messages: list[client.ServerMessage]) -> list[client.Final]:
    return [m for m in messages if isinstance(m, client.Final)]


# Sessions -----------------------------------------------------------------------------------


async def test_connect_waits_for_ready_and_describes_the_session(server: RunningServer) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with client.connect(server.http_url, call_id="abc-1") as session:
            ready = session.ready
            assert session.close_code is None
            await session.end()
            assert await _collect(session) == []
        assert session.close_code == 1000
    assert (ready.call_id, ready.sample_rate_hz, ready.backend) == ("abc-1", 16000, "mock")
    assert len(ready.session_id) == 12
    assert ready.raw == {"type": "ready", "session_id": ready.session_id, "call_id": "abc-1",
                         "sample_rate": 16000, "backend": "mock"}  # the message as it came


async def test_stream_file_fast_gives_typed_finals_then_close_1000(
        server: RunningServer, tmp_path: Path) -> None:
    refs = reference_texts()
    audio = np.concatenate([part for name in NAMES for part in (load_pcm(name), silence(1.0))])
    path = tmp_path / "four.wav"
    path.write_bytes(encode_wav(pcm16_to_float32(audio)))
    with trio.fail_after(TIMEOUT_S):
        async with client.connect(server.ws_url("call_id=files&sample_rate=16000")) as session:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial_stream_file, session, path)
                messages = await _collect(session)
    finals = _finals(messages)
    assert [f.text for f in finals] == [refs[name] for name in NAMES]
    assert [f.utterance_id for f in finals] == [0, 1, 2, 3]
    assert session.close_code == 1000
    assert all(f.language == "en" and f.confidence == 1.0 and f.backlog_ms is not None
               for f in finals)
    assert [w.word for w in finals[0].words] == refs["ps_goforward"].split()
    assert all(f.start_ms <= w.start_ms <= w.end_ms <= f.end_ms
               for f in finals for w in f.words)
    assert finals[0].raw is not None and finals[0].raw["text"] == finals[0].text
    # Streamed many times faster than real time, an utterance often ends before its partial's
    # turn comes (a stale partial is not decoded, and none is asked for while a speculative
    # final stands), so partials may not come at all here; those that do must fit the finals.
    # (Typed partials are parsed in test_parse_message_types_the_protocol.)
    partials = [m for m in messages if isinstance(m, client.Partial)]
    for partial in partials:
        assert finals[partial.utterance_id].text.startswith(partial.text)
        assert partial.text == " ".join(p for p in (partial.stable, partial.unstable) if p)
    assert [type(m) for m in messages if not isinstance(m, (client.Partial, client.Final))] == []


async def partial_stream_file(session: client.StreamingSession, path: Path) -> None:
    await client.stream_file(session, path, fast=True)


async def test_send_audio_commit_and_end(server: RunningServer) -> None:
    refs = reference_texts()
    speech = load_pcm("ps_librivox_0930")
    with trio.fail_after(TIMEOUT_S):
        async with client.connect(server.http_url) as session:
            await session.keepalive()
            await session.send_audio(speech)  # an int16 array
            await session.commit()
            first = await _next_final(session)
            # bytes of odd length: the server joins the odd byte to the next frame
            data = np.concatenate([load_pcm("ps_cards_001"), silence(1.0)]).tobytes()
            await session.send_audio(data[:3201])
            await session.send_audio(data[3201:])
            second = await _next_final(session)
            await session.end()
            rest = await _collect(session)
            with pytest.raises(client.SessionClosed) as closed:
                await session.send_audio(b"\x00\x00")
    assert (first.utterance_id, first.text) == (0, refs["ps_librivox_0930"])
    assert (second.utterance_id, second.text) == (1, refs["ps_cards_001"])
    assert [m for m in rest if not isinstance(m, client.Partial)] == []
    assert session.close_code == 1000
    assert closed.value.close_code == 1000


async def _next_final(session: client.StreamingSession) -> client.Final:
    async for message in session:
        assert not isinstance(message, client.Error), message
        if isinstance(message, client.Final):
            return message
    raise AssertionError(f"closed with {session.close_code} before a final")


async def test_bad_parameter_refuses_the_session_with_the_servers_error(
        server: RunningServer) -> None:
    with trio.fail_after(TIMEOUT_S):
        with pytest.raises(client.SessionRefused) as refused:
            async with client.connect(server.http_url, sample_rate_hz=1000):
                raise AssertionError("the session must not open")
    assert refused.value.code == "invalid_param"
    assert refused.value.close_code == 1008
    assert str(refused.value) == "sample_rate must be in 4000..384000, got 1000"
    assert refused.value.error == client.Error(
        "invalid_param", "sample_rate must be in 4000..384000, got 1000", raw={})


async def test_unsupported_language_and_extra_query_reach_the_server(
        server: RunningServer) -> None:
    with trio.fail_after(TIMEOUT_S):
        with pytest.raises(client.SessionRefused) as language:
            async with client.connect(server.http_url, language="fr"):
                pass
        with pytest.raises(client.SessionRefused) as frame:
            async with client.connect(server.http_url, frame_ms=5):
                pass
    assert (language.value.code, language.value.close_code) == ("unsupported_language", 1008)
    assert (frame.value.code, frame.value.close_code) == ("invalid_param", 1008)
    assert "frame_ms" in frame.value.message


async def test_api_key_goes_in_the_authorization_header(nursery: trio.Nursery,
                                                          tmp_path: Path) -> None:
    server = await start_server(nursery, api_keys="k-right")
    wav = tmp_path / "go.wav"
    wav.write_bytes((REFERENCES / "ps_goforward.wav").read_bytes())
    with trio.fail_after(TIMEOUT_S):
        with pytest.raises(client.SessionRefused) as refused:
            async with client.connect(server.http_url, api_key="k-wrong"):
                pass
        async with client.connect(server.http_url, api_key="k-right") as session:
            await session.end()
            await _collect(session)
        with pytest.raises(client.TranscriptionFailed) as unauthorized:
            await client.transcribe_file(server.http_url, wav, response_format="text")
        text = await client.transcribe_file(server.http_url, wav, response_format="text",
                                            api_key="k-right")
    assert (refused.value.code, refused.value.close_code) == ("unauthorized", 1008)
    assert session.close_code == 1000
    assert (unauthorized.value.status, unauthorized.value.code) == (401, "unauthorized")
    assert text == reference_texts()["ps_goforward"] + "\n"


async def test_unreachable_server_raises_connect_failed() -> None:
    with socket.socket() as probe:  # a port nobody listens on once this closes
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with trio.fail_after(TIMEOUT_S):
        with pytest.raises(client.ConnectFailed) as session:
            async with client.connect(f"http://127.0.0.1:{port}"):
                pass
        with pytest.raises(client.ConnectFailed) as upload:
            await client.transcribe_file(f"http://127.0.0.1:{port}",
                                         REFERENCES / "ps_goforward.wav")
    assert session.value.code == upload.value.code == "unreachable"
    assert f"127.0.0.1:{port}" in str(session.value)


async def test_a_server_that_never_answers_the_handshake_times_out(
        nursery: trio.Nursery) -> None:
    """A frozen server, or a proxy holding the connection: trio-websocket's own timeout fired
    but then waited forever on its reader task."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    held: list[trio.SocketStream] = []

    async def hold(stream: trio.SocketStream) -> None:
        held.append(stream)
        await trio.sleep_forever()

    nursery.start_soon(trio.serve_listeners, hold, listeners)
    port = listeners[0].socket.getsockname()[1]
    with trio.fail_after(TIMEOUT_S):
        with pytest.raises(client.ConnectFailed) as caught:
            async with client.connect(f"http://127.0.0.1:{port}", connect_timeout_s=0.5):
                pass
    assert caught.value.code == "timeout" and held


async def test_hotwords_as_one_string_are_split_at_commas(server: RunningServer,
                                                          mock_requests: list[Any]) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with client.connect(server.http_url, hotwords="Dashwood, Norland") as session:
            await client.stream_pcm(session, np.concatenate([load_pcm("ps_goforward"),
                                                             silence(1.0)]), fast=True)
            await _collect(session)
    # (The engine's start-up calibration asks with no hotwords.)
    assert {r.hotwords for r in mock_requests if r.hotwords} == {("Dashwood", "Norland")}


@pytest.mark.parametrize("rate_hz", [8000, 48000])
async def test_stream_file_sends_at_the_sessions_rate(server: RunningServer, tmp_path: Path,
                                                      rate_hz: int) -> None:
    """The file is decoded at 16 kHz: a session opened at another rate got it unconverted
    (no finals at 8 kHz, wrong words at 48 kHz)."""
    path = tmp_path / "one.wav"
    path.write_bytes(encode_wav(pcm16_to_float32(np.concatenate(
        [load_pcm("ps_goforward"), silence(1.0)]))))
    with trio.fail_after(TIMEOUT_S):
        async with client.connect(server.http_url, sample_rate_hz=rate_hz) as session:
            await client.stream_file(session, path, fast=True)
            finals = _finals(await _collect(session))
    assert [f.text for f in finals] == [reference_texts()["ps_goforward"]]


async def test_a_fast_stream_cancelled_mid_send_still_ends_with_every_final(
        server: RunningServer, tmp_path: Path) -> None:
    """Ctrl-C during ``sttd stream --fast``: the send it interrupts is finished first, so the
    ``end`` after it is read as a message (it was read as the rest of a half-sent frame, and
    the finals still to come were lost)."""
    audio = np.concatenate([part for name in NAMES * 4 for part in (load_pcm(name), silence(1.0))])
    path = tmp_path / "long.wav"
    path.write_bytes(encode_wav(pcm16_to_float32(audio)))
    with trio.fail_after(TIMEOUT_S):
        async with client.connect(server.http_url) as session:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial_stream_file, session, path)
                first = await session.__anext__()
                while not isinstance(first, client.Final):
                    first = await session.__anext__()
                nursery.cancel_scope.cancel()  # the sender, wherever it is
            await session.end()
            rest = await _collect(session)
    assert session.close_code == 1000
    assert len(_finals(rest)) >= 1


async def test_leaving_the_block_closes_the_session(server: RunningServer) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with client.connect(server.http_url) as session:
            await session.send_audio(load_pcm("ps_librivox_0880")[:16000])
            assert len(server.state.sessions) == 1
        await server.state.sessions.wait_count(0)
    assert session.close_code == 1000  # ours


# Files over HTTP ------------------------------------------------------------------------------


async def test_transcribe_file_renders_each_format(server: RunningServer, tmp_path: Path) -> None:
    ref = reference_texts()["ps_goforward"]
    wav = tmp_path / 'a "quoted"\nnamé.wav'  # the file name travels in a multipart header
    wav.write_bytes((REFERENCES / "ps_goforward.wav").read_bytes())
    sent: list[tuple[int, int]] = []
    with trio.fail_after(TIMEOUT_S):
        body = {fmt: await client.transcribe_file(server.http_url, wav, response_format=fmt,
                                                  progress=lambda s, t: sent.append((s, t)))
                for fmt in ("json", "text", "verbose_json", "srt", "vtt")}
    assert json.loads(body["json"]) == {"text": ref}
    assert body["text"] == ref + "\n"
    verbose = json.loads(body["verbose_json"])
    assert (verbose["text"], verbose["language"]) == (ref, "english")
    assert [s["text"] for s in verbose["segments"]] == [ref]
    start, end = verbose["segments"][0]["start"], verbose["segments"][0]["end"]
    assert body["srt"] == f"1\n{_clock(start, ',')} --> {_clock(end, ',')}\n{ref}\n"
    assert body["vtt"] == f"WEBVTT\n\n{_clock(start, '.')} --> {_clock(end, '.')}\n{ref}\n"
    size = wav.stat().st_size
    assert sent[-1] == (size, size)
    assert [s for s, _ in sent] == sorted(s for s, _ in sent)
    assert len(sent) == 5  # the fixture fits in one upload chunk: one call per request


def _clock(seconds: float, mark: str) -> str:
    ms = round(seconds * 1000)
    return f"{ms // 3600000:02d}:{ms // 60000 % 60:02d}:{ms // 1000 % 60:02d}{mark}{ms % 1000:03d}"


async def test_transcribe_file_reports_the_servers_error(server: RunningServer,
                                                         tmp_path: Path) -> None:
    notes = tmp_path / "notes.wav"
    notes.write_text("not audio at all\n" * 10)
    with trio.fail_after(TIMEOUT_S):
        with pytest.raises(client.TranscriptionFailed) as failed:
            await client.transcribe_file(server.http_url, notes)
        with pytest.raises(client.TranscriptionFailed) as language:
            await client.transcribe_file(server.http_url, REFERENCES / "ps_goforward.wav",
                                         language="fr")
    assert failed.value.status == 400  # the OpenAI route it uploads to answers as OpenAI does
    assert failed.value.code == "unsupported_media_type"
    assert (language.value.status, language.value.code) == (400, "unsupported_language")


async def test_transcribe_file_streams_a_long_upload_with_progress(
        server: RunningServer, tmp_path: Path) -> None:
    """Several upload chunks: progress is called per chunk, and the text still comes back."""
    refs = reference_texts()
    audio = np.concatenate([part for name in NAMES * 3 for part in (load_pcm(name), silence(1.0))])
    wav = tmp_path / "long.wav"
    wav.write_bytes(encode_wav(pcm16_to_float32(audio)))
    sent: list[int] = []
    with trio.fail_after(TIMEOUT_S):
        text = await client.transcribe_file(server.http_url, wav, response_format="text",
                                            progress=lambda s, t: sent.append(s))
    assert text == " ".join(refs[name] for name in NAMES * 3) + "\n"
    size = wav.stat().st_size
    assert len(sent) == -(-size // (256 * 1024))
    assert sent[-1] == size


# Pacing, on a fake session and trio's MockClock -------------------------------------------------


@attrs.define
class _FakeSession:
    sample_rate_hz: int = 16000
    sends: list[tuple[float, bytes]] = attrs.Factory(list)
    ended_at: float | None = None

    async def send_audio(self, pcm: client.Pcm) -> None:
        self.sends.append((trio.current_time(), client.pcm_bytes(pcm)))
        await trio.sleep(0.001)  # the socket takes a while: the schedule must not drift

    async def end(self) -> None:
        self.ended_at = trio.current_time()


async def test_stream_pcm_paces_frames_on_a_fixed_schedule(autojump_clock: Any) -> None:
    fake = _FakeSession()
    pcm = np.arange(16000 + 100, dtype=np.int16)  # one second and 100 samples
    timings: list[tuple[int, float, float]] = []
    start = trio.current_time()
    await client.stream_pcm(fake, pcm, on_sent=lambda *t: timings.append(t))
    assert [round(t - start, 6) for t, _ in fake.sends] == [round(i * 0.02, 6) for i in range(51)]
    assert [len(data) for _, data in fake.sends] == [640] * 50 + [200]
    assert b"".join(data for _, data in fake.sends) == pcm.astype("<i2").tobytes()
    assert [(i, round(due - start, 6), round(sent - start, 6)) for i, due, sent in timings] == [
        (i, round(i * 0.02, 6), round(i * 0.02, 6)) for i in range(51)]
    assert fake.ended_at == pytest.approx(start + 1.001)


async def test_stream_pcm_fast_does_not_wait_and_end_is_optional(autojump_clock: Any) -> None:
    fake = _FakeSession()
    start = trio.current_time()
    await client.stream_pcm(fake, silence(1.0), fast=True, frame_ms=100, end=False)
    assert [round(t - start, 6) for t, _ in fake.sends] == [round(i * 0.001, 6) for i in range(10)]
    assert [len(data) for _, data in fake.sends] == [3200] * 10
    assert fake.ended_at is None


# Sans-I/O parts -------------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "expected"), [
    ("http://h:8000", "ws://h:8000/v1/stt/ws?call_id=c&sample_rate=16000"),
    ("https://h/", "wss://h/v1/stt/ws?call_id=c&sample_rate=16000"),
    ("https://h/prefix", "wss://h/prefix/v1/stt/ws?call_id=c&sample_rate=16000"),
    ("ws://h:1", "ws://h:1/v1/stt/ws?call_id=c&sample_rate=16000"),
    ("wss://h/v1/stt/ws?token=t&call_id=old",
     "wss://h/v1/stt/ws?token=t&call_id=c&sample_rate=16000"),
])
def test_websocket_url(url: str, expected: str) -> None:
    assert client.websocket_url(url, {"call_id": "c", "sample_rate": 16000}) == expected


@pytest.mark.parametrize(("url", "expected"), [
    ("http://h:8000/", "http://h:8000"),
    ("ws://h:8000/v1/stt/ws?call_id=x", "http://h:8000"),
    ("wss://h/prefix/v1/stt/ws", "https://h/prefix"),
])
def test_http_base_url(url: str, expected: str) -> None:
    assert client.http_base_url(url) == expected


@pytest.mark.parametrize("url", ["127.0.0.1:8000", "ftp://h", "http://"])
def test_urls_that_are_not_http_or_ws_are_refused(url: str) -> None:
    with pytest.raises(ValueError, match="url must be"):
        client.websocket_url(url)


def test_messages_are_the_servers_own_events() -> None:
    import sttd.api
    import sttd.audio

    names = ["Ready", "Partial", "Final", "UtteranceEnd", "Error", "Warning", "Word", "Unknown"]
    assert [getattr(client, name) is getattr(sttd.api, name) for name in names] == [True] * 8
    assert client.read_audio is sttd.audio.read_audio  # the server's readers and resampler


def test_parse_message_types_the_protocol() -> None:
    warning = client.parse_message(
        '{"type":"warning","code":"lagging","message":"m","skipped_ms":300}')
    assert warning == client.Warning("lagging", "m", skipped_ms=300, frames_dropped=None, raw={})
    final = client.parse_message('{"type":"final","utterance_id":2,"text":"hi","start_ms":0,'
                                 '"end_ms":10,"words":[{"word":"hi","start_ms":1,"end_ms":9,'
                                 '"probability":1}],"confidence":null,"language":null}')
    assert final == client.Final(2, "hi", 0, 10, (client.Word("hi", 1, 9, 1.0),), None, None,
                                 None, raw={})
    assert final.raw == {"type": "final", "utterance_id": 2, "text": "hi", "start_ms": 0,
                         "end_ms": 10, "words": [{"word": "hi", "start_ms": 1, "end_ms": 9,
                                                  "probability": 1}],
                         "confidence": None, "language": None}
    partial = client.parse_message('{"type":"partial","utterance_id":0,"text":"go for",'
                                   '"stable":"go","unstable":"for","start_ms":0,"end_ms":5}')
    assert partial == client.Partial(0, "go", "for", 0, 5, raw={})
    assert partial.text == "go for"
    utterance_end = client.parse_message('{"type":"utterance_end","last_word_end_ms":5}')
    assert utterance_end == client.UtteranceEnd(5, raw={})
    assert utterance_end.raw == {"type": "utterance_end", "last_word_end_ms": 5}
    unknown = client.parse_message('{"type":"made_up","n":1}')  # from a newer server
    assert unknown == client.Unknown("made_up", raw={})
    assert unknown.raw == {"type": "made_up", "n": 1}


@pytest.mark.parametrize("text", [
    "not json", "[1]", '{"kind":"final"}', '{"type":"final","text":"x"}',
    '{"type":"partial","utterance_id":"0","text":"","start_ms":0,"end_ms":1}',
    '{"type":"final","utterance_id":0,"text":"","start_ms":0,"end_ms":1,"words":"no"}',
])
def test_parse_message_refuses_what_it_cannot_read(text: str) -> None:
    with pytest.raises(client.ProtocolError) as refused:
        client.parse_message(text)
    # The protocol module's ServerMessageError, translated at the boundary and not chained.
    assert (refused.value.code, refused.value.__cause__) == ("protocol_error", None)
    assert refused.value.__suppress_context__


def test_pcm_bytes_takes_bytes_or_int16_arrays_only() -> None:
    assert client.pcm_bytes(np.array([1, -2], np.int16)) == b"\x01\x00\xfe\xff"
    assert client.pcm_bytes(np.array([[1], [-2]], ">i2")) == b"\x01\x00\xfe\xff"
    assert client.pcm_bytes(memoryview(b"abc")) == b"abc"
    with pytest.raises(TypeError, match="float32_to_pcm16"):
        client.pcm_bytes(np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="mono"):
        client.pcm_bytes(np.zeros((4, 2), np.int16))


def test_read_audio_reads_pcm16_wav_other_wavs_and_ffmpeg_formats(tmp_path: Path) -> None:
    import av

    pcm = load_pcm("ps_goforward")
    plain = REFERENCES / "ps_goforward.wav"
    with wave.open(str(plain)) as wav:  # the fixture is the stdlib's case: 16 kHz mono PCM16
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (16000, 1, 2)
    np.testing.assert_array_equal(client.read_audio(plain), pcm)

    stereo = tmp_path / "stereo.wav"  # float, 44.1 kHz, two channels: decode_wav's case
    stereo.write_bytes(encode_wav(np.linspace(-0.5, 0.5, 44100, dtype=np.float32), 44100,
                                  sample_format="float32", channels=2))
    np.testing.assert_array_equal(client.read_audio(stereo),
                                  float32_to_pcm16(decode_wav(stereo.read_bytes())))

    flac = tmp_path / "go.flac"  # lossless at 16 kHz mono: FFmpeg gives the samples back
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="flac") as container:
        stream = container.add_stream("flac", rate=16000)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = 16000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    flac.write_bytes(buffer.getvalue())
    np.testing.assert_array_equal(client.read_audio(flac), pcm)

    # At another rate the client resamples exactly as the server does with an upload (one
    # converter), so a file streamed live sounds the same as the file uploaded.
    resampled = tmp_path / "go44.flac"
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="flac") as container:
        stream = container.add_stream("flac", rate=44100)
        stream.layout = "mono"
        tone = (8000 * np.sin(np.arange(44100) / 7)).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(tone.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = 44100
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    resampled.write_bytes(buffer.getvalue())
    with resampled.open("rb") as file, MediaReader.from_file(file) as reader:
        served = float32_to_pcm16(np.concatenate(list(reader)))
    np.testing.assert_array_equal(client.read_audio(resampled), served)

    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    with pytest.raises(UnsupportedMedia, match="it looks like text"):
        client.read_audio(text)
