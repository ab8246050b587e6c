"""OpenAI's transcription API: the form and its answers, and the real `openai` SDK against sttd.

The SDK is synchronous here (it runs in a worker thread); the server is the real one on loopback
with the mock backend, so transcripts are exact.
"""

from __future__ import annotations

import io
from functools import partial
from typing import Any

import numpy as np
import openai
import pytest
import trio

from sttd.audio import encode_wav, pcm16_to_float32
from sttd.errors import InvalidParam
from sttd.api import FileSegment, FileTranscript, Word
from sttd.api import TranscriptionForm, render
from tests.conftest import RunningServer, load_pcm, reference_texts, silence, start_server

# Two fixtures with a pause between them: two segments.
NAMES = ("ps_cards_001", "ps_goforward")


def _wav() -> bytes:
    audio = np.concatenate([silence(0.5), load_pcm(NAMES[0]), silence(1.5), load_pcm(NAMES[1]),
                            silence(0.5)])
    return encode_wav(pcm16_to_float32(audio))


def _client(server: RunningServer, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.http_url}/v1", api_key=key, max_retries=0,
                         timeout=60)


async def _create(client: openai.OpenAI, **kwargs: Any) -> Any:
    kwargs.setdefault("file", ("call.wav", _wav(), "audio/wav"))
    kwargs.setdefault("model", "whisper-1")
    return await trio.to_thread.run_sync(partial(client.audio.transcriptions.create, **kwargs))


# --- the form ---------------------------------------------------------------------------------


def test_form_defaults_and_fields() -> None:
    form = TranscriptionForm.parse({"model": "whisper-1"})
    assert form == TranscriptionForm("whisper-1", None, (), "json", ("segment",))
    form = TranscriptionForm.parse({
        "model": "m", "language": "en", "prompt": "Acme, Zyx", "response_format": "verbose_json",
        "timestamp_granularities[]": "word,segment,word", "temperature": "0.2"})
    assert (form.language, form.prompt) == ("en", ("Acme", "Zyx"))
    assert form.timestamp_granularities == ("word", "segment")


def test_a_sentence_prompt_becomes_hotword_sized_phrases_not_an_error() -> None:
    sentence = ("The speakers discuss Kubernetes, the sttd server and its Prometheus metrics "
                "during an incident review with Acme Corporation's site reliability team")
    phrases = TranscriptionForm.parse({"model": "m", "prompt": sentence}).prompt
    assert " ".join(phrases).split() == sentence.replace(",", "").split()
    assert all(len(phrase) <= 64 for phrase in phrases) and len(phrases) == 3
    many = TranscriptionForm.parse({"model": "m", "prompt": ",".join(["w"] * 300)}).prompt
    assert len(many) == 100


@pytest.mark.parametrize(("fields", "param"), [
    ({}, "model"),
    ({"model": "  "}, "model"),
    ({"model": "m", "response_format": "xml"}, "response_format"),
    ({"model": "m", "timestamp_granularities[]": "word"}, "timestamp_granularities[]"),
    ({"model": "m", "response_format": "verbose_json", "timestamp_granularities[]": "char"},
     "timestamp_granularities[]"),
    ({"model": "m", "stream": "true", "response_format": "vtt"}, "stream"),
    ({"model": "m", "prompt": "x" * 1001}, "prompt"),
    ({"model": "m", "language": "english please"}, "language"),
    ({"model": "m", "include[]": "tokens"}, "include[]"),
    ({"model": "m", "include[]": "logprobs", "response_format": "text"}, "include[]"),
    ({"model": "m", "temperature": "abc"}, "temperature"),
    ({"model": "m", "temperature": "5"}, "temperature"),
    ({"model": "m", "stream": "maybe"}, "stream"),
    ({"model": "m", "stream": "yes please"}, "stream"),
])
def test_form_errors_name_the_field(fields: dict[str, str], param: str) -> None:
    with pytest.raises(InvalidParam) as caught:
        TranscriptionForm.parse(fields)
    assert caught.value.param == param


# --- rendering --------------------------------------------------------------------------------

TRANSCRIPT = FileTranscript(
    text="Hello there. General Kenobi.",
    segments=(
        FileSegment(500, 1750, "Hello there.",
                    (Word("Hello", 500, 900, 0.9), Word("there.", 950, 1750, 0.8)), "en"),
        FileSegment(3_723_004, 3_725_000, "General Kenobi.", (), "en"),
    ),
    duration_s=3725.5,
)


