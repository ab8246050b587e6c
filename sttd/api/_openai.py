"""OpenAI's transcription API (``POST /v1/audio/transcriptions``): its form, and its answers.

Sans I/O: `TranscriptionForm.parse` validates the multipart form's text fields, and `render`
turns a `FileTranscript` into the body and content type of the ``response_format`` asked for
(``json``, ``text``, ``verbose_json``, ``srt`` or ``vtt``), shaped as OpenAI's own server shapes
them, so that its SDKs work against sttd unchanged. The route itself is in `sttd.http`.

``model`` is required, as OpenAI requires it, but any name is accepted: the server has one
engine. ``temperature`` is accepted and ignored (decoding is deterministic). ``stream=true``
sends the text as server-sent events (`stream_event`) as the file's pieces are transcribed: a
``transcript.text.delta`` per piece, then ``transcript.text.done``; for ``whisper-1`` OpenAI
ignores ``stream``, and so does sttd.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Final, Literal

import attrs

from sttd.errors import InvalidParam
from sttd.api._events import FileTranscript, Word
from sttd.api._languages import language_name
from sttd.api._params import (
    MAX_HOTWORD_CHARS,
    MAX_HOTWORDS,
    dumps,
    parse_hotwords,
    parse_language,
    quoted,
)

__all__ = ["RESPONSE_FORMATS", "TranscriptionForm", "prompt_phrases", "render", "stream_event",
           "word_logprobs"]

RESPONSE_FORMATS: Final = ("json", "text", "verbose_json", "srt", "vtt")
_GRANULARITIES: Final = ("segment", "word")
_MAX_PROMPT_CHARS: Final = 1000



@attrs.frozen
class TranscriptionForm:
    """The text fields of a transcription request, checked."""

    model: str
    language: str | None = None
    # The prompt's comma-separated phrases, passed to the engine as hotwords.
    prompt: tuple[str, ...] = ()
    response_format: str = "json"
    timestamp_granularities: tuple[str, ...] = ("segment",)
    # /v1/audio/transcriptions transcribes; /v1/audio/translations translates into English
    # (where `language`, which OpenAI's translation form lacks, may still name the source).
    task: Literal["transcribe", "translate"] = "transcribe"
    # stream=true: the text as server-sent events, piece by piece (json and text formats).
    stream: bool = False
    # include[]=logprobs: each word's log-probability (json, and the stream's events).
    logprobs: bool = False

    @classmethod
    def parse(cls, fields: Mapping[str, str], *,
              task: Literal["transcribe", "translate"] = "transcribe") -> TranscriptionForm:
        """Check `fields` (repeated ``timestamp_granularities[]`` joined by commas).

        Raises `InvalidParam` naming the first field that is missing or wrong.
        """
        model = fields.get("model", "").strip()
        if not model:
            raise InvalidParam("model", "the form needs a 'model' field (any name: this server "
                                        "has one engine)")
        response_format = fields.get("response_format", "json").strip() or "json"
        if response_format not in RESPONSE_FORMATS:
            raise InvalidParam("response_format", "response_format must be one of "
                               f"{', '.join(RESPONSE_FORMATS)}, got {quoted(response_format)}")
        raw = fields.get("timestamp_granularities[]", fields.get("timestamp_granularities", ""))
        granularities = tuple(dict.fromkeys(g.strip() for g in raw.split(",") if g.strip()))
        for granularity in granularities:
            if granularity not in _GRANULARITIES:
                raise InvalidParam("timestamp_granularities[]", "each timestamp granularity "
                                   f"must be 'segment' or 'word', got {quoted(granularity)}")
        if granularities and response_format != "verbose_json":
            raise InvalidParam("timestamp_granularities[]", "timestamp_granularities needs "
                               "response_format=verbose_json")
        raw_stream = fields.get("stream", "false").strip().lower()
        if raw_stream not in _BOOLEANS:
            raise InvalidParam("stream", f"stream must be true or false, got {quoted(raw_stream)}")
        stream = _BOOLEANS[raw_stream]
        # OpenAI ignores stream for whisper-1 ("streaming is not supported for the whisper-1
        # model and will be ignored"), so its clients may send it.
        stream = stream and model != "whisper-1"
        if stream and response_format not in ("json", "text"):
            raise InvalidParam("stream", "stream=true sends the text as it comes: "
                               f"response_format must be json or text, got {quoted(response_format)}")
        include = [item.strip() for item in
                   fields.get("include[]", fields.get("include", "")).split(",") if item.strip()]
        for item in include:
            if item != "logprobs":
                raise InvalidParam("include[]", f"include may hold 'logprobs', got {quoted(item)}")
        logprobs = bool(include)
        if logprobs and response_format != "json":
            raise InvalidParam("include[]", "logprobs come with response_format=json, got "
                                            f"{quoted(response_format)}")
        temperature = fields.get("temperature", "").strip()
        if temperature:  # accepted and ignored (decoding is deterministic), but must be one
            try:
                value = float(temperature)
            except ValueError:
                value = math.nan
            if not 0.0 <= value <= 1.0:
                raise InvalidParam("temperature", "temperature must be a number from 0 to 1, "
                                                  f"got {quoted(temperature)}")
        prompt = fields.get("prompt", "")
        if len(prompt) > _MAX_PROMPT_CHARS:
            raise InvalidParam("prompt", f"prompt must be at most {_MAX_PROMPT_CHARS} "
                                         f"characters, got {len(prompt)}")
        return cls(
            model=model,
            language=parse_language(fields.get("language", ""), param="language"),
            prompt=prompt_phrases(prompt),
            response_format=response_format,
            timestamp_granularities=granularities or ("segment",),
            task=task,
            stream=stream,
            logprobs=logprobs,
        )


def prompt_phrases(prompt: str) -> tuple[str, ...]:
    """OpenAI's free-text prompt as hotword phrases: split at commas, a phrase longer than a
    hotword may be cut at word boundaries (a sentence is a usual prompt and must not be refused),
    and only the first phrases the engine takes are kept."""
    phrases: list[str] = []
    for piece in prompt.split(","):
        current = ""
        for word in piece.split():
            word = word[:MAX_HOTWORD_CHARS]
            if current and len(current) + 1 + len(word) > MAX_HOTWORD_CHARS:
                phrases.append(current)
                current = word
            else:
                current = f"{current} {word}".strip()
        if current:
            phrases.append(current)
    return parse_hotwords(",".join(phrases[:MAX_HOTWORDS]), param="prompt")


def render(transcript: FileTranscript, form: TranscriptionForm) -> tuple[str, str]:
    """The response body and its content type, in `form.response_format`."""
    kind = form.response_format
    if kind == "json":
        body: dict[str, object] = {"text": transcript.text}
        if form.logprobs:
            body["logprobs"] = word_logprobs(w for s in transcript.segments for w in s.words)
        return dumps(body), "application/json"
    if kind == "text":
        return transcript.text + "\n", "text/plain; charset=utf-8"
    if kind == "srt":
        return _subtitles(transcript, vtt=False), "text/plain; charset=utf-8"
    if kind == "vtt":
        return _subtitles(transcript, vtt=True), "text/vtt; charset=utf-8"
    return dumps(_verbose(transcript, form)), "application/json"


def word_logprobs(words: Iterable[Word]) -> list[dict[str, object]]:
    """OpenAI's ``logprobs`` of a transcript, a word at a time (sttd's backends score words,
    not tokens): ``token`` is the word, ``logprob`` the log of its probability."""
    return [{"token": word.word, "logprob": round(math.log(max(word.probability, 1e-12)), 4),
             "bytes": list(word.word.encode())} for word in words]


def stream_event(kind: Literal["delta", "done", "error"], text: str = "", *, first: bool = False,
                 code: str = "", message: str = "",
                 logprobs: list[dict[str, object]] | None = None) -> bytes:
    """One server-sent event of a streamed transcription, as OpenAI's SDKs read them: a
    ``transcript.text.delta`` of a piece's `text` (after a space unless it is the `first`), the
    ``transcript.text.done`` with the whole `text`, or an error that came after the stream began
    (which the SDKs raise); `logprobs` (include[]=logprobs) go with a delta or the done."""
    body: dict[str, object]
    if kind == "error":
        body = {"error": {"code": code, "message": message,
                          "type": "server_error" if code in _SERVER_ERRORS
                          else "invalid_request_error", "param": None}}
    else:
        body = ({"type": "transcript.text.delta", "delta": text if first else f" {text}"}
                if kind == "delta" else {"type": "transcript.text.done", "text": text})
        if logprobs is not None:
            body["logprobs"] = logprobs
    return f"data: {dumps(body)}\n\n".encode()


# A form's true and false, as OpenAI's SDKs and curl users write them.
_BOOLEANS: Final = {"": False, "false": False, "0": False, "true": True, "1": True}

# Error codes of failures on the server's side (the rest are the request's).
_SERVER_ERRORS: Final = frozenset({"internal", "inference_failed", "inference_timeout",
                                   "overloaded", "shutting_down"})


def _verbose(transcript: FileTranscript, form: TranscriptionForm) -> dict[str, object]:
    # A translation's text is English, as OpenAI's TranslationVerbose says; a transcript with
    # no language said (no speech, or a backend that does not tell) is English, as OpenAI's
    # detection answers for silence.
    language = "en" if form.task == "translate" else (
        transcript.language or form.language or "en")
    body: dict[str, object] = {
        "task": form.task,
        "language": language_name(language),
        "duration": round(transcript.duration_s, 3),
        "text": transcript.text,
    }
    if "segment" in form.timestamp_granularities:
        body["segments"] = [
            {
                "id": index,
                "seek": 0,
                "start": segment.start_ms / 1000,
                "end": segment.end_ms / 1000,
                "text": segment.text,
                "tokens": [],
                "temperature": 0.0,
                "avg_logprob": 0.0,
                "compression_ratio": 0.0,
                "no_speech_prob": 0.0,
            }
            for index, segment in enumerate(transcript.segments)
        ]
    if "word" in form.timestamp_granularities:
        body["words"] = [
            # `probability` is ours (OpenAI's clients ignore it); another sttd reads it.
            {"word": word.word, "start": word.start_ms / 1000, "end": word.end_ms / 1000,
             "probability": round(word.probability, 4)}
            for segment in transcript.segments for word in segment.words
        ]
    return body


def _subtitles(transcript: FileTranscript, *, vtt: bool) -> str:
    blocks = ["WEBVTT\n"] if vtt else []
    for index, segment in enumerate(transcript.segments, start=1):
        times = (f"{_timestamp(segment.start_ms, vtt=vtt)} --> "
                 f"{_timestamp(segment.end_ms, vtt=vtt)}")
        blocks.append(f"{times}\n{segment.text}\n" if vtt else f"{index}\n{times}\n{segment.text}\n")
    return "\n".join(blocks)


def _timestamp(ms: int, *, vtt: bool) -> str:
    hours, rest = divmod(max(ms, 0), 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds, millis = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{seconds:02d}{'.' if vtt else ','}{millis:03d}"
