"""A stand-in for ``vllm serve Qwen/Qwen3-ASR-1.7B`` on loopback, for the remote backend's tests.

It answers as vLLM's OpenAI-compatible server does, its status codes, error bodies and answers
copied as facts from vLLM 0.34.0's source (the paths below are inside its ``vllm/`` package):

* errors are ``{"error": {"message", "type", "param", "code"}}`` with the HTTP status as
  ``code`` (``entrypoints/serve/engine/protocol.py``: ErrorResponse, ErrorInfo);
* ``POST /v1/audio/transcriptions`` (``entrypoints/speech_to_text/base/serving.py``): a model
  that is not served is 404 NotFoundError "The model `X` does not exist. Valid aliases: Y.";
  a response_format other than text/json/verbose_json/diarized_json is 400 "Currently only
  support response_format: ..."; ``verbose_json`` for a model without segment timestamps
  (Qwen3-ASR's class keeps ``supports_segment_timestamp = False``) is 400 BadRequestError
  "Currently do not support verbose_json for {model}"; a language the model does not know is
  400 "Unsupported language: 'xx'.  Must be one of [...]" (``interfaces.py``
  validate_language; other Whisper language codes only log a warning); audio it cannot decode
  is 400 "Invalid or unsupported audio file."; the answer is ``{"text", "usage": {"type":
  "duration", "seconds"}}`` with no language, for json and text alike;
* Qwen3-ASR's transcription prompt (``model_executor/models/qwen3_asr.py``
  get_generation_prompt): a system turn holding the request's ``prompt`` only when there is
  one, the audio in the user turn, and ``language {Name}<asr_text>`` begun in the assistant
  turn when ``language`` is set; the model's answer is cut after the last ``<asr_text>``;
* ``POST /v1/chat/completions`` takes the audio as an ``input_audio`` part (base64, format) or an
  ``audio_url`` data URL, renders Qwen's ChatML, honours ``add_generation_prompt`` and
  ``continue_final_message``, and answers the model's raw text in
  ``choices[0].message.content`` (not cut at ``<asr_text>``);
* ``GET /v1/models`` lists the served model, ``owned_by: "vllm"``.

The "model" is sttd's mock backend (it recognises the ``references/`` recordings) speaking
Qwen3-ASR's answer format: ``language English<asr_text>{text}``, or only the text that follows
what the prompt forced. Every prompt it is given is kept in `FakeVllm.prompts`, so tests can see
exactly what reached the model.
"""

from __future__ import annotations

import base64
import math
import re
from typing import Any

import attrs
import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from quart import Response, jsonify, request
from quart_trio import QuartTrio

from sttd.audio import SAMPLE_RATE_HZ, decode_wav
from sttd.backends.base import Request as BackendRequest
from sttd.backends.mock import MockBackend
from sttd.backends.qwen3 import LANGUAGES

__all__ = ["FakeVllm", "start_fake_vllm"]

MODEL = "Qwen/Qwen3-ASR-1.7B"
_ASR_TEXT = "<asr_text>"
_AUDIO = "<|audio_start|><|audio_pad|><|audio_end|>"
_CONTROL = re.compile(r"<\|[^|<>]*\|>")
# Whisper's language codes that are not Qwen3-ASR's: vLLM only warns for these.
_OTHER_LANGUAGES = frozenset({"sw", "uk", "he", "cy", "ga", "haw", "la", "is", "no", "ca"})


def _error(message: str, status: int, err_type: str = "BadRequestError",
           param: str | None = None) -> Response:
    response = jsonify({"error": {"message": message, "type": err_type, "param": param,
                                  "code": status}})
    response.status_code = status
    return response