def test_render_json_and_text() -> None:
    assert render(TRANSCRIPT, TranscriptionForm("m")) == (
        '{"text":"Hello there. General Kenobi."}', "application/json")
    body, kind = render(TRANSCRIPT, TranscriptionForm("m", response_format="text"))
    assert (body, kind) == ("Hello there. General Kenobi.\n", "text/plain; charset=utf-8")


def test_render_subtitles() -> None:
    srt, _ = render(TRANSCRIPT, TranscriptionForm("m", response_format="srt"))
    assert srt == ("1\n00:00:00,500 --> 00:00:01,750\nHello there.\n\n"
                   "2\n01:02:03,004 --> 01:02:05,000\nGeneral Kenobi.\n")
    vtt, kind = render(TRANSCRIPT, TranscriptionForm("m", response_format="vtt"))
    assert kind.startswith("text/vtt")
    assert vtt == ("WEBVTT\n\n00:00:00.500 --> 00:00:01.750\nHello there.\n\n"
                   "01:02:03.004 --> 01:02:05.000\nGeneral Kenobi.\n")


def test_render_verbose_json_with_words() -> None:
    import json

    form = TranscriptionForm("m", response_format="verbose_json",
                             timestamp_granularities=("word",))
    body = json.loads(render(TRANSCRIPT, form)[0])
    assert (body["task"], body["language"], body["duration"]) == ("transcribe", "english", 3725.5)
    assert "segments" not in body
    assert body["words"] == [{"word": "Hello", "start": 0.5, "end": 0.9, "probability": 0.9},
                             {"word": "there.", "start": 0.95, "end": 1.75, "probability": 0.8}]
    form = TranscriptionForm("m", response_format="verbose_json")
    segments = json.loads(render(TRANSCRIPT, form)[0])["segments"]
    assert [(s["id"], s["start"], s["end"], s["text"]) for s in segments] == [
        (0, 0.5, 1.75, "Hello there."), (1, 3723.004, 3725.0, "General Kenobi.")]


@pytest.mark.parametrize(("value", "stream"), [
    ("true", True), ("True", True), ("1", True), ("false", False), ("0", False), ("", False)])
def test_stream_is_true_or_false(value: str, stream: bool) -> None:
    assert TranscriptionForm.parse({"model": "m", "stream": value}).stream is stream


def test_verbose_json_names_english_for_a_translation_and_for_no_language() -> None:
    """OpenAI's TranslationVerbose.language is always english (the text's, not the speech's);
    a transcript that says no language (silence) is english too, not an empty string."""
    import json

    german = FileTranscript(text="Hallo.", duration_s=1.0, segments=(
        FileSegment(start_ms=0, end_ms=900, text="Hallo.", language="de"),))
    form = TranscriptionForm("m", response_format="verbose_json", task="translate")
    assert json.loads(render(german, form)[0])["language"] == "english"
    form = TranscriptionForm("m", response_format="verbose_json")
    assert json.loads(render(german, form)[0])["language"] == "german"
    silent = FileTranscript(text="", segments=(), duration_s=1.0)
    assert json.loads(render(silent, form)[0])["language"] == "english"


# --- the real SDK on loopback -----------------------------------------------------------------


async def test_openai_sdk_gets_every_response_format(server: RunningServer) -> None:
    client = _client(server)
    texts = reference_texts()
    expected = f"{texts[NAMES[0]]} {texts[NAMES[1]]}"
    assert (await _create(client)).text == expected
    assert (await _create(client, response_format="text")).strip() == expected
    verbose = await _create(client, response_format="verbose_json",
                            timestamp_granularities=["word", "segment"], language="en")
    assert verbose.text == expected
    assert verbose.language == "english"
    assert verbose.duration == pytest.approx(
        (load_pcm(NAMES[0]).size + load_pcm(NAMES[1]).size) / 16000 + 2.5, abs=0.01)
    assert [s.text for s in verbose.segments] == [texts[NAMES[0]], texts[NAMES[1]]]
    assert verbose.segments[0].start < verbose.segments[0].end < verbose.segments[1].start
    assert " ".join(w.word for w in verbose.words) == expected
    srt = await _create(client, response_format="srt")
    assert srt.startswith("1\n00:00:00,") and f"\n{texts[NAMES[1]]}\n" in srt
    vtt = await _create(client, response_format="vtt")
    assert vtt.startswith("WEBVTT\n\n00:00:00.") and f"\n{texts[NAMES[0]]}\n" in vtt


