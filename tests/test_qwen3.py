"""The qwen3 backend without a GPU: prompts, answers, and its use of the engine (faked).

Everything here is the real backend code except vLLM's `AsyncLLM`, which a fake replaces: it
records what it is given and answers like the model. tests/gpu/ runs the real engine.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from collections.abc import AsyncIterator
from typing import Any

import attrs
import numpy as np
import pytest
import trio

from sttd.backends.base import BatchPartlyFailed, Request, Result
from sttd.backends.qwen3 import (
    Qwen3Backend,
    Qwen3Options,
    _EngineLoop,
    build_prompt,
    engine_arguments,
    max_new_tokens,
    parse_output,
)
from sttd.errors import BackendError, ConfigError, UnsupportedLanguage
from tests.test_cli import _env

HEAD = "<|im_start|>system\n"
USER = ("<|im_end|>\n<|im_start|>user\n<|audio_start|><|audio_pad|><|audio_end|><|im_end|>\n"
        "<|im_start|>assistant\n")


def _request(kind: str = "final", seconds: float = 2.0, **kwargs: Any) -> Request:
    audio = np.zeros(int(seconds * 16000), np.float32)
    return Request(audio, kind, **kwargs)  # type: ignore[arg-type]


# --- prompts ----------------------------------------------------------------------------------


def test_prompt_is_qwens_chat_template_with_an_empty_system_turn() -> None:
    assert build_prompt(_request()) == f"{HEAD}{USER}"


def test_hotwords_go_in_the_system_turn_cleaned_of_control_tokens() -> None:
    prompt = build_prompt(_request(hotwords=("Acme", "<|im_end|>Zyx<asr_text>", "<|im<|x|>_end|>")))
    assert prompt == f"{HEAD}Acme, Zyx, {USER}"


def test_a_forced_language_and_a_partials_prefix_go_in_the_assistant_turn() -> None:
    assert build_prompt(_request(language="en-GB")).endswith(f"{USER}language English<asr_text>")
    assert build_prompt(_request(language="yue")).endswith("language Cantonese<asr_text>")
    assert build_prompt(_request(language="tl")).endswith("language Filipino<asr_text>")
    partial = _request("partial", language="de", prefix="Guten Tag")
    assert build_prompt(partial).endswith("language German<asr_text>Guten Tag")
    # Without a language the model writes its language line first: no prefix can be forced.
    assert build_prompt(_request("partial", prefix="hello")) == f"{HEAD}{USER}"


def test_auto_language_partials_force_the_language_their_prefix_was_detected_in() -> None:
    partial = _request("partial", prefix="Guten Tag", prefix_language="de")
    assert build_prompt(partial).endswith(f"{USER}language German<asr_text>Guten Tag")
    result = parse_output(" alle zusammen", partial)
    assert (result.text, result.language) == ("Guten Tag alle zusammen", "de")
    # No prefix: nothing to force, the model detects. A language Qwen3-ASR does not name (a
    # remote upstream's, say) is not forced either.
    assert build_prompt(_request("partial", prefix_language="de")) == f"{HEAD}{USER}"
    assert build_prompt(_request("partial", prefix="x", prefix_language="sw")) == f"{HEAD}{USER}"
    # The session's own language wins over what was detected.
    forced = _request("partial", language="en", prefix="hi", prefix_language="de")
    assert build_prompt(forced).endswith("language English<asr_text>hi")


def test_a_language_qwen_does_not_know_is_refused() -> None:
    with pytest.raises(UnsupportedLanguage, match="Qwen3-ASR"):
        build_prompt(_request(language="sw"))


def test_token_cap_grows_with_duration_up_to_the_setting() -> None:
    assert max_new_tokens(_request(seconds=1.0), 512) == 36
    assert max_new_tokens(_request(seconds=10.0), 512) == 144
    assert max_new_tokens(_request(seconds=60.0), 512) == 512


# --- answers ----------------------------------------------------------------------------------


def test_detected_language_and_text() -> None:
    result = parse_output("language English<asr_text> Go forward ten meters.<|im_end|>",
                          _request())
    assert (result.text, result.language) == ("Go forward ten meters.", "en")
    assert parse_output("language Chinese<asr_text>你好", _request()).language == "zh"


def test_language_none_means_no_speech() -> None:
    for raw in ("language None<asr_text>", "language None<asr_text>Thank you.",
                "language <asr_text>uh"):
        result = parse_output(raw, _request())
        assert (result.text, result.language) == ("", None)


def test_with_a_forced_language_the_whole_answer_is_text() -> None:
    result = parse_output(" ten of clubs", _request(language="en"))
    assert (result.text, result.language) == ("ten of clubs", "en")
    partial = parse_output(" meters", _request("partial", language="en", prefix="go forward ten"))
    assert partial.text == "go forward ten meters"


def test_an_answer_without_a_language_line_is_text() -> None:
    assert parse_output("plain words", _request()).text == "plain words"


def test_runaway_repetition_is_collapsed() -> None:
    looped = "language English<asr_text>so " + "thank you " * 40 + "bye"
    assert parse_output(looped, _request()).text == "so thank you bye"
    fine = "language English<asr_text>" + "no " * 20 + "end"
    assert parse_output(fine, _request()).text == ("no " * 20 + "end")


# --- the engine, faked ------------------------------------------------------------------------


@attrs.define
class FakeSamplingParams:
    temperature: float
    max_tokens: int
    output_kind: Any


FINAL_ONLY = object()  # stands for vllm.sampling_params.RequestOutputKind.FINAL_ONLY


@attrs.define
class FakeOutput:
    text: str


@attrs.define
class FakeRequestOutput:
    outputs: list[FakeOutput]
    finished: bool


@attrs.define
class FakeEngine:
    """Answers each request after `delay_s`, as vLLM would: cumulative outputs, then finished."""

    answer: str = "language English<asr_text>hello there"
    delay_s: float = 0.05
    calls: list[dict[str, Any]] = attrs.field(factory=list)
    in_flight: int = 0
    most_in_flight: int = 0
    fail: bool = False
    lock: threading.Lock = attrs.field(factory=threading.Lock)
    shut_down: bool = False
    # AsyncLLM's dead-engine state.
    errored: bool = False
    dead_error: BaseException | None = None

    async def generate(self, prompt: Any, sampling_params: Any, request_id: str, *,
                       priority: int = 0) -> AsyncIterator[FakeRequestOutput]:
        self.calls.append({"prompt": prompt, "params": sampling_params, "id": request_id,
                           "priority": priority})
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay_s)
            if self.fail:
                raise RuntimeError("CUDA error: an illegal memory access")
            words = self.answer.split(" ")
            for count in range(1, len(words) + 1):
                yield FakeRequestOutput([FakeOutput(" ".join(words[:count]))],
                                        count == len(words))
        finally:
            self.in_flight -= 1

    def shutdown(self) -> None:
        self.shut_down = True


@pytest.fixture
def loop() -> Any:
    engine_loop = _EngineLoop()
    yield engine_loop
    engine_loop.stop()


def _backend(engine: FakeEngine, loop: _EngineLoop) -> Qwen3Backend:
    return Qwen3Backend(engine, loop, Qwen3Options(max_tokens=512),
                        sampling_params=FakeSamplingParams, final_only=FINAL_ONLY)


def test_the_scheduler_may_run_eight_calls_at_once_and_close_stops_the_engine() -> None:
    engine, loop = FakeEngine(), _EngineLoop()
    backend = _backend(engine, loop)
    assert (Qwen3Backend.preferred_lanes, backend.degraded()) == (8, None)
    backend.close()
    assert engine.shut_down and not loop.loop.is_running()


def test_each_request_reaches_the_engine_with_its_audio_prompt_and_priority(
        loop: _EngineLoop) -> None:
    engine = FakeEngine()
    backend = _backend(engine, loop)
    results = backend.transcribe([_request(seconds=0.2), _request("partial", hotwords=("Acme",))])
    assert [r.text for r in results] == ["hello there", "hello there"]
    assert [r.language for r in results] == ["en", "en"]
    final, partial = sorted(engine.calls, key=lambda c: c["priority"])
    assert (final["priority"], partial["priority"]) == (0, 1)  # lower runs first
    assert final["prompt"]["prompt"] == f"{HEAD}{USER}"
    assert partial["prompt"]["prompt"] == f"{HEAD}Acme{USER}"
    audio = final["prompt"]["multi_modal_data"]["audio"]
    assert audio.dtype == np.float32 and audio.size == 8000  # 0.2 s padded to 0.5 s
    # Only the last output is wanted: vLLM need not stream every token back.
    assert final["params"] == FakeSamplingParams(0.0, 26, FINAL_ONLY)
    assert final["id"] != partial["id"]


def test_file_pieces_rank_below_live_partials(loop: _EngineLoop) -> None:
    engine = FakeEngine()
    backend = _backend(engine, loop)
    backend.transcribe([_request(origin="file"), _request("partial"), _request()])
    priorities = {call["id"].split("-")[1] + "-" + call["id"].split("-")[2]: call["priority"]
                  for call in engine.calls}
    assert priorities == {"live-final": 0, "live-partial": 1, "file-final": 2}


def test_requests_from_concurrent_calls_are_in_flight_together(loop: _EngineLoop) -> None:
    engine = FakeEngine(delay_s=0.2)
    backend = _backend(engine, loop)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(trio.to_thread.run_sync, backend.transcribe,
                                   [_request(), _request()])

    trio.run(main)
    assert len(engine.calls) == 8
    assert engine.most_in_flight == 8  # one continuous batch, not four in turn


def test_an_engine_failure_is_a_backend_error(loop: _EngineLoop) -> None:
    backend = _backend(FakeEngine(fail=True), loop)
    with pytest.raises(BackendError, match="illegal memory access"):
        backend.transcribe([_request()])
    backend.check_language("en")
    with pytest.raises(UnsupportedLanguage):
        backend.check_language("xx")


def test_without_vllm_start_up_fails_naming_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    with pytest.raises(ConfigError, match=r"uv sync --extra qwen3.*STT_BACKEND=whisper"):
        Qwen3Backend.load(Qwen3Options())


async def test_sttd_serve_on_qwen3_without_vllm_exits_with_one_clear_error() -> None:
    env = _env(STT_BACKEND="qwen3", STT_HOST="127.0.0.1", STT_PORT="0")
    code = ("import sys; sys.modules['vllm'] = None; "
            "from sttd.cli import main; sys.exit(main(['serve']))")
    with trio.fail_after(60):
        result = await trio.run_process([sys.executable, "-c", code], env=env,
                                        capture_stderr=True, check=False)
    stderr = result.stderr.decode()
    assert result.returncode == 2
    assert "uv sync --extra qwen3" in stderr and "STT_BACKEND=whisper" in stderr
    assert "Traceback" not in stderr



@attrs.define
class FinalFailsEngine(FakeEngine):
    """Fails finals at once (priority 0); other requests answer as FakeEngine does."""

    async def generate(self, prompt: Any, sampling_params: Any, request_id: str, *,
                       priority: int = 0) -> AsyncIterator[FakeRequestOutput]:
        if priority == 0:
            raise ValueError("the prompt (5000 tokens) is longer than max_model_len (4096)")
        async for output in super().generate(prompt, sampling_params, request_id,
                                             priority=priority):
            yield output


def test_a_failed_request_fails_only_itself_not_its_batch_mates(loop: _EngineLoop) -> None:
    engine = FinalFailsEngine(delay_s=0.05)
    backend = _backend(engine, loop)
    with pytest.raises(BatchPartlyFailed) as raised:
        backend.transcribe([_request("partial"), _request(), _request("partial")])
    first, failed, third = raised.value.outcomes
    assert isinstance(failed, BackendError) and "max_model_len" in str(failed)
    assert first == third == Result("hello there", language="en")
    assert len(engine.calls) == 2  # the partials were decoded, not cancelled
    # Alone, the failure is the call's.
    with pytest.raises(BackendError, match="max_model_len"):
        backend.transcribe([_request()])


def test_a_dead_engine_shows_on_health_and_fails_calls_at_once(loop: _EngineLoop) -> None:
    engine = FakeEngine()
    backend = _backend(engine, loop)
    assert backend.degraded() is None
    engine.errored, engine.dead_error = True, RuntimeError("EngineCore encountered an issue")
    assert backend.degraded() == "the vLLM engine has died (EngineCore encountered an issue)"
    with pytest.raises(BackendError, match="has died"):
        backend.transcribe([_request(), _request()])
    assert engine.calls == []


# --- start-up, with vLLM's modules faked ------------------------------------------------------


ALL_ARGS = {"model", "gpu_memory_utilization", "dtype", "max_model_len", "max_num_seqs",
            "max_num_batched_tokens", "limit_mm_per_prompt", "scheduling_policy"}


def test_engine_arguments_hold_every_lane_and_turn_request_logging_off() -> None:
    options = Qwen3Options(max_batch=16, lanes=8)
    args = engine_arguments(options, ALL_ARGS | {"enable_log_requests"})
    assert args["max_num_seqs"] == 128 == options.max_num_seqs
    assert (args["scheduling_policy"], args["limit_mm_per_prompt"]) == ("priority", {"audio": 1})
    assert args["max_model_len"] == 4096 and args["enable_log_requests"] is False
    older = engine_arguments(options, ALL_ARGS | {"disable_log_requests"})
    assert older["disable_log_requests"] is True and "enable_log_requests" not in older


def test_a_vllm_without_a_required_engine_argument_stops_start_up() -> None:
    for name in ("scheduling_policy", "limit_mm_per_prompt", "max_num_batched_tokens",
                 "max_model_len"):
        with pytest.raises(ConfigError, match=name):
            engine_arguments(Qwen3Options(), ALL_ARGS - {name})


def _fake_vllm(monkeypatch: pytest.MonkeyPatch, fields: set[str]) -> list[Any]:
    """vLLM and torch modules just deep enough for `Qwen3Backend.load`; returns the list the
    engine arguments it is started with are put in."""
    import dataclasses
    import types

    started: list[Any] = []
    engine_args = dataclasses.make_dataclass(
        "AsyncEngineArgs", [(name, Any, dataclasses.field(default=None)) for name in fields])

    class AsyncLLM:
        @staticmethod
        def from_engine_args(args: Any) -> FakeEngine:
            started.append((args, os.environ.get("VLLM_WORKER_MULTIPROC_METHOD")))
            return FakeEngine()

    modules = {
        "vllm": types.SimpleNamespace(SamplingParams=FakeSamplingParams),
        "vllm.sampling_params": types.SimpleNamespace(
            RequestOutputKind=types.SimpleNamespace(FINAL_ONLY=FINAL_ONLY)),
        "vllm.engine.arg_utils": types.SimpleNamespace(AsyncEngineArgs=engine_args),
        "vllm.v1.engine.async_llm": types.SimpleNamespace(AsyncLLM=AsyncLLM),
        "torch": types.SimpleNamespace(cuda=types.SimpleNamespace(is_available=lambda: True)),
    }
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delenv("VLLM_WORKER_MULTIPROC_METHOD", raising=False)
    return started


def test_start_up_uses_spawned_workers_and_the_checked_arguments(
        monkeypatch: pytest.MonkeyPatch) -> None:
    started = _fake_vllm(monkeypatch, ALL_ARGS | {"enable_log_requests"})
    backend = Qwen3Backend.load(Qwen3Options(max_batch=4, lanes=2))
    try:
        [(args, method)] = started
        assert method == "spawn"  # set before the engine started
        assert (args.scheduling_policy, args.max_num_seqs) == ("priority", 8)
        assert backend.transcribe([_request()])[0].text == "hello there"
    finally:
        backend.close()


def test_start_up_with_a_vllm_lacking_priority_scheduling_fails_loudly(
        monkeypatch: pytest.MonkeyPatch) -> None:
    started = _fake_vllm(monkeypatch, ALL_ARGS - {"scheduling_policy"})
    with pytest.raises(ConfigError, match="scheduling_policy"):
        Qwen3Backend.load(Qwen3Options())
    assert started == []
