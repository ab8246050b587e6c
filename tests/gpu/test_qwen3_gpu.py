"""Qwen3-ASR on a real GPU, end to end, on one engine start for the whole module.

Skipped where vLLM or CUDA is missing (CI has neither), and then not counted as coverage; with
STTD_REQUIRE_GPU=1 those skips fail instead (tests/gpu/conftest.py). On a CUDA machine, with the
model in the hub cache (HF_HUB_OFFLINE=1 for staged weights) or STT_VLLM_MODEL naming a local
copy:

    uv sync --extra qwen3 && STTD_REQUIRE_GPU=1 uv run pytest tests/gpu/test_qwen3_gpu.py -v

The speech is benchmarks/data (the shared recordings, with refs.tsv). Throughput and latency
are a benchmark (benchmarks/gpu/run.sh), not a test.
"""

from __future__ import annotations

import trio

from tests.conftest import wer
from tests.gpu.conftest import DATA, ServedBackend, clip_names, refs, stream_file

MAX_WER = 0.15


def _errors(messages: list[dict[str, object]]) -> list[dict[str, object]]:
    return [m for m in messages if m["type"] == "error"]


async def _transcribe_clips(server: ServedBackend, query: str) -> tuple[str, str, set[object]]:
    """Every clip streamed on its own session: the joined references and finals, and the
    languages the finals report. No session may get an error message."""
    expected, heard, languages = [], [], set()
    for name in clip_names():
        messages = await stream_file(server, name, query)
        assert _errors(messages) == [], name
        finals = [m for m in messages if m["type"] == "final" and m["text"]]
        assert finals, name
        languages |= {m["language"] for m in finals}
        expected.append(refs()[name])
        heard.append(" ".join(str(m["text"]) for m in finals))
    return " ".join(expected), " ".join(heard), languages


async def test_streamed_clips_are_transcribed_and_their_language_detected(
        qwen3_server: ServedBackend) -> None:
    with trio.fail_after(600):
        expected, heard, languages = await _transcribe_clips(qwen3_server, "")
    assert languages == {"en"}
    assert wer(expected, heard) <= MAX_WER


async def test_a_forced_language_and_hotwords_reach_the_model(
        qwen3_server: ServedBackend) -> None:
    with trio.fail_after(600):
        expected, heard, languages = await _transcribe_clips(
            qwen3_server, "language=en&hotwords=Marianne,Willoughby")
    assert languages == {"en"}
    assert wer(expected, heard) <= MAX_WER


async def test_a_long_file_over_the_openai_api_in_verbose_json(
        qwen3_server: ServedBackend) -> None:
    import httpx

    audio = (DATA / "long_dev.wav").read_bytes()
    async with httpx.AsyncClient(timeout=300) as client:
        response = await client.post(f"{qwen3_server.http_url}/v1/audio/transcriptions",
                                     data={"model": "qwen3", "response_format": "verbose_json"},
                                     files={"file": ("long_dev.wav", audio, "audio/wav")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["language"] == "english" and body["segments"]
    assert all(a["end"] <= b["start"] + 1e-6 for a, b in zip(body["segments"], body["segments"][1:]))
    assert wer(refs()["long_dev"], body["text"]) <= MAX_WER


def test_the_engine_logged_no_failure(qwen3_server: ServedBackend) -> None:
    """After the tests above (pytest keeps file order): no request failed in the engine."""
    failed = [line for line in qwen3_server.lines
              if str(line.get("event", "")).startswith(("engine.failed", "scheduler.batch", "scheduler.failed"))]
    assert failed == []