async def test_openai_sdk_sees_clear_errors(server: RunningServer) -> None:
    client = _client(server)
    with pytest.raises(openai.BadRequestError) as caught:
        await _create(client, response_format="verbose_json", timestamp_granularities=["char"])
    assert "timestamp granularity" in caught.value.message
    # OpenAI's error shape, which the SDK reads into the exception.
    assert (caught.value.type, caught.value.param) == ("invalid_request_error",
                                                       "timestamp_granularities[]")
    with pytest.raises(openai.BadRequestError) as caught:  # a 400 there, not a 415
        await _create(client, response_format="xml")
    assert (caught.value.code, caught.value.param) == ("invalid_param", "response_format")
    for garbage in (b"plain text, no audio", b""):
        with pytest.raises(openai.BadRequestError) as caught:
            await _create(client, file=("notes.txt", io.BytesIO(garbage), "text/plain"))
        assert caught.value.type == "invalid_request_error"
    # The server goes on: the next request is answered.
    assert (await _create(client)).text


async def test_openai_sdk_streams_the_text_piece_by_piece(server: RunningServer) -> None:
    """stream=true, as OpenAI's gpt-4o-transcribe answers it: a delta per piece of the file,
    then the whole text, which is what the same request without stream returns."""
    texts = reference_texts()
    client = _client(server)
    whole = (await _create(client, model="gpt-4o-mini-transcribe")).text

    def streamed() -> list[Any]:
        return list(client.audio.transcriptions.create(
            model="gpt-4o-mini-transcribe", file=("call.wav", _wav(), "audio/wav"), stream=True))

    events = await trio.to_thread.run_sync(streamed)
    assert [event.type for event in events] == ["transcript.text.delta"] * 2 + [
        "transcript.text.done"]
    assert [event.delta for event in events[:2]] == [texts[NAMES[0]], f" {texts[NAMES[1]]}"]
    assert events[-1].text == "".join(event.delta for event in events[:2]) == whole


async def test_openai_sdk_gets_word_logprobs_where_included(server: RunningServer) -> None:
    """include[]=logprobs: a log-probability per word (sttd's backends score words, not
    tokens), in the json answer and in the streamed events."""
    client = _client(server)
    plain = await _create(client, model="gpt-4o-transcribe")
    scored = await _create(client, model="gpt-4o-transcribe", include=["logprobs"])
    assert scored.text == plain.text and getattr(plain, "logprobs", None) is None
    assert " ".join(p.token for p in scored.logprobs) == scored.text
    assert all(p.logprob <= 0 and bytes(int(b) for b in p.bytes).decode() == p.token
               for p in scored.logprobs)

    def streamed() -> list[Any]:
        return list(client.audio.transcriptions.create(
            model="gpt-4o-transcribe", file=("call.wav", _wav(), "audio/wav"), stream=True,
            include=["logprobs"]))

    *deltas, done = await trio.to_thread.run_sync(streamed)
    assert [p.token for d in deltas for p in d.logprobs] == [p.token for p in done.logprobs]
    assert [p.logprob for p in done.logprobs] == [p.logprob for p in scored.logprobs]


async def test_stream_is_ignored_for_whisper_1_as_openai_does(server: RunningServer) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=server.http_url, timeout=60) as http:
        plain = await http.post("/v1/audio/transcriptions", data={"model": "whisper-1", "stream": "true"},
                                files={"file": ("call.wav", _wav(), "audio/wav")})
        refused = await http.post("/v1/audio/transcriptions",
                                  data={"model": "gpt-4o-transcribe", "stream": "true",
                                        "response_format": "srt"},
                                  files={"file": ("call.wav", _wav(), "audio/wav")})
    assert plain.status_code == 200 and plain.headers["content-type"] == "application/json"
    assert plain.json()["text"] == " ".join(reference_texts()[name] for name in NAMES)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "stream"