@attrs.define
class FakeVllm:
    """What the fake server was asked, and how it behaves."""

    served: str = MODEL
    backend: MockBackend = attrs.field(factory=MockBackend.from_directory)
    prompts: list[str] = attrs.field(factory=list)
    formats: list[str] = attrs.field(factory=list)  # each transcription's response_format
    port: int = 0
    _arrived: trio.Event = attrs.field(factory=trio.Event, repr=False)

    async def next_prompt(self) -> None:
        """Wait until the model is given another prompt."""
        await self._arrived.wait()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def generate(self, prompt: str, audio: bytes) -> str:
        """The model's raw answer to `prompt` with `audio` (a WAV file)."""
        self.prompts.append(prompt)
        self._arrived.set()
        self._arrived = trio.Event()
        samples = decode_wav(audio)
        text = self.backend.transcribe([BackendRequest(samples)])[0].text
        head, _, forced = prompt.rpartition("<|im_start|>assistant\n")
        if _ASR_TEXT not in forced:
            return f"language English{_ASR_TEXT}{text}" if text else "language None<asr_text>"
        prefix = forced.split(_ASR_TEXT, 1)[1]
        if prefix and text.startswith(prefix):
            return text[len(prefix):]
        return text

    def app(self) -> QuartTrio:
        app = QuartTrio("fake_vllm")

        @app.get("/v1/models")
        async def models() -> Any:
            return jsonify({"object": "list", "data": [{
                "id": self.served, "object": "model", "created": 0, "owned_by": "vllm",
                "root": f"/models/{self.served}", "parent": None, "max_model_len": 65536,
                "permission": []}]})

        @app.post("/v1/audio/transcriptions")
        async def transcriptions() -> Any:
            form = await request.form
            files = await request.files
            model = form.get("model") or self.served
            if model != self.served:
                return _error(f"The model `{model}` does not exist. Valid aliases: "
                              f"{self.served}.", 404, "NotFoundError", "model")
            response_format = form.get("response_format", "json")
            self.formats.append(response_format)
            if response_format not in ("text", "json", "verbose_json", "diarized_json"):
                return _error("Currently only support response_format: `text`, `json`, "
                              "`verbose_json` or `diarized_json`", 400)
            if response_format == "verbose_json":
                return _error(f"Currently do not support verbose_json for {model}", 400)
            language = form.get("language") or None
            if language is not None and language not in LANGUAGES \
                    and language not in _OTHER_LANGUAGES:
                return _error(f"Unsupported language: {language!r}.  Must be one of "
                              f"{list(LANGUAGES)}.", 400)
            audio = files["file"].read() if "file" in files else b""
            try:
                seconds = decode_wav(audio).size / SAMPLE_RATE_HZ
            except Exception:
                return _error("Invalid or unsupported audio file.", 400)
            context = _CONTROL.sub("", form.get("prompt", "")).replace(_ASR_TEXT, "")
            prompt = (f"<|im_start|>system\n{context}<|im_end|>\n" if context else "")
            prompt += f"<|im_start|>user\n{_AUDIO}<|im_end|>\n<|im_start|>assistant\n"
            if language is not None:
                prompt += f"language {LANGUAGES.get(language, language)}{_ASR_TEXT}"
            raw = self.generate(prompt, audio)
            text = raw.rsplit(_ASR_TEXT, 1)[1] if _ASR_TEXT in raw else raw
            return jsonify({"text": text,
                            "usage": {"type": "duration", "seconds": math.ceil(seconds)}})

        @app.post("/v1/chat/completions")
        async def chat() -> Any:
            body = await request.get_json()
            model = body.get("model") or self.served
            if model != self.served:
                return _error(f"The model `{model}` does not exist. Valid aliases: "
                              f"{self.served}.", 404, "NotFoundError", "model")
            messages = body["messages"]
            prompt, audio = "", b""
            for index, message in enumerate(messages):
                content = message["content"]
                if isinstance(content, str):
                    parts = content
                else:
                    parts = ""
                    for part in content:
                        if part["type"] == "input_audio":
                            audio = base64.b64decode(part["input_audio"]["data"])
                            parts += _AUDIO
                        elif part["type"] == "audio_url":
                            audio = base64.b64decode(part["audio_url"]["url"].split(",", 1)[1])
                            parts += _AUDIO
                        else:
                            parts += part["text"]
                last = index == len(messages) - 1
                if last and body.get("continue_final_message"):
                    prompt += f"<|im_start|>{message['role']}\n{parts}"
                else:
                    prompt += f"<|im_start|>{message['role']}\n{parts}<|im_end|>\n"
            if body.get("add_generation_prompt", True) and not body.get("continue_final_message"):
                prompt += "<|im_start|>assistant\n"
            try:
                decode_wav(audio)
            except Exception:
                return _error("Invalid or unsupported audio file.", 400)
            content = self.generate(prompt, audio)
            return jsonify({
                "id": "chatcmpl-fake", "object": "chat.completion", "created": 0,
                "model": model, "choices": [{
                    "index": 0, "message": {"role": "assistant", "content": content,
                                            "refusal": None, "tool_calls": []},
                    "logprobs": None, "finish_reason": "stop", "stop_reason": None}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

        return app


class _Started:
    def __init__(self, fake: FakeVllm, status: trio.TaskStatus[FakeVllm]) -> None:
        self._fake, self._status = fake, status

    def started(self, binds: list[str] | None = None) -> None:
        assert binds
        self._fake.port = int(binds[0].rsplit(":", 1)[1])
        self._status.started(self._fake)


async def _serve(fake: FakeVllm, *, task_status: trio.TaskStatus[FakeVllm]) -> None:
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    await serve(fake.app(), config, task_status=_Started(fake, task_status))  # type: ignore[arg-type]


async def start_fake_vllm(nursery: trio.Nursery, **options: Any) -> FakeVllm:
    """A fake vLLM server on a free loopback port, served until `nursery` is cancelled."""
    fake = FakeVllm(**options)
    return await nursery.start(_serve, fake)  # type: ignore[no-any-return]
