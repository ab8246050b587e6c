"""OpenAI Realtime transcription sessions on ``/v1/realtime``, driven by the real ``openai``
package's realtime client (``client.realtime.connect``, pointed at sttd with ``base_url``).

The SDK's client is synchronous (the ``websockets`` library under it): each test runs it in a
worker thread against the real server on loopback. Audio goes as OpenAI clients send it: PCM16
at 24 kHz (the references, resampled), base64 in ``input_audio_buffer.append`` events.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import soxr
import trio
from trio_websocket import open_websocket_url

from tests.conftest import (
    RunningServer,
    load_pcm,
    reference_texts,
    silence,
    start_server,
    wer,
)
from tests.test_drain import _start
from tests.test_formats import encode_media

TIMEOUT_S = 60
NAMES = ("ps_cards_001", "ps_librivox_0880", "ps_goforward")
COMPLETED = "conversation.item.input_audio_transcription.completed"
DELTA = "conversation.item.input_audio_transcription.delta"


def pcm24(samples: npt.NDArray[np.int16]) -> bytes:
    """16 kHz PCM16 as 24 kHz PCM16 bytes (what a Realtime client sends)."""
    up = soxr.resample(samples.astype(np.float32) / 32768, 16000, 24000)
    return (np.clip(up, -1, 1) * 32767).astype(np.int16).tobytes()


def _chunks(audio: bytes, size: int = 9600) -> list[str]:  # 200 ms at 24 kHz
    return [base64.b64encode(audio[i : i + size]).decode() for i in range(0, len(audio), size)]


def _append(connection: Any, *pieces: npt.NDArray[np.int16]) -> None:
    """Send `pieces` (16 kHz PCM16) joined, as 24 kHz base64 appends of 200 ms, with the SDK."""
    for chunk in _chunks(pcm24(np.concatenate(pieces))):
        connection.input_audio_buffer.append(audio=chunk)


async def _append_ws(ws: Any, *pieces: npt.NDArray[np.int16]) -> None:
    """As `_append`, over a plain WebSocket."""
    for chunk in _chunks(pcm24(np.concatenate(pieces))):
        await ws.send_message(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))


def _manual_commit(connection: Any) -> None:
    """Turn detection off: only commits end utterances."""
    connection.session.update(session={"type": "transcription", "audio": {
        "input": {"turn_detection": None}}})


def _client(server: RunningServer, key: str = "x") -> Any:
    import openai

    return openai.OpenAI(base_url=f"{server.http_url}/v1", api_key=key, max_retries=0)


def _connect(server: RunningServer, key: str = "x") -> Any:
    return _client(server, key).realtime.connect(extra_query={"intent": "transcription"})


def _events_until(connection: Any, done: Callable[[list[Any]], bool]) -> list[Any]:
    """Events as the SDK parses them, until `done` holds for those seen."""
    seen: list[Any] = []
    while not done(seen):
        seen.append(connection.recv())
    return seen


def _completed(count: int) -> Callable[[list[Any]], bool]:
    return lambda seen: sum(event.type == COMPLETED for event in seen) >= count


async def _in_thread(work: Callable[[], Any]) -> Any:
    with trio.fail_after(TIMEOUT_S):
        return await trio.to_thread.run_sync(work, abandon_on_cancel=True)


async def test_the_sdk_streams_speech_and_gets_each_transcript_with_its_turns(
        nursery: trio.Nursery) -> None:
    refs = reference_texts()
    server = await start_server(nursery, vad="energy")

    def run() -> list[Any]:
        with _connect(server) as connection:
            connection.session.update(session={
                "type": "transcription",
                "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000},
                                    "transcription": {"model": "gpt-4o-transcribe",
                                                      "language": "en",
                                                      "prompt": "clubs, meters"},
                                    "turn_detection": {"type": "server_vad",
                                                       "silence_duration_ms": 500}}}})
            for name in NAMES:
                _append(connection, load_pcm(name), silence(1.0))
            return _events_until(connection, _completed(len(NAMES)))

    events = await _in_thread(run)
    types = [event.type for event in events]
    assert types[:2] == ["session.created", "session.updated"]
    updated = events[1].session
    assert updated.audio.input.transcription.language == "en"
    assert updated.audio.input.transcription.prompt == "clubs, meters"
    assert updated.audio.input.turn_detection.silence_duration_ms == 500
    assert "error" not in types
    completed = [event for event in events if event.type == COMPLETED]
    assert [event.transcript for event in completed] == [refs[name] for name in NAMES]
    for event in completed:
        item = event.item_id
        mine = [e.type for e in events if getattr(e, "item_id", None) == item]
        # Each item's turn, in order: speech started, stopped, committed, completed; its deltas
        # come after the start (a partial may be decoded while the speech is still open).
        turns = [t for t in mine if t != DELTA]
        assert turns == ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                         "input_audio_buffer.committed", COMPLETED]
        assert mine[0] == "input_audio_buffer.speech_started" and mine[-1] == COMPLETED
        said = "".join(e.delta for e in events if e.type == DELTA and e.item_id == item)
        assert said == event.transcript  # the deltas add up to the transcript of record
    committed = [e for e in events if e.type == "input_audio_buffer.committed"]
    assert [e.previous_item_id for e in committed] == [None] + [e.item_id for e in committed[:-1]]


async def test_manual_commit_with_turn_detection_off(nursery: trio.Nursery) -> None:
    refs = reference_texts()
    server = await start_server(nursery, vad="energy")

    def run() -> list[Any]:
        with _connect(server) as connection:
            _manual_commit(connection)
            # A clip and a long pause: without turn detection the pause ends nothing (else an
            # item would be committed before the commit, which would then find nothing open
            # and be an error); the commit does.
            _append(connection, load_pcm("ps_cards_001"), silence(1.5))
            connection.input_audio_buffer.commit()
            first = _events_until(connection, _completed(1))
            _append(connection, load_pcm("ps_librivox_0880"), silence(0.3))
            connection.input_audio_buffer.commit()
            return first + _events_until(connection, _completed(1))

    events = await _in_thread(run)
    types = [event.type for event in events]
    assert not any(t.startswith("input_audio_buffer.speech_") for t in types)
    assert types[1] == "session.updated" and events[1].session.audio.input.turn_detection is None
    assert [e.transcript for e in events if e.type == COMPLETED] == [
        refs["ps_cards_001"], refs["ps_librivox_0880"]]
    assert types.count("input_audio_buffer.committed") == 2 and "error" not in types


async def test_clear_discards_the_open_audio(nursery: trio.Nursery) -> None:
    refs = reference_texts()
    server = await start_server(nursery, vad="energy")

    def run() -> list[Any]:
        with _connect(server) as connection:
            _manual_commit(connection)
            half = load_pcm("ps_librivox_0880")
            _append(connection, half[: half.size // 2])
            connection.input_audio_buffer.clear()
            cleared = _events_until(
                connection, lambda seen: bool(seen) and seen[-1].type == "input_audio_buffer.cleared")
            _append(connection, load_pcm("ps_goforward"), silence(0.3))
            connection.input_audio_buffer.commit()
            return cleared + _events_until(connection, _completed(1))

    events = await _in_thread(run)
    assert [e.transcript for e in events if e.type == COMPLETED] == [refs["ps_goforward"]]
    assert [e.type for e in events].count("input_audio_buffer.cleared") == 1


async def test_committing_nothing_is_an_error_and_a_quiet_buffer_an_empty_item(
        nursery: trio.Nursery) -> None:
    server = await start_server(nursery, vad="energy")

    def run() -> list[Any]:
        with _connect(server) as connection:
            _manual_commit(connection)
            connection.input_audio_buffer.commit()
            seen = _events_until(connection, lambda s: any(e.type == "error" for e in s))
            _append(connection, silence(0.5))
            connection.input_audio_buffer.commit()
            return seen + _events_until(connection, _completed(1))

    events = await _in_thread(run)
    [error] = [e for e in events if e.type == "error"]
    assert error.error.code == "input_audio_buffer_commit_empty"
    [completed] = [e for e in events if e.type == COMPLETED]
    assert completed.transcript == ""


async def test_bad_events_get_openai_errors_naming_the_field_and_the_session_goes_on(
        nursery: trio.Nursery) -> None:
    refs = reference_texts()
    server = await start_server(nursery, vad="energy")

    def run() -> list[Any]:
        with _connect(server) as connection:
            sends: list[dict[str, Any]] = [
                {"type": "response.create", "event_id": "evt_1"},
                {"type": "session.update", "event_id": "evt_2", "session": {
                    "type": "transcription", "audio": {"input": {"noise_reduction": {
                        "type": "near_field"}}}}},
                {"type": "session.update", "event_id": "evt_3", "session": {
                    "type": "transcription", "audio": {"input": {"speed": 2}}}},
                {"type": "session.update", "event_id": "evt_4", "session": {
                    "type": "transcription", "audio": {"input": {"turn_detection": {
                        "type": "semantic_vad"}}}}},
                {"type": "session.update", "event_id": "evt_5", "session": {
                    "type": "transcription", "audio": {"input": {"format": {
                        "type": "audio/pcm", "rate": 16000}}}}},
                {"type": "input_audio_buffer.append", "event_id": "evt_6", "audio": "no!"},
                {"type": "session.update", "event_id": "evt_7", "session": {
                    "type": "transcription", "audio": {"input": {"transcription": {
                        "language": "zz-Not-A-Tag!"}}}}},
            ]
            for event in sends:
                connection.send(event)
            errors = _events_until(connection, lambda s: sum(e.type == "error" for e in s)
                                   >= len(sends))
            _append(connection, load_pcm("ps_cards_001"), silence(1.0))
            return errors + _events_until(connection, _completed(1))

    events = await _in_thread(run)
    errors = {e.error.event_id: e.error for e in events if e.type == "error"}
    assert (errors["evt_1"].code, errors["evt_1"].param) == ("unsupported_event", "type")
    assert errors["evt_2"].param == "session.audio.input.noise_reduction"
    assert (errors["evt_3"].code, errors["evt_3"].param) == ("unknown_parameter",
                                                             "session.audio.input.speed")
    assert errors["evt_4"].param == "session.audio.input.turn_detection.type"
    assert errors["evt_5"].param == "session.audio.input.format.rate"
    assert errors["evt_6"].param == "audio"
    assert errors["evt_7"].param == "session.audio.input.transcription.language"
    assert all(error.type == "invalid_request_error" for error in errors.values())
    # None of the refused updates was applied: no session.updated came.
    assert "session.updated" not in [e.type for e in events]
    assert [e.transcript for e in events if e.type == COMPLETED] == [refs["ps_cards_001"]]


async def test_an_update_the_engine_refuses_leaves_no_trace(nursery: trio.Nursery) -> None:
    """An update asking for a language the backend cannot serve is refused whole: the audio
    after it is still read in the applied format, and the next update builds on the applied
    setup and is echoed as itself (before, the refused one stayed queued: every later update
    was refused with its language, and 24 kHz PCM16 was read as the refused update's G.711)."""
    refs = reference_texts()
    server = await start_server(nursery, vad="energy")

    def run() -> list[Any]:
        with _connect(server) as connection:
            connection.send({"type": "session.update", "event_id": "evt_de", "session": {
                "type": "transcription", "audio": {"input": {
                    "format": {"type": "audio/pcmu"}, "transcription": {"language": "de"}}}}})
            refused = _events_until(connection, lambda s: any(e.type == "error" for e in s))
            connection.send({"type": "session.update", "event_id": "evt_vad", "session": {
                "type": "transcription", "include": ["item.input_audio_transcription.logprobs"],
                "audio": {"input": {"turn_detection": None}}}})
            updated = _events_until(connection, lambda s: bool(s) and s[-1].type == "session.updated")
            _append(connection, load_pcm("ps_cards_001"), silence(0.5))
            connection.input_audio_buffer.commit()
            return refused + updated + _events_until(connection, _completed(1))

    events = await _in_thread(run)
    [error] = [e for e in events if e.type == "error"]
    assert (error.error.event_id, error.error.code) == ("evt_de", "unsupported_language")
    assert error.error.param == "session.audio.input.transcription.language"
    [updated] = [e for e in events if e.type == "session.updated"]
    assert updated.session.audio.input.format.type == "audio/pcm"
    assert updated.session.audio.input.transcription.language != "de"
    assert updated.session.audio.input.turn_detection is None
    assert not any(e.type.startswith("input_audio_buffer.speech_") for e in events)
    [completed] = [e for e in events if e.type == COMPLETED]
    assert completed.transcript == refs["ps_cards_001"]
    assert completed.logprobs


async def test_an_append_over_the_message_limit_is_refused_alone(nursery: trio.Nursery) -> None:
    """An event protocol: the oversized event gets an error and the session goes on (a binary
    stream's oversized frame ends its session instead)."""
    refs = reference_texts()
    server = await start_server(nursery, vad="energy", max_message_bytes=64 * 1024)

    def run() -> list[Any]:
        with _connect(server) as connection:
            whole = pcm24(np.concatenate([load_pcm("ps_goforward"), silence(1.0)]))
            connection.input_audio_buffer.append(audio=base64.b64encode(whole).decode())
            refused = _events_until(connection, lambda s: any(e.type == "error" for e in s))
            _append(connection, load_pcm("ps_cards_001"), silence(1.0))
            return refused + _events_until(connection, _completed(1))

    events = await _in_thread(run)
    [error] = [e for e in events if e.type == "error"]
    assert (error.error.code, error.error.type) == ("payload_too_large", "invalid_request_error")
    assert "STT_MAX_MESSAGE_BYTES" in error.error.message
    assert [e.transcript for e in events if e.type == COMPLETED] == [refs["ps_cards_001"]]


async def test_the_sdk_switches_to_g711_mid_session(nursery: trio.Nursery) -> None:
    """A telephony bridge's G.711 at 8 kHz (encoded by FFmpeg) after PCM16 at 24 kHz: every
    utterance transcribed, the update echoed in OpenAI's shape."""
    refs = reference_texts()
    server = await start_server(nursery, vad="energy")
    first, *rest = NAMES

    def run() -> list[Any]:
        with _connect(server) as connection:
            _append(connection, load_pcm(first), silence(1.0))
            connection.session.update(session={"type": "transcription", "audio": {
                "input": {"format": {"type": "audio/pcmu"}}}})
            pcmu = encode_media(np.concatenate([part for name in rest
                                                for part in (load_pcm(name), silence(1.0))]),
                                "mulaw", "pcm_mulaw", rate_hz=8000, layout="mono")
            for chunk in _chunks(pcmu, size=1600):  # 200 ms at 8 kHz, a byte a sample
                connection.input_audio_buffer.append(audio=chunk)
            return _events_until(connection, _completed(len(NAMES)))

    events = await _in_thread(run)
    assert "error" not in [event.type for event in events]
    [updated] = [event for event in events if event.type == "session.updated"]
    assert updated.session.audio.input.format.type == "audio/pcmu"
    assert [event.transcript for event in events if event.type == COMPLETED] == [
        refs[name] for name in NAMES]


async def test_the_older_transcription_session_update_shape(nursery: trio.Nursery) -> None:
    refs = reference_texts()
    server = await start_server(nursery, vad="energy")
    url = f"ws://127.0.0.1:{server.port}/v1/realtime?intent=transcription"
    with trio.fail_after(TIMEOUT_S):
        async with open_websocket_url(url) as ws:
            assert json.loads(await ws.get_message())["type"] == "session.created"
            await ws.send_message(json.dumps({"type": "transcription_session.update", "session": {
                "input_audio_format": "pcm16",
                "input_audio_transcription": {"model": "whisper-1", "language": "en"},
                "turn_detection": {"type": "server_vad", "silence_duration_ms": 600},
                "input_audio_noise_reduction": None}}))
            updated = json.loads(await ws.get_message())
            await _append_ws(ws, load_pcm("ps_goforward"), silence(1.0))
            while (event := json.loads(await ws.get_message()))["type"] != COMPLETED:
                pass
    assert updated["type"] == "transcription_session.updated"
    assert updated["session"]["turn_detection"]["silence_duration_ms"] == 600
    assert updated["session"]["input_audio_transcription"]["model"] == "whisper-1"
    assert event["transcript"] == refs["ps_goforward"]


async def test_a_beta_client_gets_the_betas_created_event(nursery: trio.Nursery) -> None:
    """OpenAI's beta (``OpenAI-Beta: realtime=v1``) opens a transcription session with
    ``transcription_session.created`` in its own shape; clients written for it wait for that."""
    server = await start_server(nursery, vad="energy")
    url = f"ws://127.0.0.1:{server.port}/v1/realtime?intent=transcription"
    with trio.fail_after(TIMEOUT_S):
        async with open_websocket_url(url, extra_headers=[(b"OpenAI-Beta", b"realtime=v1")]) as ws:
            created = json.loads(await ws.get_message())
        async with open_websocket_url(url) as ws:
            current = json.loads(await ws.get_message())
    assert created["type"] == "transcription_session.created"
    assert created["session"]["input_audio_format"] == "pcm16"
    assert created["session"]["turn_detection"]["type"] == "server_vad"
    assert current["type"] == "session.created"
    assert current["session"]["audio"]["input"]["format"]["type"] == "audio/pcm"


async def test_auth_by_header_and_by_the_browsers_subprotocol(nursery: trio.Nursery,
                                                               tmp_path: Any) -> None:
    keys = tmp_path / "keys"
    keys.write_text("sk-right\n")
    server = await start_server(nursery, vad="energy", api_keys_file=str(keys))

    def wrong() -> Any:
        with _connect(server, "sk-wrong") as connection:
            return _events_until(connection, lambda s: bool(s))

    def right() -> Any:
        with _connect(server, "sk-right") as connection:
            return _events_until(connection, lambda s: bool(s))

    [refusal] = await _in_thread(wrong)
    assert (refusal.type, refusal.error.code) == ("error", "unauthorized")
    [created] = await _in_thread(right)
    assert created.type == "session.created"
    url = f"ws://127.0.0.1:{server.port}/v1/realtime?intent=transcription"
    with trio.fail_after(TIMEOUT_S):
        async with open_websocket_url(
                url, subprotocols=["realtime", "openai-insecure-api-key.sk-right"]) as ws:
            assert ws.subprotocol == "realtime"
            assert json.loads(await ws.get_message())["type"] == "session.created"


async def test_a_server_past_its_session_cap_refuses_with_1013(nursery: trio.Nursery) -> None:
    from websockets.exceptions import ConnectionClosedError

    server = await start_server(nursery, vad="energy", max_sessions=1)
    url = f"ws://127.0.0.1:{server.port}/v1/realtime?intent=transcription"
    with trio.fail_after(TIMEOUT_S):
        async with open_websocket_url(url) as first:
            await first.get_message()

            def second() -> tuple[list[Any], int | None]:
                with _connect(server) as connection:
                    seen: list[Any] = []
                    try:
                        while True:
                            seen.append(connection.recv())
                    except ConnectionClosedError as closed:
                        return seen, closed.rcvd.code if closed.rcvd else None

            events, code = await _in_thread(second)
    assert [(e.type, e.error.code) for e in events] == [("error", "overloaded")]
    assert events[0].error.type == "server_error"
    assert code == 1013


async def test_a_drain_completes_the_open_item_then_closes_1001(nursery: trio.Nursery) -> None:
    refs = reference_texts()
    running = await _start(nursery, drain_s=TIMEOUT_S, vad="energy")
    url = f"ws://127.0.0.1:{running.server.port}/v1/realtime?intent=transcription"
    events: list[dict[str, Any]] = []
    with trio.fail_after(TIMEOUT_S):
        async with open_websocket_url(url) as ws:
            await ws.get_message()
            # Speech with no pause after it: the drain, not the VAD, ends the utterance.
            await _append_ws(ws, load_pcm("ps_goforward"))
            # An update goes in band after the audio: once it is answered, all of it was heard.
            await ws.send_message(json.dumps({"type": "session.update", "session": {
                "type": "transcription"}}))
            while json.loads(await ws.get_message())["type"] != "session.updated":
                pass
            running.trigger.set()
            from trio_websocket import ConnectionClosed
            try:
                while True:
                    events.append(json.loads(await ws.get_message()))
            except ConnectionClosed as closed:
                code = closed.reason.code
    assert code == 1001
    assert [e["transcript"] for e in events if e["type"] == COMPLETED] == [refs["ps_goforward"]]


@pytest.mark.parametrize("names", [("ps_librivox_0880", "ps_goforward", "ps_librivox_0930")])
async def test_on_the_whisper_backend_the_transcripts_are_within_the_streaming_bound(
        nursery: trio.Nursery, names: tuple[str, ...]) -> None:
    refs = reference_texts()
    server = await start_server(nursery, backend="whisper", vad="energy", load_timeout_s=120)

    def run() -> list[Any]:
        with _connect(server) as connection:
            for name in names:
                _append(connection, load_pcm(name), silence(1.0))
            return _events_until(connection, _completed(len(names)))

    events = await _in_thread(run)
    heard = " ".join(e.transcript for e in events if e.type == COMPLETED)
    assert wer(" ".join(refs[name] for name in names), heard) <= 0.2