async def test_a_streamed_file_that_is_not_audio_is_refused_before_the_stream(
        server: RunningServer) -> None:
    """The SDK raises BadRequestError, as it does without stream, instead of a 200 whose events
    end in an error."""
    for content in [b"", b"this is a text file, not audio\n" * 20]:
        with pytest.raises(openai.BadRequestError) as caught:
            await trio.to_thread.run_sync(lambda content=content: list(
                _client(server).audio.transcriptions.create(
                    model="gpt-4o-transcribe", file=("call.wav", content, "audio/wav"),
                    stream=True)))
        assert caught.value.status_code == 400
    registry = server.state.metrics.registry
    assert registry.get_sample_value("sttd_errors_total", {"code": "unsupported_media_type"}) == 2


async def test_an_unsupported_language_names_its_param(server: RunningServer) -> None:
    """The mock backend is English-only: OpenAI's error shape names the field."""
    with pytest.raises(openai.BadRequestError) as caught:
        await _create(_client(server), language="de")
    assert caught.value.param == "language"
    assert caught.value.code == "unsupported_language"


async def test_a_stream_that_fails_after_it_began_ends_in_an_error_event(
        server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The status went out with the first byte: a failure later is an error event, which the
    SDK raises, and the server goes on."""
    from sttd.backends.mock import MockBackend
    from sttd.errors import BackendError

    def broken(self: Any, requests: Any) -> Any:
        raise BackendError("the model fell over")

    monkeypatch.setattr(MockBackend, "transcribe", broken)

    def streamed() -> list[Any]:
        return list(_client(server).audio.transcriptions.create(
            model="gpt-4o-transcribe", file=("call.wav", _wav(), "audio/wav"), stream=True))

    with pytest.raises(openai.APIError, match="the model fell over"):
        await trio.to_thread.run_sync(streamed)
    monkeypatch.undo()
    assert (await _create(_client(server))).text


async def test_openai_sdk_with_api_keys(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, api_keys="sk-right")
    with pytest.raises(openai.AuthenticationError):
        await _create(_client(server, "sk-wrong"))
    assert (await _create(_client(server, "sk-right"))).text


async def test_a_streamed_upload_is_not_refused_again_once_its_stream_begins(
        nursery: trio.Nursery) -> None:
    """A streamed answer's upload was admitted and read before its 200 went out; when its
    stream begins, an upload that came in the meantime may hold the last STT_MAX_UPLOADS place.
    Admitted again there (as it was), it was then refused with an `overloaded` event after the
    200 (10 of 168 streamed requests in a review's race); now it counts again whatever the
    limit, while new uploads are still refused at it."""
    import contextlib

    from sttd.admission import admit_upload, continue_upload
    from sttd.errors import Overloaded

    server = await start_server(nursery, max_uploads=1)
    state = server.state
    with admit_upload(state, None):  # the upload that came in the meantime
        with pytest.raises(Overloaded):
            with admit_upload(state, None):
                pass
        with continue_upload(state) as engine:
            assert state.uploads == 2 and engine is not None
        assert state.uploads == 1
    assert state.uploads == 0
    # What a stream holds counts against the limit: a new upload meanwhile is refused.
    with contextlib.ExitStack() as held:
        held.enter_context(continue_upload(state))
        with pytest.raises(openai.APIStatusError) as caught:
            await _create(_client(server), model="gpt-4o-transcribe")
        assert caught.value.status_code == 503


async def test_a_streamed_upload_counts_as_in_flight_until_its_stream_ends(
        server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """From the request to the stream's end, never dropping in between: a drain that began
    while the file was read saw no upload between the handler's return and the stream's start,
    finished, and the stream was cut after STT_SHUTDOWN_GRACE_S."""
    import contextlib

    from sttd.admission import AppState

    left: list[int] = []  # uploads in flight each time one count was left
    counted = AppState.upload_in_flight

    @contextlib.contextmanager
    def recorded(self: AppState) -> Any:
        with counted(self):
            yield
        left.append(self.uploads)

    monkeypatch.setattr(AppState, "upload_in_flight", recorded)
    events = await trio.to_thread.run_sync(lambda: list(
        _client(server).audio.transcriptions.create(
            model="gpt-4o-transcribe", file=("call.wav", _wav(), "audio/wav"), stream=True)))
    assert events[-1].type == "transcript.text.done"
    assert left == [1, 0]  # the request's count handed to the stream's, which ended last
